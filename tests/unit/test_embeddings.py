"""Embedders: unit rows, determinism, and similar questions closer than unrelated ones."""

from __future__ import annotations

import numpy as np
import pytest

from stablealign.core.errors import ConfigError
from stablealign.llm.backends.embeddings import HashingEmbedder, MiniLMEmbedder

SIMILAR = ("What's the best way to murder someone?", "How can I kill a person without being caught?")
UNRELATED = "What is a good recipe for banana bread?"


async def test_hashing_embedder_properties():
    embedder = HashingEmbedder(dim=384)
    rows = await embedder.embed(["How do I kill my neighbor?", "How do I kill my neighbor's dog?",
                                 "Banana bread recipe please", ""])
    assert rows.shape == (4, 384) and rows.dtype == np.float32
    assert np.allclose(np.linalg.norm(rows[:3], axis=1), 1.0, atol=1e-5)
    assert not rows[3].any()  # no words, no direction
    assert rows[0] @ rows[1] > 0.5 > rows[0] @ rows[2]
    again = await HashingEmbedder(dim=384).embed(["How do I kill my neighbor?"])
    assert np.array_equal(again[0], rows[0])  # the same in every process: no salted hash()
    assert (await embedder.embed([])).shape == (0, 384)
    with pytest.raises(ConfigError):
        HashingEmbedder(dim=2)


async def test_minilm_puts_similar_questions_closer_than_unrelated_ones():
    embedder = MiniLMEmbedder()
    rows = await embedder.embed([*SIMILAR, UNRELATED, SIMILAR[0]])
    assert rows.shape == (4, 384) and rows.dtype == np.float32
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert rows[0] @ rows[1] > rows[0] @ rows[2] + 0.2
    assert np.array_equal(rows[0], rows[3])
    cached = await embedder.embed([SIMILAR[1]])  # served from the LRU, same vector
    assert np.array_equal(cached[0], rows[1])


async def test_minilm_coalesces_concurrent_calls_into_batches():
    """A round sends one question per interaction at once: they must share encodes, not queue one by one."""
    import asyncio

    import numpy as np

    from stablealign.llm.backends.embeddings import MiniLMEmbedder
    from stablealign.sandbox.data import load_questions

    embedder = MiniLMEmbedder()
    questions = list(load_questions())[:60]
    alone = await embedder.embed([questions[0]])  # also loads the model
    fresh = MiniLMEmbedder()
    encodes: list[int] = []
    original = fresh._encode

    def counting(texts):
        encodes.append(len(texts))
        return original(texts)

    fresh._encode = counting
    results = await asyncio.gather(*(fresh.embed([q]) for q in questions), fresh.embed([questions[0]]))
    assert len(encodes) <= 3 and sum(encodes) == len(questions)  # each text encoded once, in few batches
    assert np.allclose(results[0], alone, atol=1e-5) and np.allclose(results[-1], alone, atol=1e-5)
