"""Embedders: unit rows, determinism, and similar questions closer than unrelated ones."""

from __future__ import annotations

import numpy as np
import pytest

from stablealign.backends.embeddings import HashingEmbedder, MiniLMEmbedder
from stablealign.errors import ConfigError

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
