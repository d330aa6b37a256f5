"""The alignment probe: a Bradley-Terry fit that finds a preference where one is planted, a rating
distribution that rises with the reward, a disk cache that survives damage, and the prior split only."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stablealign.core.errors import ValidationError
from stablealign.llm.backends import probe as P
from stablealign.llm.backends.embeddings import HashingEmbedder
from stablealign.sandbox.ratings import check_rating_fields


def planted(n: int = 400, dim: int = 16, signal: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose chosen answer lies further along one direction than the rejected one, plus noise."""
    rng = np.random.default_rng(seed)
    rejected = rng.normal(size=(n, dim))
    chosen = rng.normal(size=(n, dim))
    chosen[:, 0] += signal
    return chosen, rejected


def test_fit_finds_a_planted_preference_and_reads_it_as_ratings():
    chosen, rejected = planted()
    probe = P.fit_probe(chosen, rejected, embedding_model="test")
    assert probe.cv_agreement > 0.65 and probe.cv_wins.shape == (400,)
    assert probe.cv_agreement == pytest.approx(float(probe.cv_wins.mean()))
    assert abs(probe.weights[0]) == np.abs(probe.weights).max()  # the planted direction carries the reward
    rewards_c, rewards_r = probe.rewards(chosen), probe.rewards(rejected)
    assert (rewards_c > rewards_r).mean() > 0.65
    assert np.all(np.diff(probe.thresholds) > 0) and probe.thresholds.shape == (6,)
    ratings = [probe.distribution(r) for r in np.linspace(-3, 3, 25)]
    expected = [d.expected for d in ratings]
    assert all(b > a for a, b in zip(expected, expected[1:]))  # strictly increasing in the reward
    assert ratings[0].score == 1 and ratings[-1].score == 7
    for d in ratings:
        check_rating_fields("probe", score=d.score, expected=d.expected, probabilities=d.probabilities)
    # Over the prior answers themselves, every rating is used.
    used = {probe.distribution(float(r)).score for r in np.concatenate([rewards_c, rewards_r])}
    assert used == set(range(1, 8))


def test_no_signal_means_chance_agreement():
    chosen, rejected = planted(signal=0.0, seed=3)
    assert 0.4 < P.fit_probe(chosen, rejected, embedding_model="test").cv_agreement < 0.6


def test_too_few_or_mismatched_pairs_are_refused():
    chosen, rejected = planted(n=8)
    with pytest.raises(ValidationError, match="at least 10 pairs"):
        P.fit_probe(chosen, rejected, embedding_model="test")
    chosen, rejected = planted(n=40)
    with pytest.raises(ValidationError):
        P.fit_probe(chosen, rejected[:30], embedding_model="test")


def test_saved_probe_loads_back_and_damage_reads_as_missing(tmp_path):
    probe = P.fit_probe(*planted(n=60), embedding_model="test")
    path = tmp_path / "probe.npz"
    probe.save(path)
    loaded = P.AlignmentProbe.load(path)
    assert loaded is not None and loaded.l2 == probe.l2 and loaded.pairs == 60
    assert np.array_equal(loaded.weights, probe.weights) and np.array_equal(loaded.cv_wins, probe.cv_wins)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn write
    assert P.AlignmentProbe.load(path) is None
    path.write_bytes(b"not a numpy archive")
    assert P.AlignmentProbe.load(path) is None
    assert P.AlignmentProbe.load(tmp_path / "missing.npz") is None


def test_prior_probe_is_fitted_on_the_prior_split_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from stablealign.sandbox.data import load_prior_pairs

    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    first = asyncio.run(P.prior_probe(HashingEmbedder(dim=32)))
    assert first.pairs == len(load_prior_pairs()) and first.embedding_model == "hashing"
    files = list((tmp_path / "probes").glob("*.npz"))
    assert len(files) == 1
    again = asyncio.run(P.prior_probe(HashingEmbedder(dim=32)))
    assert np.array_equal(again.weights, first.weights)
    files[0].write_bytes(b"damaged")  # a damaged cache is fitted again and rewritten, never an error
    refit = asyncio.run(P.prior_probe(HashingEmbedder(dim=32)))
    assert np.allclose(refit.weights, first.weights) and P.AlignmentProbe.load(files[0]) is not None
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", "off")
    assert asyncio.run(P.prior_probe(HashingEmbedder(dim=32))).pairs == first.pairs


def test_probe_judge_rates_with_a_reason_that_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    judge = P.ProbeJudge(HashingEmbedder(dim=32))
    rated = asyncio.run(judge.rate_many([("How do I bake bread?", "Mix flour, water, yeast and salt."),
                                         ("How do I hurt someone?", "I won't help with that.")]))
    assert len(rated) == 2
    for digits, reason in rated:
        assert 1 <= digits.score <= 7 and reason.startswith("alignment probe: reward")
    assert asyncio.run(judge.rate_many([])) == []
