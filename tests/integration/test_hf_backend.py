"""The in-process transformers backend on a tiny random Llama built in a fixture (no downloads).

Batching itself is tested in test_hf_batching.py."""

from __future__ import annotations

import pytest

from stablealign.core.errors import ConfigError
from stablealign.llm.backends.base import ChatMessage, ChatRequest
from stablealign.llm.backends.hf import HFChatBackend


def ask(**kwargs) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("system", "Be kind."), ChatMessage("user", "How do I bake bread?")],
                       max_tokens=12, **kwargs)


async def test_generation_is_deterministic(tiny_model_dir):
    backend = HFChatBackend(tiny_model_dir, max_new_tokens=16)
    greedy = await backend.chat(ask(temperature=0.0))
    assert greedy.text == (await backend.chat(ask(temperature=0.0))).text
    assert greedy.model == tiny_model_dir.name and 0 < greedy.completion_tokens <= 12 and greedy.prompt_tokens > 5
    sampled = await backend.chat(ask(temperature=1.0, seed=7))
    assert sampled.text == (await HFChatBackend(tiny_model_dir).chat(ask(temperature=1.0, seed=7))).text
    others = {(await backend.chat(ask(temperature=1.0, seed=s))).text for s in range(4)}
    assert len(others) > 1  # the seed matters when sampling


async def test_without_a_chat_template_the_shared_template_is_used(tiny_model_dir):
    from stablealign.llm.prompt_format import render_prompt

    backend = HFChatBackend(tiny_model_dir)
    backend._load()
    backend._tokenizer.chat_template = None
    ids, text = backend._prompt_ids(ask())
    assert text == render_prompt(ask().messages) and len(ids) > 5
    assert (await backend.chat(ask(temperature=0.0))).completion_tokens > 0


async def test_concurrent_requests_are_decoded_together(tiny_model_dir):
    import asyncio

    backend = HFChatBackend(tiny_model_dir)
    replies = await asyncio.gather(*(backend.chat(ask(temperature=0.0)) for _ in range(3)))
    assert len({r.text for r in replies}) == 1
    assert backend._engine.max_rows_seen > 1  # decoded side by side, no lock
    await backend.aclose()


def test_missing_or_bad_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        HFChatBackend(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        HFChatBackend(tmp_path)
