"""Intervals and pairwise wins for evaluation and the judge's agreement (numpy only, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def win(better: float, worse: float, tolerance: float = 0.0) -> float:
    """1 when ``better`` is above ``worse``, 0 below, 1/2 within ``tolerance`` (a tie)."""
    if abs(better - worse) <= tolerance:
        return 0.5
    return 1.0 if better > worse else 0.0


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile 95 % bootstrap interval of the mean of ``values`` (None for fewer than 2)."""
    import numpy as np

    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_difference(base: Sequence[float | None], trained: Sequence[float | None], *, resamples: int = 2000,
                      seed: int = 0) -> dict[str, Any] | None:
    """Mean of trained - base over items both have, with a paired percentile 95 % bootstrap interval."""
    pairs = [(b, t) for b, t in zip(base, trained) if b is not None and t is not None]
    if len(pairs) < 2:
        return None
    diffs = [t - b for b, t in pairs]
    return {"delta": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs, resamples=resamples, seed=seed),
            "items": len(diffs)}


def format_figure(value: object, ci: object = None, digits: int = 3) -> str:
    """``0.637 [0.580, 0.690]``: a figure with its interval as reports print it; ``-`` when there is none."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    text = f"{value:.{digits}f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text
