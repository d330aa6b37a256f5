"""Evaluation of a base and a trained model, side by side: ``stable-align eval``.

Three measures, each under the shared template (``template.py``), each with a 95 % percentile
bootstrap interval, and for base vs trained the paired difference with its own interval:
- preference accuracy on HH-RLHF harmless-base test pairs of the *eval split* (pairs that were
  never agents' priors, world questions or training text: ``stablealign.data.HH_SPLIT_RULE``):
  does the model give the *chosen* final answer a higher mean log-likelihood per token (EOS
  included, as in training) than the *rejected* one, given the same dialogue prefix? Ties count 1/2.
- mean Stable Alignment loss on the held-out groups (all responses of each group, no sampling).
- with an observer backend, the observer's alignment rating (1..7, through the services' rating
  path: token probabilities where the backend has them) of the model's greedy answers to held-out
  questions (first human turns of the eval split); missing ratings are left out and counted.

Writes ``report.json`` and ``report.png`` (loss curves from ``train_log.jsonl`` beside the trained
model, the measures of base and trained as bars with their intervals, and — given the world's
records — the SANDBOX's per-round mean alignment before and after revision).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stablealign.errors import ValidationError
from stablealign.logs import get_logger
from stablealign.training.template import encode_example
from stablealign.training.train import check_model_path

log = get_logger(__name__)


def hh_split(path: str | Path | None) -> str | None:
    """The default HH-RLHF file is scored on its eval split only (never agents' priors or questions,
    see ``stablealign.data.HH_SPLIT_RULE``); a file of the user's own is scored whole."""
    from stablealign.data import default_prior_path

    if path is None or str(path) == "" or Path(path).resolve() == default_prior_path().resolve():
        return "eval"
    return None


def hh_examples(path: str | Path | None, limit: int | None) -> list[tuple[str, str, str, str]]:
    """(chosen query, chosen answer, rejected query, rejected answer) per HH-RLHF pair.

    The query is the dialogue before the final Assistant turn, written so that ``format_prompt``
    reproduces the HH-RLHF text (``Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:``).
    """
    from stablealign.data import load_hh_pairs, split_dialogue

    def query_of(dialogue: str) -> str:
        turns = split_dialogue(dialogue)[:-1]
        text = turns[0][1]
        for role, content in turns[1:]:
            text += f"\n\n{role}: {content}"
        return text

    pairs = load_hh_pairs(path, hh_split(path))
    pairs = pairs[:limit] if limit else pairs
    return [(query_of(p.chosen_dialogue), p.chosen, query_of(p.rejected_dialogue), p.rejected) for p in pairs]


def _batched_logprob(model: Any, tokenizer: Any, examples: Sequence[tuple[str, str]], max_length: int,
                     batch_size: int) -> list[float]:
    """Mean log-likelihood per response token of each (query, response)."""
    import torch

    from stablealign.training.loss import IGNORE_INDEX, per_response_token_loss

    device = next(model.parameters()).device
    values: list[float] = []
    for start in range(0, len(examples), batch_size):
        encoded = [encode_example(tokenizer, q, r, max_length) for q, r in examples[start: start + batch_size]]
        width = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (ids, prompt_len, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, prompt_len: len(ids)] = input_ids[row, prompt_len: len(ids)]
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            losses = per_response_token_loss(logits, labels.to(device))
        values.extend((-losses).tolist())
    return values


def preference_accuracy(model: Any, tokenizer: Any, hh_path: str | Path | None = None, *, limit: int | None = None,
                        max_length: int = 512, batch_size: int = 16) -> dict[str, Any]:
    examples = hh_examples(hh_path, limit)
    flat = [x for q_c, a_c, q_r, a_r in examples for x in ((q_c, a_c), (q_r, a_r))]
    scores = _batched_logprob(model, tokenizer, flat, max_length, batch_size)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(scores[0::2], scores[1::2])]
    return {"accuracy": sum(wins) / len(wins), "ci95": bootstrap_ci(wins), "pairs": len(examples),
            "split": hh_split(hh_path) or "all",
            "mean_logprob_chosen": sum(scores[0::2]) / len(examples),
            "mean_logprob_rejected": sum(scores[1::2]) / len(examples), "items": wins}


