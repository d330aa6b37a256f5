"""The Stable Alignment loss (DESIGN §1), vectorised over B groups × N responses.

For one group with real responses i (scores s_i, per-response token-mean cross-entropy L_i) and
best response b = the FIRST index of the maximal score:

    m_i  = margin * (s_b - s_i) / rating_scale         (each response's OWN score s_i)
    D    = mean_{i != b} (L_b - L_i + m_i)             (max when max_flow; D = 0 if n = 1)
    loss = L_b + ratio * max(0, D)

and a batch averages over its groups. Why a pure function with a mask instead of the original's
loop inside ``Trainer.compute_loss``: it runs any batch size in one call (the original needed batch
1), it is unit-tested against a plain per-group reference, and padded slots are excluded with
``torch.where`` (not multiplication), so a NaN/inf in a padded slot neither leaks into the value nor
into the gradient. The original's margin read ``sorted_ratings[idx]`` (a score looked up by an
index into the *unsorted* list) and hard-coded CUDA; neither defect is reproduced here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class StableAlignmentLossOutput(NamedTuple):
    """The loss and its two parts (``loss = sft + penalty``), each averaged over the B groups."""

    loss: torch.Tensor
    sft: torch.Tensor  # mean L_b
    penalty: torch.Tensor  # mean ratio * max(0, D)


def stable_alignment_loss_parts(
    response_losses: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
    margin: float = 10.0, ratio: float = 0.2, rating_scale: float = 7.0, max_flow: bool = False,
) -> StableAlignmentLossOutput:
    """Like ``stable_alignment_loss`` but also returns the SFT and penalty parts (for logging)."""
    if response_losses.dim() != 2 or scores.shape != response_losses.shape or mask.shape != response_losses.shape:
        raise ValueError(f"expected response_losses, scores and mask of one shape [B, N]; got "
                         f"{tuple(response_losses.shape)}, {tuple(scores.shape)}, {tuple(mask.shape)}")
    if rating_scale <= 0:
        raise ValueError("rating_scale must be > 0")
    mask = mask.to(device=response_losses.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"groups {empty} have no real response")
    losses = response_losses
    scores = scores.to(device=losses.device, dtype=losses.dtype)
    neg_inf = torch.tensor(float("-inf"), device=losses.device, dtype=losses.dtype)
    zero = torch.zeros((), device=losses.device, dtype=losses.dtype)

    # Best response: first index of the max score among real ones (argmax returns the first).
    masked_scores = torch.where(mask, scores, neg_inf)
    best = masked_scores.argmax(dim=1, keepdim=True)  # [B, 1]
    best_loss = losses.gather(1, best)  # [B, 1]
    best_score = scores.gather(1, best)  # [B, 1]

    others = mask.clone()
    others.scatter_(1, best, False)  # real responses other than the best
    safe_scores = torch.where(mask, scores, zero)
    safe_losses = torch.where(mask, losses, zero)
    terms = best_loss - safe_losses + margin * (best_score - safe_scores) / rating_scale  # [B, N]
    count = others.sum(dim=1)  # [B]
    if max_flow:
        diff = torch.where(others, terms, neg_inf).amax(dim=1)
    else:
        diff = torch.where(others, terms, zero).sum(dim=1) / count.clamp(min=1).to(losses.dtype)
    diff = torch.where(count > 0, diff, zero)  # D = 0 for a single-response group
    penalty = ratio * torch.clamp(diff, min=0.0)
    sft = best_loss.squeeze(1)
    return StableAlignmentLossOutput((sft + penalty).mean(), sft.mean(), penalty.mean())


def stable_alignment_loss(
    response_losses: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
    margin: float = 10.0, ratio: float = 0.2, rating_scale: float = 7.0, max_flow: bool = False,
) -> torch.Tensor:
    """The scalar Stable Alignment loss averaged over the B groups (the DESIGN §3 contract).

    ``response_losses[B, N]``: per-response token-mean cross-entropy; ``scores[B, N]``: ratings;
    ``mask[B, N]`` (bool): True for real responses. Padded slots contribute nothing and get no
    gradient. A group with no real response raises ``ValueError``.
    """
    return stable_alignment_loss_parts(response_losses, scores, mask, margin=margin, ratio=ratio,
                                       rating_scale=rating_scale, max_flow=max_flow).loss


def per_response_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of each row over its response tokens only: ``[M, T, V] -> [M]``.

    ``labels`` hold ``-100`` on prompt and padding positions; the usual causal shift is applied
    (logits at t predict token t+1). All rows go through ONE cross-entropy call; a row without any
    response token (a padded slot) gets 0. Computed in float32 whatever the logits' dtype.
    """
    # Shift the labels, not the logits: ``logits[:, :-1]`` is a non-contiguous view whose reshape
    # would copy the whole [M, T, V] tensor. Then only the scored positions (response tokens) go
    # through the float32 log-softmax: in a padded batch, prompt and padding positions would cost as
    # much again for values that are thrown away.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    scored = torch.nonzero(shift_labels != IGNORE_INDEX).squeeze(1)
    token_losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).index_select(0, scored).float(),
                                   shift_labels.index_select(0, scored), reduction="none")
    rows = torch.div(scored, labels.size(1), rounding_mode="floor")
    sums = torch.zeros(labels.size(0), dtype=token_losses.dtype, device=token_losses.device).index_add(
        0, rows, token_losses)
    counts = torch.bincount(rows, minlength=labels.size(0))
    return sums / counts.clamp(min=1).to(sums.dtype)


def grouped_response_losses(logits: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """``per_response_token_loss`` reshaped to ``[B, N]`` for ``B = groups`` (rows are group-major)."""
    per_row = per_response_token_loss(logits, labels)
    if per_row.numel() % groups:
        raise ValueError(f"{per_row.numel()} rows do not split into {groups} groups")
    return per_row.view(groups, -1)


def response_logits_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the first one that predicts a response token.

    Prompt positions before every response's start predict nothing that is scored, so computing
    their logits (a ``[T, vocab]`` matmul and a float32 log-softmax each) is wasted work; models
    that take ``logits_to_keep`` skip it.
    """
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    positions = torch.nonzero(scored)
    if positions.numel() == 0:
        return labels.size(1)
    return labels.size(1) - int(positions[0])


def model_takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """True for transformers causal LMs whose forward accepts ``logits_to_keep`` (Llama, Mistral, Qwen...)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def batch_response_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                          logits_to_keep: bool) -> torch.Tensor:
    """``[B, N]`` per-response token-mean losses of a collated batch in ONE forward pass.

    With ``logits_to_keep`` only the window of positions that predict response tokens gets logits;
    the labels are cut to the same window, so the values equal the full computation.
    """
    groups = batch["mask"].size(0)
    labels = batch["labels"]
    kwargs = {}
    if logits_to_keep:
        keep = response_logits_window(labels)
        kwargs["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **kwargs).logits
    return grouped_response_losses(logits, labels, groups)
