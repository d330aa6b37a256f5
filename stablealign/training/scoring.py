"""Summed log-likelihoods of responses, each prompt computed once for all the responses that share it.

Why: evaluation scores pairs of answers to one dialogue (HH-RLHF chosen and rejected), and the
dialogue is most of the tokens. Scoring each (prompt, response) row on its own computes every
prompt twice and runs the output head over every prompt position only to throw those logits away.
Here unique prompts are prefilled together (left-padded, so every prompt ends in the same column),
the cache is gathered to one row per response, and the responses are run after it; the output head
and its log-softmax see only the positions that predict a response token.

The figures are those of one full forward over ``prompt + response`` up to float rounding (batched
matmuls sum in another order); ``tests/unit/test_scoring.py`` holds them to the plain computation.
A model whose decoder or output head cannot be reached this way (no ``base_model`` or no output
embeddings) is scored with full forwards instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from stablealign.core.batches import by_token_budget

# Padded tokens per forward: bounds the memory of a batch whatever the lengths.
DEFAULT_TOKEN_BUDGET = 4096
# Output-head rows per log-softmax: a [rows, vocabulary] float32 block at a time.
HEAD_ROWS = 512


def scoring_autocast(bf16: bool, device: Any) -> AbstractContextManager:
    """bf16 autocast over scoring where ``device`` multiplies bf16 natively (CUDA with bf16, a CPU with
    AVX512-BF16 or AMX), else float32. Why optional: it halves the time of scoring long dialogues, but
    each summed log-likelihood then differs from float32's by rounding (docs/alignment.md has how much),
    and a comparison of two models should be scored one way."""
    import torch

    from stablealign.llm.backends.batching import bf16_native_on

    kind = torch.device(device).type
    if not (bf16 and bf16_native_on(kind)):
        return nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


def _head_logprobs(head: Any, hidden: Any, targets: Any) -> Any:
    """log p(target) of each hidden state, the output head run ``HEAD_ROWS`` states at a time."""
    import torch

    out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), HEAD_ROWS):
        logits = head(hidden[start: start + HEAD_ROWS]).float()
        picked = logits.gather(1, targets[start: start + HEAD_ROWS, None]).squeeze(1)
        out[start: start + HEAD_ROWS] = picked - torch.logsumexp(logits, dim=-1)
    return out


def response_logprobs(model: Any, encoded: Sequence[tuple[list[int], int]], pad_id: int, *,
                      token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each row's response, for rows ``(ids, prompt_length)``:
    the tokens ``ids[prompt_length:]`` given ``ids[:prompt_length]`` (``prompt_length >= 1``)."""
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    windowed = getattr(getattr(model, "config", None), "sliding_window", None) is not None
    if decoder is None or decoder is model or head is None or windowed:
        return _full_forward_logprobs(model, encoded, pad_id, token_budget)
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for index, (ids, prompt_len) in enumerate(encoded):
        rows_of.setdefault(tuple(ids[:max(1, prompt_len)]), []).append(index)
    values: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for batch in by_token_budget(sorted(rows_of, key=len), len, token_budget):
        _score_batch(decoder, head, batch, rows_of, encoded, pad_id, values, token_budget)
    return values


def _gathered_cache(cache: Any, index: Any) -> Any:
    """A new cache holding rows ``index`` of ``cache`` (the prompt's keys and values per response)."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                         for layer in cache.layers])


def _score_batch(decoder: Any, head: Any, prompts: Sequence[tuple[int, ...]],
                 rows_of: dict[tuple[int, ...], list[int]], encoded: Sequence[tuple[list[int], int]],
                 pad_id: int, values: list[tuple[float, int]], token_budget: int) -> None:
    """One forward over the batch's prompts, then its responses in batches of similar length."""
    import torch

    device = head.weight.device
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for b, prompt in enumerate(prompts):  # left padding: every prompt ends in the last column
        prompt_ids[b, width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[b, width - len(prompt):] = 1
    prompt_mask = prompt_mask.to(device)
    prompt_lengths = prompt_mask.sum(-1)
    with torch.no_grad():
        out = decoder(input_ids=prompt_ids.to(device), attention_mask=prompt_mask,
                      position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        last_hidden = out.last_hidden_state[:, -1]  # predicts each response's first token
        prompt_cache = out.past_key_values
        rows = sorted(((b, index) for b, prompt in enumerate(prompts) for index in rows_of[prompt]),
                      key=lambda row: len(encoded[row[1]][0]) - max(1, encoded[row[1]][1]))

        def response(row: tuple[int, int]) -> list[int]:
            ids, prompt_len = encoded[row[1]]
            return ids[max(1, prompt_len):]

        for part in by_token_budget(rows, lambda row: len(response(row)), token_budget):
            responses = [response(row) for row in part]
            length = max(len(r) for r in responses)
            prompt_of_row = torch.tensor([b for b, _ in part], device=device)
            response_ids = torch.full((len(part), length), pad_id, dtype=torch.long)
            response_mask = torch.zeros_like(response_ids)
            for r, tokens in enumerate(responses):
                response_ids[r, : len(tokens)] = torch.tensor(tokens)
                response_mask[r, : len(tokens)] = 1
            hidden = decoder(
                input_ids=response_ids.to(device),
                attention_mask=torch.cat([prompt_mask.index_select(0, prompt_of_row), response_mask.to(device)], 1),
                position_ids=prompt_lengths.index_select(0, prompt_of_row)[:, None]
                + torch.arange(length, device=device)[None, :],
                past_key_values=_gathered_cache(prompt_cache, prompt_of_row), use_cache=True).last_hidden_state
            # Row r's scored states: its prompt's last one, then its response's own but the last.
            states, targets, owner = [], [], []
            for r, tokens in enumerate(responses):
                states.append(last_hidden[part[r][0]: part[r][0] + 1])
                states.append(hidden[r, : len(tokens) - 1])
                targets.extend(tokens)
                owner.extend([r] * len(tokens))
            logprobs = _head_logprobs(head, torch.cat(states), torch.tensor(targets, device=device))
            sums = torch.zeros(len(part), dtype=torch.float32, device=device).index_add(
                0, torch.tensor(owner, device=device), logprobs)
            for r, (_, index) in enumerate(part):
                values[index] = (float(sums[r]), len(responses[r]))


def _full_forward_logprobs(model: Any, encoded: Sequence[tuple[list[int], int]], pad_id: int,
                           token_budget: int) -> list[tuple[float, int]]:
    """The plain computation: one forward over each ``prompt + response``, right-padded, by length."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    values: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for rows in by_token_budget(order, lambda i: len(encoded[i][0]), token_budget):
        width = max(len(encoded[i][0]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, index in enumerate(rows):
            ids = encoded[index][0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        with torch.no_grad():
            logprobs = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             use_cache=False).logits.float().log_softmax(-1)
        for row, index in enumerate(rows):
            ids, prompt_len = encoded[index]
            prompt_len = max(1, prompt_len)
            targets = torch.tensor(ids[prompt_len:], device=device)
            picked = logprobs[row, prompt_len - 1: len(ids) - 1].gather(1, targets[:, None])
            values[index] = (float(picked.sum()), len(ids) - prompt_len)
    return values