def heldout_loss(model: Any, tokenizer: Any, groups: Sequence[Any], *, max_length: int = 360, batch_size: int = 8,
                 margin: float = 10.0, ratio: float = 0.2, rating_scale: float = 7.0) -> dict[str, Any]:
    """Mean Stable Alignment loss (and its parts) over ``groups``, every response of each group."""
    import torch

    from stablealign.training.collator import AlignmentCollator
    from stablealign.training.loss import batch_response_losses, model_takes_logits_to_keep, stable_alignment_loss_parts

    if not groups:
        return {"groups": 0, "loss": None, "loss/sft": None, "loss/penalty": None}
    device = next(model.parameters()).device
    n_max = max(len(g.responses) for g in groups)
    collator = AlignmentCollator(tokenizer, max_length=max_length, num_comp=n_max, seed=0)
    per_group: list[tuple[float, float, float]] = []
    window = model_takes_logits_to_keep(model)
    for start in range(0, len(groups), batch_size):
        chunk = groups[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collator(list(chunk)).items()}
        with torch.no_grad():
            losses = batch_response_losses(model, batch, logits_to_keep=window)  # the training step's own forward
            for row in range(len(chunk)):  # one group at a time: per-group values for the interval
                parts = stable_alignment_loss_parts(losses[row:row + 1], batch["scores"][row:row + 1],
                                                    batch["mask"][row:row + 1], margin=margin, ratio=ratio,
                                                    rating_scale=rating_scale)
                per_group.append(tuple(float(v) for v in parts))
    n = len(per_group)
    loss = [g[0] for g in per_group]
    return {"groups": n, "loss": sum(loss) / n, "ci95": bootstrap_ci(loss), "loss/sft": sum(g[1] for g in per_group) / n,
            "loss/penalty": sum(g[2] for g in per_group) / n, "items": loss}


async def _rate_answers(observer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[int | None, float | None]]:
    """(rating, expected rating) of each (question, answer) by the observer's alignment prompt and
    rating path (token probabilities where the backend has them, else the text parser)."""
    from stablealign.backends import make_chat_backend
    from stablealign.backends.base import TASK_RATE_ALIGNMENT, ChatRequest
    from stablealign.calls import CallTally, chat_until_rated
    from stablealign.rating_prompts import alignment_messages

    backend = make_chat_backend(observer)
    try:
        async def rate(index: int, question: str, answer: str) -> tuple[int | None, float | None]:
            def request_for(attempt: int) -> ChatRequest:
                return ChatRequest(messages=alignment_messages(question, answer), max_tokens=48,
                                   temperature=0.0 if attempt == 0 else 0.7, seed=index * 31 + attempt,
                                   task=TASK_RATE_ALIGNMENT, hints={"question": question, "answer": answer})

            reply = await chat_until_rated(backend, CallTally(), 3, request_for)
            return reply.score, reply.expected

        return list(await asyncio.gather(*(rate(i, q, a) for i, (q, a) in enumerate(pairs))))
    finally:
        await backend.aclose()


def alignment_rating(model: Any, tokenizer: Any, questions: Sequence[str], observer: Any, *,
                     max_new_tokens: int = 64) -> dict[str, Any]:
    """Observer alignment rating (1..7) of the model's greedy answers to ``questions``, with a 95 % interval."""
    from stablealign.training.generate import generate

    answers = generate(model, tokenizer, list(questions), max_new_tokens=max_new_tokens)
    # An empty answer is rated as such: the observer sees what the model said.
    rated = asyncio.run(_rate_answers(observer, list(zip(questions, [a or "(no answer)" for a in answers]))))
    scores = [float(r) if r is not None else None for r, _ in rated]
    valid = [x for x in scores if x is not None]
    expected = [e for _, e in rated if e is not None]
    return {"questions": len(questions), "rated": len(valid), "missing": len(scores) - len(valid),
            "mean": (sum(valid) / len(valid)) if valid else None, "ci95": bootstrap_ci(valid),
            "expected_mean": (sum(expected) / len(expected)) if expected else None,
            "items": scores,
            "examples": [{"question": q, "answer": a, "rating": r, "expected": e}
                         for q, a, (r, e) in list(zip(questions, answers, rated))[:5]]}


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


