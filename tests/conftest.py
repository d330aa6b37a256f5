"""Shared fixtures: a real nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stablealign.natsserver import EmbeddedNatsServer  # noqa: E402


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
    """A connected client with the project's streams and buckets created."""
    from stablealign import bus

    client = await bus.connect(nats_url, name="test")
    await bus.ensure_jetstream(client.jetstream())
    yield client
    try:
        await asyncio.wait_for(client.close(), timeout=5)
    except Exception:  # noqa: BLE001
        pass
