"""Inference with the shared template: the same prompt a model was trained on (``template.py``).

The original generated with a different prompt format than it trained with; here prompts are
encoded by ``template.encode_prompt`` exactly as in training, left-padded for batched generation,
and the answer is the decoded new tokens, cut at EOS or at a new ``Human:`` turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stablealign.llm.prompt_format import cut_at_stop
from stablealign.training.template import encode_prompt
from stablealign.training.train import check_model_path


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer with a pad token); ValidationError if no model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_path(str(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if pick_device(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(pick_device(device))
    model.eval()
    return model, tokenizer


def cut_answer(text: str) -> str:
    """The answer up to a new ``Human:`` turn (the prompt format's stop sequence)."""
    return cut_at_stop(text)


def generate(model: Any, tokenizer: Any, queries: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Answers to ``queries`` (greedy when temperature is 0; seeded sampling otherwise). An evaluation's
    questions go in one batch: a decoding step over 32 rows costs little more than over 8."""
    import torch

    answers: list[str] = []
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    max_prompt = max(8, int(getattr(model.config, "max_position_embeddings", 2048)) - max_new_tokens)
    for start in range(0, len(queries), batch_size):
        prompts = [encode_prompt(tokenizer, q)[-max_prompt:] for q in queries[start: start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row in output[:, width:]:
            answers.append(cut_answer(tokenizer.decode(row, skip_special_tokens=True)))
    return answers