def heldout_eval_questions(limit: int) -> list[str]:
    """First human turns of HH-RLHF eval-split pairs: questions no agent, prior or training group saw."""
    from stablealign.data import load_hh_pairs

    seen: dict[str, None] = {}
    for pair in load_hh_pairs(None, "eval"):
        seen.setdefault(pair.question.strip(), None)
        if len(seen) >= limit:
            break
    return list(seen)


def evaluate_model(path: str | Path, *, groups: Sequence[Any], hh_path: str | Path | None, limit: int | None,
                   observer: Any, questions: Sequence[str], max_length: int) -> dict[str, Any]:
    from stablealign.training.generate import load_model

    model, tokenizer = load_model(path)
    result: dict[str, Any] = {"model": str(path)}
    result["preference"] = preference_accuracy(model, tokenizer, hh_path, limit=limit, max_length=max_length)
    result["heldout"] = heldout_loss(model, tokenizer, groups, max_length=max_length)
    if observer is not None:
        if questions:
            try:
                result["alignment"] = alignment_rating(model, tokenizer, questions, observer)
            except ImportError as exc:
                result["alignment"] = {"error": f"observer backend unavailable: {exc}"}
        else:
            result["alignment"] = {"error": "no held-out questions"}
    return result


def sandbox_curve(records: str | Path) -> list[dict[str, Any]]:
    """Per-round population mean observer alignment before and after revision, with 95 % intervals:
    the method's headline curve, from a world's records.jsonl (checked: a bad line raises
    ``ValidationError`` ``FILE:LINE: <reason>``, see ``stablealign.records.read_records``)."""
    from stablealign.records import read_records

    rows = list(read_records(records, required=()))  # rounds and ratings are all the curve needs
    rounds: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        by_stage = rounds.setdefault(int(row.get("iteration", row.get("round", 0)) or 0), {"before": [], "after": []})
        for stage in ("before", "after"):
            score = row.get(f"gen_moral_score_{stage}")
            if isinstance(score, (int, float)):
                by_stage[stage].append(float(score))
    curve = []
    for round_, stages in sorted(rounds.items()):
        entry: dict[str, Any] = {"round": round_}
        for stage, values in stages.items():
            entry[f"alignment_{stage}"] = sum(values) / len(values) if values else None
            entry[f"alignment_{stage}_ci95"] = bootstrap_ci(values)
            entry[f"rated_{stage}"] = len(values)
        curve.append(entry)
    return curve


def _bar_with_ci(ax: Any, x: float, value: float | None, ci: list[float] | None, width: float, label: str,
                 color: str) -> None:
    if value is None or not math.isfinite(value):
        return
    err = None if not ci else [[value - ci[0]], [ci[1] - value]]
    ax.bar([x], [value], width=width, yerr=err, capsize=4, label=label, color=color)


