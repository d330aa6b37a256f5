"""Text that repeats itself: the sign of a small model caught in a loop.

Why its own module: the same measure guards two places. ``data build`` keeps looping responses out
of what a model imitates (a small judge can rate "The answer is not. The answer is not. ..." highly,
and a model fine-tuned on its own loops loops more), and ``eval`` reports how much of a model's
answers repeat themselves, so that a judge-rated gain bought by looping is seen for what it is.
"""

from __future__ import annotations

# Above this share of repeated word 3-grams a response counts as a loop (``data build --max-repeated``).
DEFAULT_MAX_REPEATED = 0.3


def repeated_share(text: str, n: int = 3) -> float:
    """Share of an answer's word n-grams that repeat an earlier n-gram of the same answer: 0 for
    text that never repeats itself, towards 1 for a model that loops ("sorry sorry sorry ...")."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def loops(text: str, max_repeated: float = DEFAULT_MAX_REPEATED) -> bool:
    """Whether ``text`` repeats more of itself than ``max_repeated`` allows."""
    return repeated_share(text) > max_repeated
