"""Batches of alignment groups for ONE padded forward pass over all their responses.

Per group, up to ``num_comp`` responses are sampled (the best one always kept; the original
sampled blindly and could drop it), each tokenised as prompt + response + EOS with the shared
template (``template.encode_example``), prompt tokens masked out of the labels. The batch is laid
out group-major, ``[B * N, T]`` with ``N`` the most responses any group of the batch kept; slots of
groups with fewer responses are padding rows (``mask`` False, labels all -100; one attended token
so that no attention row is empty).

Sampling is seeded and *stateless*: the generator of a group is seeded from (seed, epoch, the
group's index in the data set), so a resumed job samples exactly what an unbroken one would have,
whatever order or process the group lands in.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stablealign.training.data import AlignmentGroup
from stablealign.training.loss import IGNORE_INDEX
from stablealign.training.template import encode_example


def best_index(scores: Sequence[float]) -> int:
    """First index of the maximal score (the loss's definition of the best response)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def sample_responses(scores: Sequence[float], num_comp: int, rng: random.Random) -> list[int]:
    """Indices of up to ``num_comp`` responses, always including the best, in their original order."""
    if num_comp < 1:
        raise ValueError("num_comp must be >= 1")
    if len(scores) <= num_comp:
        return list(range(len(scores)))
    best = best_index(scores)
    others = [i for i in range(len(scores)) if i != best]
    return sorted([best, *rng.sample(others, num_comp - 1)])


def _as_group(item: Any) -> tuple[int | None, AlignmentGroup]:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], AlignmentGroup):
        return item[0], item[1]
    if isinstance(item, AlignmentGroup):
        return None, item
    if isinstance(item, Mapping):
        return None, AlignmentGroup(str(item["query"]), tuple(item["responses"]),
                                    tuple(float(s) for s in item["scores"]))
    raise TypeError(f"cannot collate {type(item).__name__}")


@dataclass
class AlignmentCollator:
    """``collator(items) -> dict`` of tensors; items are groups or ``(index, group)`` pairs."""

    tokenizer: Any
    max_length: int = 360
    num_comp: int = 3
    seed: int = 42
    pad_to_multiple_of: int | None = None
    epoch: int = 0  # set by the trainer at each epoch: part of the sampling seed
    truncated: int = field(default=0, init=False)  # examples cut to max_length so far
    _fallback: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_comp < 1 or self.max_length < 2:
            raise ValueError("num_comp must be >= 1 and max_length >= 2")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self._fallback = random.Random(self.seed)

    def _rng(self, index: int | None) -> random.Random:
        if index is None:  # no dataset index: a plain seeded stream
            return self._fallback
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("empty batch")
        chosen: list[tuple[AlignmentGroup, list[int]]] = []
        for item in items:
            index, group = _as_group(item)
            chosen.append((group, sample_responses(group.scores, self.num_comp, self._rng(index))))
        n_max = max(len(idx) for _, idx in chosen)
        rows: list[list[int]] = []
        prompt_lengths: list[int] = []
        mask = torch.zeros(len(chosen), n_max, dtype=torch.bool)
        scores = torch.zeros(len(chosen), n_max, dtype=torch.float32)
        for g, (group, indices) in enumerate(chosen):
            for slot in range(n_max):
                if slot < len(indices):
                    i = indices[slot]
                    ids, prompt_len, cut = encode_example(self.tokenizer, group.query, group.responses[i],
                                                          self.max_length)
                    self.truncated += int(cut)
                    rows.append(ids)
                    prompt_lengths.append(prompt_len)
                    mask[g, slot] = True
                    scores[g, slot] = float(group.scores[i])
                else:
                    rows.append([])
                    prompt_lengths.append(0)
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, prompt_len) in enumerate(zip(rows, prompt_lengths)):
            if not ids:  # a padding slot: one attended pad token, nothing to learn
                attention_mask[r, 0] = 1
                continue
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, : len(ids)] = 1
            labels[r, prompt_len: len(ids)] = input_ids[r, prompt_len: len(ids)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "mask": mask, "scores": scores}