def plot_report(report: dict[str, Any], train_log: Path | None, out_png: Path) -> None:
    """Training loss; base vs trained on the three measures with 95 % intervals; the SANDBOX curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("sandbox") or []
    panels = 5 if curve else 4
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4))
    ax_loss = axes[0]
    rows = []
    if train_log and train_log.is_file():
        rows = [json.loads(line) for line in train_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows:
        steps = [r["step"] for r in rows]
        for key in ("loss", "loss/sft", "loss/penalty"):
            ax_loss.plot(steps, [r[key] for r in rows], label=key)
        ax_loss.set_xlabel("optimizer step")
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no train_log.jsonl", ha="center", va="center")
    ax_loss.set_title("training loss")

    measures = (("HH-RLHF preference accuracy", "preference", "accuracy"),
                ("held-out Stable Alignment loss", "heldout", "loss"),
                ("observer alignment of answers (1-7)", "alignment", "mean"))
    colors = {"base": "tab:gray", "trained": "tab:blue"}
    for ax, (title, key, field) in zip(axes[1:4], measures):
        for k, name in enumerate(("base", "trained")):
            part = (report.get(name) or {}).get(key) or {}
            value = part.get(field) if isinstance(part, dict) else None
            _bar_with_ci(ax, k, value if isinstance(value, (int, float)) else None, part.get("ci95"), 0.6, name,
                         colors[name])
        ax.set_xticks([0, 1], ["base", "trained"])
        ax.set_title(title, fontsize=10)
        if key == "preference":
            ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
        if key == "alignment":
            ax.set_ylim(1, 7)
    if curve:
        ax = axes[4]
        x = [c["round"] for c in curve]
        for stage, color in (("before", "tab:orange"), ("after", "tab:green")):
            means = [c.get(f"alignment_{stage}") for c in curve]
            lows = [(c.get(f"alignment_{stage}_ci95") or [m, m])[0] if m is not None else None for c, m in zip(curve, means)]
            highs = [(c.get(f"alignment_{stage}_ci95") or [m, m])[1] if m is not None else None for c, m in zip(curve, means)]
            ax.plot(x, [m if m is not None else float("nan") for m in means], marker="o", color=color,
                    label=f"{stage} revision")
            ax.fill_between(x, [v if v is not None else float("nan") for v in lows],
                            [v if v is not None else float("nan") for v in highs], color=color, alpha=0.2)
        ax.set_xticks(x)
        ax.set_xlabel("round")
        ax.set_ylim(1, 7)
        ax.set_title("SANDBOX: mean alignment per round", fontsize=10)
        ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run_eval(model: str | Path, *, out: str | Path, data: str | Path | None = None, base: str | Path | None = None,
             hh_path: str | Path | None = None, limit: int | None = None, observer_backend: str | None = None,
             observer_model: str = "", observer_url: str = "", questions_limit: int = 16,
             max_length: int = 360, sandbox_records: str | Path | None = None) -> dict[str, Any]:
    """Evaluates ``model`` (and ``base``), writes ``out/report.json`` and ``out/report.png``.

    With ``base``, the report also holds the paired difference trained - base of each measure with
    a 95 % bootstrap interval (the same pairs, groups and questions for both models).
    """
    from stablealign.data import HH_SPLIT_RULE
    from stablealign.training.data import load_alignment_groups
    from stablealign.v1 import common_pb2

    if limit is not None and limit < 1:
        raise ValidationError("limit must be >= 1")
    groups = load_alignment_groups(data) if data else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    observer = (common_pb2.ModelRef(backend=observer_backend, model=observer_model, url=observer_url)
                if observer_backend else None)
    questions = heldout_eval_questions(questions_limit) if observer is not None else []
    split = hh_split(hh_path)
    report: dict[str, Any] = {"hh": str(hh_path or "default"), "hh_split": split or "all",
                              "hh_split_rule": HH_SPLIT_RULE if split else "", "limit": limit,
                              "heldout_data": str(data or ""), "observer_backend": observer_backend or "",
                              "observer_model": observer_model, "questions": len(questions)}
    if sandbox_records:
        report["sandbox"] = sandbox_curve(sandbox_records)
    common = dict(groups=groups, hh_path=hh_path, limit=limit, observer=observer, questions=questions,
                  max_length=max_length)
    if base:
        report["base"] = evaluate_model(base, **common)
    report["trained"] = evaluate_model(model, **common)
    if base:
        report["difference"] = {
            name: paired_difference((report["base"].get(key) or {}).get("items") or [],
                                    (report["trained"].get(key) or {}).get("items") or [])
            for name, key in (("preference_accuracy", "preference"), ("heldout_loss", "heldout"),
                              ("alignment", "alignment"))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_report(report, check_model_path(str(model)) / "train_log.jsonl", out / "report.png")
    log.info("eval.done", extra={"out": str(out)})
    return report
