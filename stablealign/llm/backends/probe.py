"""The alignment probe: a judge fitted to human preference, for the observer's alignment ratings.

Why it exists: a small chat model cannot tell the chosen from the rejected answer of an HH-RLHF
harmless pair when asked for a 1-7 rating — every prompt, reading and ensemble we tried with
SmolLM2-135M agrees with the human label about half the time (docs/judge.md) — so ratings that
train a model would carry no signal. The probe is a linear Bradley-Terry reward on frozen sentence
embeddings (all-MiniLM-L6-v2 of ``question [SEP] answer`` and of the answer alone, side by side: the
pair chosen by cross-validation on the prior split over either alone and over added length) fitted on
the *prior split* of the HH-RLHF harmless pairs only; evaluation pairs are never seen
(``stablealign.sandbox.data.HH_SPLIT_RULE``).

Fitting: features standardised, logistic regression on (chosen - rejected) feature differences in
both orders, no intercept, solved by Newton's method; the L2 strength is chosen by 5-fold
cross-validation over pairs of the prior split. The reward is then read as a rating on the shared
1..7 scale by a cumulative-logit model whose thresholds are the sevenths of the rewards of the prior
split's answers: a rating distribution P(1..7) (argmax = the rating, expectation strictly increasing
in the reward), so records keep their format. A fitted probe is cached on disk (keyed by the data,
the embedding model and this module's fitting constants) and re-fitted when any of them changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.backends.base import DigitDistribution, Embedder

log = get_logger(__name__)

PROBE_NAME = "alignment-probe"
L2_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FOLDS = 5
NEWTON_STEPS = 25
SCALE = 7
# Width of the cumulative-logit rating distribution, in standard deviations of the prior rewards.
RATING_WIDTH = 0.25
FIT_VERSION = 3  # bump when the fitting or reading changes: cached probes of another version are re-fitted


def probe_texts(question: str, answer: str) -> tuple[str, str]:
    """The two texts the probe embeds: the question with the answer (question first, so truncation
    cuts the answer's tail) and the answer alone."""
    return f"{question.strip()} [SEP] {answer.strip()}", answer.strip()


async def probe_features(embedder: Embedder, items: Sequence[tuple[str, str]], *, cached: bool = False) -> np.ndarray:
    """The probe's features of (question, answer) items: both texts' embeddings side by side."""
    from stablealign.llm.backends.embeddings import embed_cached

    texts = [text for q, a in items for text in probe_texts(q, a)]
    vectors = await (embed_cached(embedder, texts) if cached else embedder.embed(texts))
    return np.asarray(vectors).reshape(len(items), -1)


def _fit_bt(diffs: np.ndarray, l2: float) -> np.ndarray:
    """Weights of a logistic model P(chosen > rejected) = sigmoid(w . (f_c - f_r)), both orders, L2."""
    x = np.concatenate([diffs, -diffs])
    y = np.concatenate([np.ones(len(diffs)), np.zeros(len(diffs))])
    w = np.zeros(x.shape[1])
    eye = np.eye(x.shape[1])
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / len(y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * eye
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


def _wins(rewards_chosen: np.ndarray, rewards_rejected: np.ndarray) -> np.ndarray:
    return np.where(rewards_chosen > rewards_rejected, 1.0, np.where(rewards_chosen == rewards_rejected, 0.5, 0.0))


@dataclass(frozen=True)
class AlignmentProbe:
    """A fitted probe: feature standardisation, reward weights and the rating thresholds."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    thresholds: np.ndarray  # SCALE - 1 increasing rewards: the borders between ratings k and k + 1
    width: float
    l2: float
    pairs: int
    cv_agreement: float  # cross-validated agreement on the prior split at the chosen L2
    embedding_model: str
    cv_wins: np.ndarray  # per prior pair: 1, 1/2 or 0 from the fold model that did not see it

    def rewards(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.weights

    def distribution(self, reward: float) -> DigitDistribution:
        """P(1..7) of a reward under the cumulative-logit reading (module docstring)."""
        above = 1.0 / (1.0 + np.exp(-np.clip((reward - self.thresholds) / self.width, -60, 60)))  # P(Y > k)
        cumulative = np.concatenate([[1.0], above, [0.0]])
        probabilities = np.clip(cumulative[:-1] - cumulative[1:], 0.0, 1.0)
        return DigitDistribution(tuple(float(p) for p in probabilities / probabilities.sum()))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        meta = {"width": self.width, "l2": self.l2, "pairs": self.pairs, "cv_agreement": self.cv_agreement,
                "embedding_model": self.embedding_model, "version": FIT_VERSION}
        with open(tmp, "wb") as handle:
            np.savez(handle, mean=self.mean, std=self.std, weights=self.weights, thresholds=self.thresholds,
                     cv_wins=self.cv_wins, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> AlignmentProbe | None:
        """The probe saved at ``path``; None when it is missing, damaged or of another version."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"].astype(np.uint8)).decode("utf-8"))
                arrays = {k: np.asarray(data[k], dtype=np.float64)
                          for k in ("mean", "std", "weights", "thresholds", "cv_wins")}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
            return None
        if meta.get("version") != FIT_VERSION or arrays["thresholds"].shape != (SCALE - 1,) \
                or arrays["cv_wins"].shape != (int(meta.get("pairs", -1)),):
            return None
        if not all(np.isfinite(a).all() for a in arrays.values()) or not math.isfinite(float(meta["width"])):
            return None
        cv_wins = arrays.pop("cv_wins")
        return cls(**arrays, width=float(meta["width"]), l2=float(meta["l2"]), pairs=int(meta["pairs"]),
                   cv_agreement=float(meta["cv_agreement"]), embedding_model=str(meta["embedding_model"]),
                   cv_wins=cv_wins)


