"""Cutting work into padded batches under a token budget: one rule for generation and scoring."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def by_token_budget(items: Sequence[T], length: Callable[[T], int], budget: int) -> list[list[T]]:
    """``items``, in order of increasing ``length``, cut into consecutive batches that each hold at most
    ``budget`` tokens once padded to their longest (last) item; an item longer than the budget goes alone.

    Why sorted and padded: a batched forward pads every row to the longest, so similar lengths together
    waste the least, and the budget bounds the memory one forward takes."""
    batches: list[list[T]] = []
    current: list[T] = []
    for item in items:
        if current and (len(current) + 1) * length(item) > budget:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches
