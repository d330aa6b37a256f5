"""Training benchmark: our Stable Alignment step against the original's formulation (tiny model, CPU).

    python -m bench.training [--groups 128] [--batch 8] [--max-length 128] [--out FILE]

Same model (a tiny random Llama built here), same groups (3 responses each, from HH-RLHF answers),
same tokenisation (our collator) and the same optimizer; only the step differs:

- ours: ``batch`` groups per micro-batch, all their responses in ONE padded forward pass, the
  per-response cross-entropy in ONE call, the loss vectorised over groups
  (``stablealign.training.loss``);
- the original's (``stable_alignment/alignment.py``): batch size 1 (one group per forward), one
  ``CrossEntropyLoss`` call per response in a Python loop, the penalty in a Python loop, gradient
  accumulation over ``batch`` groups so both take the same optimizer steps. Its margin read
  ``sorted_ratings[idx]`` (an index into the unsorted scores used on the sorted ones); that bug is
  FIXED here (each response's own score) and ties are broken by a stable sort (first index wins),
  so the two compute the same number.

Reported: tokens/s (real prompt + response tokens through forward + backward + optimizer step),
measured in one process with the two formulations' steps interleaved (so load from other processes
on a shared machine hits both alike); peak RSS of each formulation, from a separate spawned
process per formulation (with its stand-alone time, "s alone"); the ratio; and the max |Δ loss|
between the two on the same parameters and groups (must be < 1e-5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARGIN, RATIO, RATING_SCALE = 10.0, 0.2, 7.0


def make_groups(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Groups of 3 HH-RLHF answers with distinct ratings (query = the question)."""
    from stablealign.sandbox.data import load_hh_pairs

    pairs = load_hh_pairs()
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        p, q = pairs[i], pairs[(i + 7) % len(pairs)]
        scores = rng.sample(range(1, 8), 3)
        groups.append({"query": p.question, "responses": [p.chosen, p.rejected, q.chosen], "scores": scores})
    return groups


def original_group_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The original's ``compute_loss`` + ``stable_alignment`` for ONE group (batch size 1), margin fixed."""
    import torch
    from torch.nn import CrossEntropyLoss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    scores = batch["scores"][0]
    sorted_ratings, indices = torch.sort(scores, descending=True, stable=True)
    best_idx, best_score = indices[0], sorted_ratings[0]
    loss_fct = CrossEntropyLoss(ignore_index=-100)
    batch_losses = []
    for logit, label in zip(shift_logits, shift_labels):  # one cross-entropy call per response
        batch_losses.append(loss_fct(logit.view(-1, logits.size(-1)).float(), label.view(-1)))
    batch_loss = torch.stack(batch_losses, dim=0)
    min_loss = batch_loss[best_idx]
    neg_losses = []
    for idx in indices[1:]:
        margin = (best_score - scores[idx]) / RATING_SCALE * MARGIN  # FIXED: the response's own score
        neg_losses.append(min_loss - batch_loss[idx] + margin)
    if neg_losses:
        diff = torch.clamp(torch.stack(neg_losses).mean(), min=0.0)
    else:
        diff = torch.zeros((), dtype=min_loss.dtype)
    return min_loss + RATIO * diff


def ours_loss(model: Any, batch: dict[str, Any]) -> Any:
    from stablealign.training.loss import (
        batch_response_losses,
        model_takes_logits_to_keep,
        stable_alignment_loss,
    )

    losses = batch_response_losses(model, batch, logits_to_keep=model_takes_logits_to_keep(model))
    return stable_alignment_loss(losses, batch["scores"], batch["mask"], margin=MARGIN, ratio=RATIO,
                                 rating_scale=RATING_SCALE)


def _setup(model_dir: str, groups: list[dict[str, Any]], max_length: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stablealign.training.collator import AlignmentCollator
    from stablealign.training.data import AlignmentGroup

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    collator = AlignmentCollator(tokenizer, max_length=max_length, num_comp=3, seed=0)
    items = [(i, AlignmentGroup(g["query"], tuple(g["responses"]), tuple(float(s) for s in g["scores"])))
             for i, g in enumerate(groups)]
    # The trainer's data order (seeded shuffle, length-grouped): both formulations see the same groups
    # in the same optimizer steps.
    from stablealign.training.train import DataPlan, group_length

    plan = DataPlan(len(items), 8, 1, 1, 0, lengths=tuple(group_length(g) for _, g in items))
    items = [items[i] for i in plan.permutation(0)]
    return model, collator, items


def _real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["attention_mask"][batch["mask"].flatten()].sum())


def _plan(kind: str, collator: Any, items: list, batch: int) -> list[list[dict[str, Any]]]:
    """Micro-batches of each optimizer step: ours one per step, the original's one per group."""
    if kind == "ours":
        return [[collator(items[s: s + batch])] for s in range(0, len(items), batch)]
    return [[collator([item]) for item in items[s: s + batch]] for s in range(0, len(items), batch)]


