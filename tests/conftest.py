"""Shared fixtures: a real nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stablealign_app.natsserver import EmbeddedNatsServer  # noqa: E402


@pytest.fixture
def nats_server():
    """A fresh nats-server (JetStream, temporary store) per test; ``.restart()`` simulates an outage."""
    with EmbeddedNatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url):
    """A connected client with the project's streams and buckets created.

    At teardown it also closes the LLM clients that services started in the test cached on this loop
    (``close_process_backends``: a service's stop leaves them to the loop's owner, here the test)."""
    from stablealign.nats import client as nats_client
    from stablealign.serving.service import close_process_backends
    from tests.support.streams import ensure_all_streams

    client = await nats_client.connect(nats_url, name="test")
    await ensure_all_streams(client.jetstream())
    yield client
    await close_process_backends()
    try:
        await asyncio.wait_for(client.close(), timeout=5)
    except Exception:  # noqa: BLE001
        pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 32) with a tokenizer trained on 400 pool questions: fast hf tests."""
    import itertools

    from stablealign.sandbox.data import default_questions_path
    from stablealign_app.tinymodel import build_tiny_model

    with open(default_questions_path(), encoding="utf-8") as handle:
        corpus = [line.strip() for line in itertools.islice(handle, 400) if line.strip()]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), layers=2, hidden=32, heads=4,
                            vocab_size=400, corpus=corpus, seed=0)
