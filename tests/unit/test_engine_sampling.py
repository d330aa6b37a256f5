"""The batching engine's pure parts: the sampling distribution and the loop that ends a completion."""

from __future__ import annotations

import pytest

from stablealign.llm.backends.batching import ends_in_loop, sampling_candidates

torch = pytest.importorskip("torch")


def test_three_copies_of_a_span_end_a_completion():
    assert ends_in_loop([7, 8] + [1, 2, 3, 4] * 3, 0, 3, 4, 32)
    assert not ends_in_loop([7, 8] + [1, 2, 3, 4] * 2, 0, 3, 4, 32)  # two copies are allowed
    assert not ends_in_loop([5, 6, 5, 6, 5, 6], 0, 3, 4, 32)  # shorter than the shortest span
    assert not ends_in_loop([1, 2, 3, 4] * 3 + [9], 0, 3, 4, 32)  # the loop was left
    assert ends_in_loop(list(range(40)) * 3, 0, 3, 4, 40) and not ends_in_loop(list(range(40)) * 3, 0, 3, 4, 32)


def test_forced_tokens_are_not_part_of_a_loop():
    tokens = [1, 2, 3, 4] + [1, 2, 3, 4] * 2  # the first copy was forced (a rating's choice and prefix)
    assert ends_in_loop(tokens, 0, 3, 4, 32) and not ends_in_loop(tokens, 4, 3, 4, 32)


def test_sampling_candidates_keep_top_k_then_top_p_and_renormalise():
    scores = torch.log(torch.tensor([[0.05, 0.3, 0.15, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    probs, ids = sampling_candidates(scores, 0, 1.0)
    assert torch.allclose(probs, scores.exp(), atol=1e-6) and ids[0].tolist() == [0, 1, 2, 3]
    probs, ids = sampling_candidates(scores, 2, 1.0)
    assert ids[0].tolist() == [3, 1] and torch.allclose(probs[0], torch.tensor([0.625, 0.375]), atol=1e-6)
    probs, ids = sampling_candidates(scores[:1], 0, 0.7)  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert torch.allclose(probs[0], torch.tensor([0.0, 0.375, 0.0, 0.625]), atol=1e-6)
    probs, _ = sampling_candidates(scores, 3, 0.9)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