def _train_step(kind: str, model: Any, optimizer: Any, micro_batches: list[dict[str, Any]]) -> int:
    loss_fn = ours_loss if kind == "ours" else original_group_loss
    tokens = 0
    for mb in micro_batches:
        loss = loss_fn(model, mb) / len(micro_batches)
        loss.backward()
        tokens += _real_tokens(mb)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def run_formulation(kind: str, model_dir: str, groups: list[dict[str, Any]], batch: int, max_length: int,
                    queue: Any) -> None:
    """One formulation alone in a fresh process, for its peak RSS (and a stand-alone time)."""
    import torch

    model, collator, items = _setup(model_dir, groups, max_length)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = _plan(kind, collator, items, batch)
    started = time.perf_counter()
    tokens = sum(_train_step(kind, model, optimizer, s) for s in steps)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"tokens": tokens, "seconds_alone": seconds, "peak_rss_mib": peak_kib / 1024})


def interleaved_throughput(model_dir: str, groups: list[dict[str, Any]], batch: int,
                           max_length: int) -> dict[str, dict[str, float]]:
    """Both formulations in this process, their optimizer steps alternating (order flipped every step),
    so that load from other processes on a shared machine hits both alike."""
    import copy

    import torch

    model, collator, items = _setup(model_dir, groups, max_length)
    model.train()
    models = {"original": model, "ours": copy.deepcopy(model)}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    plans = {k: _plan(k, collator, items, batch) for k in models}
    for kind in models:  # warm-up (allocator, kernels); not timed
        _train_step(kind, models[kind], optimizers[kind], plans[kind][0])
    totals = {k: {"tokens": 0, "seconds": 0.0} for k in models}
    for step in range(len(plans["ours"])):
        order = ("original", "ours") if step % 2 == 0 else ("ours", "original")
        for kind in order:
            started = time.perf_counter()
            totals[kind]["tokens"] += _train_step(kind, models[kind], optimizers[kind], plans[kind][step])
            totals[kind]["seconds"] += time.perf_counter() - started
    for kind, row in totals.items():
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        row["optimizer_steps"] = len(plans[kind])
    return totals


def loss_difference(model_dir: str, groups: list[dict[str, Any]], batch: int, max_length: int) -> float:
    """max |Δ loss| of the two formulations on the same parameters and groups (no update in between)."""
    import torch

    model, collator, items = _setup(model_dir, groups, max_length)
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for s in range(0, len(items), batch):
            chunk = items[s: s + batch]
            ours = float(ours_loss(model, collator(chunk)))
            original = sum(float(original_group_loss(model, collator([item]))) for item in chunk) / len(chunk)
            worst = max(worst, abs(ours - original))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="groups per optimizer step (ours: per forward)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch < 4:
        parser.error("--batch must be >= 4 (the target is stated at batch >= 4)")

    from rich.console import Console
    from rich.table import Table

    from stablealign_app.tinymodel import build_tiny_model

    console = Console()
    groups = make_groups(args.groups)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny", seed=0))
        delta = loss_difference(model_dir, groups, args.batch, args.max_length)
        results = interleaved_throughput(model_dir, groups, args.batch, args.max_length)
        ctx = mp.get_context("spawn")  # a fresh process each: peak RSS per formulation
        for kind in ("original", "ours"):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_formulation, args=(kind, model_dir, groups, args.batch, args.max_length, queue))
            proc.start()
            results[kind].update(queue.get(timeout=300))
            proc.join(timeout=60)
    ratio = results["ours"]["tokens_per_second"] / results["original"]["tokens_per_second"]
    table = Table(title=f"Stable Alignment step, tiny Llama on CPU: {args.groups} groups x 3 responses, "
                        f"{args.batch} groups per optimizer step")
    for column in ("formulation", "tokens/s", "seconds", "tokens", "steps", "peak RSS MiB", "s alone"):
        table.add_column(column, justify="right" if column != "formulation" else "left")
    names = {"original": "original: batch 1, CE per response", "ours": f"ours: batch {args.batch}, one forward"}
    for kind in ("original", "ours"):
        r = results[kind]
        table.add_row(names[kind], f"{r['tokens_per_second']:.0f}", f"{r['seconds']:.2f}", str(r["tokens"]),
                      str(r["optimizer_steps"]), f"{r['peak_rss_mib']:.0f}", f"{r['seconds_alone']:.2f}")
    console.print(table)
    console.print(f"speed-up (tokens/s ours / original): {ratio:.2f}x  (target >= 2x)")
    console.print(f"max |Δ loss| between the formulations: {delta:.2e}  (must be < 1e-5)")
    summary = {"results": results, "speedup": ratio, "max_abs_loss_delta": delta, "groups": args.groups,
               "batch": args.batch, "max_length": args.max_length}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if delta < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