def fit_probe(chosen: np.ndarray, rejected: np.ndarray, *, embedding_model: str, seed: int = 0) -> AlignmentProbe:
    """Fits the probe on the features of chosen and rejected answers of the same pairs (row i of each)."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(chosen) < 2 * FOLDS:
        raise ValidationError(f"the alignment probe needs at least {2 * FOLDS} pairs of equal-shaped features")
    both = np.concatenate([chosen, rejected])
    mean, std = both.mean(axis=0), both.std(axis=0) + 1e-6
    c, r = (chosen - mean) / std, (rejected - mean) / std
    folds = np.random.default_rng(seed).permutation(len(c)) % FOLDS
    scores: dict[float, float] = {}
    out_of_fold: dict[float, np.ndarray] = {}
    for l2 in L2_GRID:
        wins = np.zeros(len(c))
        for fold in range(FOLDS):
            w = _fit_bt(c[folds != fold] - r[folds != fold], l2)
            wins[folds == fold] = _wins(c[folds == fold] @ w, r[folds == fold] @ w)
        scores[l2], out_of_fold[l2] = float(wins.mean()), wins
    l2 = max(L2_GRID, key=lambda value: (scores[value], value))  # ties: the stronger regularisation
    weights = _fit_bt(c - r, l2)
    rewards = np.concatenate([c @ weights, r @ weights])
    thresholds = np.quantile(rewards, [k / SCALE for k in range(1, SCALE)])
    width = max(float(rewards.std()) * RATING_WIDTH, 1e-6)
    log.info("probe.fitted", extra={"pairs": len(c), "l2": l2, "cv_agreement": round(scores[l2], 4),
                                    "cv": {str(k): round(v, 4) for k, v in scores.items()}})
    return AlignmentProbe(mean, std, weights, thresholds, width, l2, len(c), scores[l2], embedding_model,
                          out_of_fold[l2])


def _cache_key(texts_digest: str, embedding_model: str) -> str:
    source = json.dumps({"texts": texts_digest, "embedding": embedding_model, "version": FIT_VERSION,
                         "l2": L2_GRID, "folds": FOLDS, "width": RATING_WIDTH}, sort_keys=True)
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]


async def prior_probe(embedder: Embedder, hh_path: str | Path | None = None) -> AlignmentProbe:
    """The probe fitted on the prior split of the HH-RLHF file (the default file's prior split; a
    user's own file whole, as for agents' priors), from the disk cache when it was fitted before."""
    from stablealign.llm.backends.embeddings import cache_dir
    from stablealign.sandbox.data import last_human_turn, load_prior_pairs

    pairs = load_prior_pairs(hh_path)
    items = [(last_human_turn(p.chosen_dialogue), p.chosen) for p in pairs]
    items += [(last_human_turn(p.rejected_dialogue), p.rejected) for p in pairs]
    model_id = str(getattr(embedder, "model_id", "") or embedder.model)
    digest = hashlib.sha256("\x00".join(q + "\x01" + a for q, a in items).encode("utf-8")).hexdigest()
    root = cache_dir()
    path = root / "probes" / f"{PROBE_NAME}-{_cache_key(digest, model_id)}.npz" if root else None
    if path is not None and path.is_file():
        probe = await asyncio.to_thread(AlignmentProbe.load, path)
        if probe is not None:
            return probe
        log.warning("probe.cache_unreadable", extra={"path": str(path)})
    features = await probe_features(embedder, items, cached=True)
    probe = await asyncio.to_thread(fit_probe, features[: len(pairs)], features[len(pairs):], embedding_model=model_id)
    if path is not None:
        try:
            await asyncio.to_thread(probe.save, path)
        except OSError as exc:  # an unwritable cache costs a re-fit next time, never an error
            log.warning("probe.cache_unwritable", extra={"path": str(path), "error": str(exc)})
    return probe


class ProbeJudge:
    """Alignment ratings from the probe: ``rate(question, answer)`` -> (distribution, reason)."""

    def __init__(self, embedder: Embedder, hh_path: str | Path | None = None) -> None:
        self.embedder = embedder
        self.hh_path = hh_path
        self._probe: AlignmentProbe | None = None
        self._lock = asyncio.Lock()

    async def probe(self) -> AlignmentProbe:
        async with self._lock:
            if self._probe is None:
                self._probe = await prior_probe(self.embedder, self.hh_path)
            return self._probe

    async def rate_many(self, items: Sequence[tuple[str, str]]) -> list[tuple[DigitDistribution, str]]:
        probe = await self.probe()
        if not items:
            return []
        rated = []
        for reward in probe.rewards(await probe_features(self.embedder, items)):
            digits = probe.distribution(float(reward))
            reason = (f"alignment probe: reward {float(reward):+.2f} on a scale fitted to {probe.pairs} human "
                      f"preference pairs (expected rating {digits.expected:.2f})")
            rated.append((digits, reason))
        return rated

    async def rate(self, question: str, answer: str) -> tuple[DigitDistribution, str]:
        return (await self.rate_many([(question, answer)]))[0]

    async def aclose(self) -> None:
        await self.embedder.aclose()
