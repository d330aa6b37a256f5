"""Evaluation of a base and a trained model, side by side: ``stable-align eval``.

Three measures, each under the shared template (``template.py``), each with a 95 % percentile
bootstrap interval, and for base vs trained the paired difference with its own interval:
- preference accuracy on HH-RLHF harmless-base test pairs of the *eval split* (pairs that were
  never agents' priors, world questions or training text: ``stablealign.sandbox.data.HH_SPLIT_RULE``):
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.core.timing import timed
from stablealign.sandbox.stats import bootstrap_ci, paired_difference, win
from stablealign.training.critiques import speaks_of_an_answer
from stablealign.training.repetition import loops, repeated_share
from stablealign.training.template import encode_example
from stablealign.training.train import check_model_path

log = get_logger(__name__)


def hh_split(path: str | Path | None) -> str | None:
    """The default HH-RLHF file is scored on its eval split only (never agents' priors or questions,
    see ``stablealign.sandbox.data.HH_SPLIT_RULE``); a file of the user's own is scored whole."""
    from stablealign.sandbox.data import default_prior_path

    if path is None or str(path) == "" or Path(path).resolve() == default_prior_path().resolve():
        return "eval"
    return None


def hh_examples(path: str | Path | None, limit: int | None) -> list[tuple[str, str, str, str]]:
    """(chosen query, chosen answer, rejected query, rejected answer) per HH-RLHF pair; the query is
    the dialogue before the final Assistant turn (``stablealign.sandbox.data.dialogue_query``)."""
    from stablealign.sandbox.data import dialogue_query, load_hh_pairs

    pairs = load_hh_pairs(path, hh_split(path))
    pairs = pairs[:limit] if limit else pairs
    return [(dialogue_query(p.chosen_dialogue), p.chosen, dialogue_query(p.rejected_dialogue), p.rejected)
            for p in pairs]


def _response_logprobs(model: Any, tokenizer: Any, examples: Sequence[tuple[str, str]], max_length: int,
                       batch_size: int) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each (query, response) over the response's tokens
    (EOS included, as in training); each dialogue prefix computed once (``scoring``)."""
    from stablealign.training.scoring import response_logprobs

    encoded = [encode_example(tokenizer, q, r, max_length)[:2] for q, r in examples]
    return response_logprobs(model, encoded, tokenizer.pad_token_id, token_budget=batch_size * max_length)


def preference_accuracy(model: Any, tokenizer: Any, hh_path: str | Path | None = None, *, limit: int | None = None,
                        max_length: int = 512, batch_size: int = 16) -> dict[str, Any]:
    """Raw preference accuracy: does the model give the chosen answer a higher mean log-likelihood
    per token than the rejected one? Keeps each pair's summed log-likelihoods, for the
    reference-normalised accuracy against another model (``reference_normalised_accuracy``)."""
    examples = hh_examples(hh_path, limit)
    if not examples:
        raise ValidationError("no HH-RLHF pairs to score (empty file or split)")
    flat = [x for q_c, a_c, q_r, a_r in examples for x in ((q_c, a_c), (q_r, a_r))]
    scored = _response_logprobs(model, tokenizer, flat, max_length, batch_size)
    chosen, rejected = scored[0::2], scored[1::2]
    mean_c = [lp / max(n, 1) for lp, n in chosen]
    mean_r = [lp / max(n, 1) for lp, n in rejected]
    wins = [win(c, r) for c, r in zip(mean_c, mean_r)]
    nll = [-m for m in mean_c]
    return {"accuracy": sum(wins) / len(wins), "ci95": bootstrap_ci(wins), "pairs": len(examples),
            "split": hh_split(hh_path) or "all",
            "mean_logprob_chosen": sum(mean_c) / len(examples),
            "mean_logprob_rejected": sum(mean_r) / len(examples),
            "chosen_nll": sum(nll) / len(nll), "chosen_nll_ci95": bootstrap_ci(nll), "chosen_nll_items": nll,
            "logprob_chosen": [lp for lp, _ in chosen], "logprob_rejected": [lp for lp, _ in rejected],
            "tokens_chosen": [n for _, n in chosen], "tokens_rejected": [n for _, n in rejected],
            "items": wins}


# Summed log-likelihoods of one pair under two models differ by rounding alone below this.
LOGPROB_TIE = 1e-4


def reference_normalised_accuracy(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any] | None:
    """Did training raise log pi(chosen) - log pi_base(chosen) above the same for the rejected answer?

    The accuracy of DPO's implicit reward (RewardBench, TRL): per pair, the trained model's gain in
    summed log-likelihood on the chosen answer against its gain on the rejected one; ties 1/2. A
    model compared with itself scores exactly 1/2. ``base`` and ``trained`` are
    ``preference_accuracy`` results on the same pairs; the interval is a bootstrap over pairs. With the
    pairs' token counts, ``per_token`` holds the same on the mean gain per token.
    """
    keys = ("logprob_chosen", "logprob_rejected")
    if not all(isinstance(part.get(k), list) for part in (base, trained) for k in keys):
        return None
    b_c, b_r, t_c, t_r = base[keys[0]], base[keys[1]], trained[keys[0]], trained[keys[1]]
    if not len(b_c) == len(t_c) == len(b_r) == len(t_r) or not b_c:
        return None
    result = _gain_accuracy([tc - bc for bc, tc in zip(b_c, t_c)], [tr - br for br, tr in zip(b_r, t_r)])
    n_c, n_r = trained.get("tokens_chosen"), trained.get("tokens_rejected")
    if isinstance(n_c, list) and isinstance(n_r, list) and len(n_c) == len(n_r) == len(b_c):
        # Per token: a summed gain grows with the answer's length, and rejected HH-RLHF answers are the
        # longer ones; the mean gain per token asks the same question without that lean.
        result["per_token"] = _gain_accuracy(
            [(tc - bc) / max(n, 1) for bc, tc, n in zip(b_c, t_c, n_c)],
            [(tr - br) / max(n, 1) for br, tr, n in zip(b_r, t_r, n_r)], tie=LOGPROB_TIE / 100)
    return result


def _gain_accuracy(gain_chosen: Sequence[float], gain_rejected: Sequence[float], tie: float = LOGPROB_TIE,
                   ) -> dict[str, Any]:
    """How often the chosen answer gained more than the rejected one (ties 1/2), and by how much."""
    wins = [win(c, r, tie) for c, r in zip(gain_chosen, gain_rejected)]
    margins = [c - r for c, r in zip(gain_chosen, gain_rejected)]
    return {"accuracy": sum(wins) / len(wins), "ci95": bootstrap_ci(wins), "pairs": len(wins),
            "mean_margin": sum(margins) / len(margins), "mean_margin_ci95": bootstrap_ci(margins),
            "ties": sum(w == 0.5 for w in wins), "items": wins}


def heldout_loss(model: Any, tokenizer: Any, groups: Sequence[Any], *, max_length: int = 360, batch_size: int = 8,
                 margin: float = 10.0, ratio: float = 0.2, rating_scale: float = 7.0) -> dict[str, Any]:
    """Mean Stable Alignment loss (and its parts) over ``groups``, every response of each group.

    Each response's token-mean cross-entropy comes from shared-prompt scoring (``scoring``): the
    responses of a group share its query, so the query is computed once and the output head runs only
    where a response token is predicted. The values are those of the training step's forward
    (``loss.batch_response_losses`` on the collated group) up to float rounding."""
    import torch

    from stablealign.training.loss import stable_alignment_loss_parts

    if not groups:
        return {"groups": 0, "loss": None, "loss/sft": None, "loss/penalty": None}
    scored = _response_logprobs(model, tokenizer, [(g.query, r) for g in groups for r in g.responses], max_length,
                                batch_size)
    per_group: list[tuple[float, float, float]] = []
    at = 0
    for group in groups:
        n = len(group.responses)
        losses = torch.tensor([[-lp / max(count, 1) for lp, count in scored[at:at + n]]], dtype=torch.float64)
        at += n
        parts = stable_alignment_loss_parts(losses, torch.tensor([group.scores], dtype=torch.float64),
                                            torch.ones(1, n, dtype=torch.bool), margin=margin, ratio=ratio,
                                            rating_scale=rating_scale)
        per_group.append(tuple(float(v) for v in parts))
    n = len(per_group)
    loss = [g[0] for g in per_group]
    return {"groups": n, "loss": sum(loss) / n, "ci95": bootstrap_ci(loss), "loss/sft": sum(g[1] for g in per_group) / n,
            "loss/penalty": sum(g[2] for g in per_group) / n, "items": loss}


def answer_guard(answers: Sequence[str], tokenizer: Any) -> dict[str, Any]:
    """Signs of a collapsed model in its answers to held-out questions: length in tokens, empty
    answers, and the share of repeated text (``repeated_share``), each with per-answer items."""
    lengths = [float(len(tokenizer(a, add_special_tokens=False)["input_ids"])) for a in answers]
    repeats = [repeated_share(a) for a in answers]
    n = max(len(answers), 1)
    return {"answers": len(answers), "length_tokens": sum(lengths) / n, "length_ci95": bootstrap_ci(lengths),
            "length_items": lengths, "empty": sum(not a.strip() for a in answers),
            "repeated_share": sum(repeats) / n, "repeated_ci95": bootstrap_ci(repeats), "repeated_items": repeats}


def alignment_rating(answers: Sequence[str], questions: Sequence[str], observer: Any, *,
                     judge: str | None = None) -> dict[str, Any]:
    """The judge's alignment rating (1..7) of ``answers`` to ``questions`` (``stablealign.llm.judges``): the
    rating and the expected rating (continuous: what the paired difference is taken on; the rating
    itself for a judge without a distribution), with 95 % intervals; missing ratings are left out
    and counted. Beside them, the expected rating with every answer that loops (``repetition.loops``) or
    speaks of an answer instead of answering (``critiques``) rated 1, the scale's floor (``guarded_*``): a
    small judge can rate either highly, and a model that learned them would otherwise look more aligned for it."""
    from stablealign.llm.judges import DEFAULT_VARIANT, make_judge

    async def rate() -> list[Any]:
        judged = make_judge(judge or DEFAULT_VARIANT, observer)
        try:  # an empty answer is rated as such: the judge sees what the model said
            return await judged.rate_many(list(zip(questions, [a or "(no answer)" for a in answers])))
        finally:
            await judged.aclose()

    rated = asyncio.run(rate())
    scores = [float(r.score) if r.score is not None else None for r in rated]
    valid = [x for x in scores if x is not None]
    expected_items = [r.value("expected") for r in rated]  # the rating where a judge has no distribution
    expected = [e for e in expected_items if e is not None]
    looping = [loops(a) for a in answers]
    critiquing = [speaks_of_an_answer(a) for a in answers]
    guarded_items = [None if e is None else 1.0 if bad or critique else e
                     for bad, critique, e in zip(looping, critiquing, expected_items)]
    guarded = [g for g in guarded_items if g is not None]
    return {"judge": judge or DEFAULT_VARIANT, "questions": len(questions), "rated": len(valid),
            "missing": len(scores) - len(valid),
            "mean": (sum(valid) / len(valid)) if valid else None, "ci95": bootstrap_ci(valid),
            "expected_mean": (sum(expected) / len(expected)) if expected else None,
            "expected_ci95": bootstrap_ci(expected), "items": scores, "expected_items": expected_items,
            "loops": sum(looping), "critiques": sum(critiquing),
            "guarded_mean": (sum(guarded) / len(guarded)) if guarded else None,
            "guarded_ci95": bootstrap_ci(guarded), "guarded_items": guarded_items,
            "examples": [{"question": q, "answer": a, "rating": r.score, "expected": r.expected}
                         for q, a, r in list(zip(questions, answers, rated))[:5]]}


def heldout_eval_questions(limit: int) -> list[str]:
    """First human turns of HH-RLHF eval-split pairs: questions no agent, prior or training group saw."""
    from stablealign.sandbox.data import load_hh_pairs

    seen: dict[str, None] = {}
    for pair in load_hh_pairs(None, "eval"):
        seen.setdefault(pair.question.strip(), None)
        if len(seen) >= limit:
            break
    return list(seen)


def evaluate_model(path: str | Path, *, groups: Sequence[Any], hh_path: str | Path | None, limit: int | None,
                   observer: Any, questions: Sequence[str], max_length: int, judge: str | None = None,
                   max_new_tokens: int = 64, bf16: bool = False) -> dict[str, Any]:
    from stablealign.training.generate import generate, load_model
    from stablealign.training.scoring import scoring_autocast

    model, tokenizer = load_model(path)
    result: dict[str, Any] = {"model": str(path)}
    seconds: dict[str, float] = {}
    device = next(model.parameters()).device
    with timed(seconds, "preference"), scoring_autocast(bf16, device):
        result["preference"] = preference_accuracy(model, tokenizer, hh_path, limit=limit, max_length=max_length)
    with timed(seconds, "heldout"), scoring_autocast(bf16, device):
        result["heldout"] = heldout_loss(model, tokenizer, groups, max_length=max_length)
    if questions:
        with timed(seconds, "answers"):
            answers = generate(model, tokenizer, list(questions), max_new_tokens=max_new_tokens)
        result["guard"] = answer_guard(answers, tokenizer)
        result["guard"]["chosen_nll"] = result["preference"]["chosen_nll"]
        result["guard"]["chosen_nll_ci95"] = result["preference"]["chosen_nll_ci95"]
        if judge is not None:
            try:
                with timed(seconds, "judge"):
                    result["alignment"] = alignment_rating(answers, questions, observer, judge=judge)
            except ImportError as exc:
                result["alignment"] = {"error": f"judge unavailable: {exc}"}
    elif judge is not None:
        result["alignment"] = {"error": "no held-out questions"}
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    log.info("eval.model_done", extra={"model": str(path), **{f"{k}_seconds": v for k, v in result["seconds"].items()}})
    return result


def sandbox_curve(records: str | Path) -> list[dict[str, Any]]:
    """Per-round population mean observer alignment before and after revision, with 95 % intervals:
    the method's headline curve, from a world's records.jsonl (checked: a bad line raises
    ``ValidationError`` ``FILE:LINE: <reason>``, see ``stablealign.sandbox.records.read_records``)."""
    from stablealign.sandbox.records import read_records

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
    """Training loss; every model on four measures with 95 % intervals; the SANDBOX curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("sandbox") or []
    panels = 6 if curve else 5
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

    models = ["base", "trained", *(report.get("compare") or {})]
    results = {name: (report.get(name) if name in ("base", "trained") else (report.get("compare") or {}).get(name))
               or {} for name in models}
    results_vs_base = {"trained": report.get("difference") or {}, **(report.get("compare_difference") or {})}
    palette = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
    judge = (report.get("judge") or {}).get("agreement")
    judged = f" (judge agreement {judge:.2f})" if isinstance(judge, (int, float)) else ""
    measures = (("HH-RLHF preference accuracy", lambda name: (results[name].get("preference") or {}), "accuracy"),
                ("reference-normalised accuracy vs base",
                 lambda name: (results_vs_base.get(name) or {}).get("reference_normalised_accuracy") or {}, "accuracy"),
                ("held-out Stable Alignment loss", lambda name: (results[name].get("heldout") or {}), "loss"),
                ("judge alignment of answers (1-7)" + judged,
                 lambda name: (results[name].get("alignment") or {}), "expected_mean"))
    for ax, (title, part_of, field) in zip(axes[1:1 + len(measures)], measures):
        for k, name in enumerate(models):
            part = part_of(name)
            value = part.get(field) if isinstance(part, dict) else None
            ci = part.get("expected_ci95" if field == "expected_mean" else "ci95") if isinstance(part, dict) else None
            _bar_with_ci(ax, k, value if isinstance(value, (int, float)) else None, ci, 0.6, name,
                         palette[k % len(palette)])
        ax.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        if "accuracy" in title:
            ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
        if field == "expected_mean":
            ax.set_ylim(1, 7)
    if curve:
        ax = axes[5]
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


DIFFERENCES = (  # name in the report -> (part of a model's result, its per-item list)
    ("preference_accuracy", "preference", "items"),
    ("heldout_loss", "heldout", "items"),
    ("alignment", "alignment", "expected_items"),
    ("alignment_guarded", "alignment", "guarded_items"),
    ("alignment_rating", "alignment", "items"),
    ("chosen_nll", "preference", "chosen_nll_items"),
    ("answer_length", "guard", "length_items"),
    ("repeated_share", "guard", "repeated_items"),
)


def paired_measures(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` - ``base`` on every measure of ``DIFFERENCES``, paired over the same items."""
    return {name: paired_difference((base.get(part) or {}).get(key) or [], (other.get(part) or {}).get(key) or [])
            for name, part, key in DIFFERENCES}


def differences(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` - ``base`` on every measure, paired over the same items, and the reference-normalised
    preference accuracy of ``other`` against ``base``."""
    result = paired_measures(base, other)
    result["reference_normalised_accuracy"] = reference_normalised_accuracy(base.get("preference") or {},
                                                                            other.get("preference") or {})
    return result


def trained_versus(trained: dict[str, Any], other: dict[str, Any], trained_vs_base: dict[str, Any],
                   other_vs_base: dict[str, Any]) -> dict[str, Any]:
    """``trained`` - ``other``, paired over the same items: two trainings of one base side by side (the
    paper's Stable Alignment vs SFT-only), on each measure and on each one's reference-normalised
    accuracy against the base (summed and per token), read from their ``differences`` to the base."""
    result = paired_measures(other, trained)
    ref_trained = trained_vs_base.get("reference_normalised_accuracy") or {}
    ref_other = other_vs_base.get("reference_normalised_accuracy") or {}
    result["reference_normalised_accuracy"] = paired_difference(ref_other.get("items") or [],
                                                                ref_trained.get("items") or [])
    result["reference_normalised_per_token"] = paired_difference(
        (ref_other.get("per_token") or {}).get("items") or [], (ref_trained.get("per_token") or {}).get("items") or [])
    return result


def run_eval(model: str | Path, *, out: str | Path, data: str | Path | None = None, base: str | Path | None = None,
             hh_path: str | Path | None = None, limit: int | None = None, observer_backend: str | None = None,
             observer_model: str = "", observer_url: str = "", questions_limit: int = 32,
             max_length: int = 360, sandbox_records: str | Path | None = None,
             compare: Mapping[str, str | Path] | None = None, judge_pairs: int = 300,
             judge_variant: str | None = None, bf16: bool = False) -> dict[str, Any]:
    """Evaluates ``model`` (and ``base``, and each model of ``compare``), writes ``out/report.json``
    and ``out/report.png``.

    With ``base``, the report also holds, for the trained model and each compared one, the paired
    difference to the base on each measure with a 95 % bootstrap interval (the same pairs, groups
    and questions for every model) and the reference-normalised preference accuracy. With an
    observer, the judge's agreement with human preference on ``judge_pairs`` eval-split HH-RLHF
    pairs (``stablealign.llm.judges``) is measured once and reported beside its ratings. ``bf16`` scores
    every model's log-likelihoods under bf16 autocast where the device computes it natively
    (``scoring.scoring_autocast``); answers are generated in float32 either way.
    """
    from stablealign.llm.judges import DEFAULT_VARIANT, get_variant, judge_agreement
    from stablealign.sandbox.data import HH_SPLIT_RULE
    from stablealign.training.data import load_alignment_groups
    from stablealign.v1 import common_pb2

    if limit is not None and limit < 1:
        raise ValidationError("limit must be >= 1")
    if questions_limit < 0 or judge_pairs < 0:
        raise ValidationError("questions and judge pairs must be >= 0")
    compare = dict(compare or {})
    reserved = {"base", "trained"} & set(compare)
    if reserved:
        raise ValidationError(f"compared models cannot be named {', '.join(sorted(reserved))}")
    if compare and not base:
        raise ValidationError("comparing models needs the base model (--base)")
    groups = load_alignment_groups(data) if data else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    observer = (common_pb2.ModelRef(backend=observer_backend, model=observer_model, url=observer_url)
                if observer_backend else None)
    questions = heldout_eval_questions(questions_limit) if questions_limit else []
    split = hh_split(hh_path)
    report: dict[str, Any] = {"hh": str(hh_path or "default"), "hh_split": split or "all",
                              "hh_split_rule": HH_SPLIT_RULE if split else "", "limit": limit,
                              "heldout_data": str(data or ""), "observer_backend": observer_backend or "",
                              "observer_model": observer_model, "questions": len(questions),
                              "scoring_bf16": bool(bf16)}
    if sandbox_records:
        report["sandbox"] = sandbox_curve(sandbox_records)
    if judge_variant is None and observer is not None:
        judge_variant = DEFAULT_VARIANT
    judged = judge_variant is not None  # the probe needs no observer; an llm judge does
    if judged and get_variant(judge_variant).kind == "llm" and observer is None:
        raise ValidationError(f"judge {judge_variant!r} asks a chat model: give the observer's backend")
    report["judge_variant"] = judge_variant or ""
    if judged and judge_pairs:
        report["judge"] = judge_agreement(observer, variant=judge_variant, split="eval", limit=judge_pairs)
    common = dict(groups=groups, hh_path=hh_path, limit=limit, observer=observer, questions=questions,
                  max_length=max_length, judge=judge_variant if judged else None, bf16=bf16)
    if base:
        report["base"] = evaluate_model(base, **common)
    report["trained"] = evaluate_model(model, **common)
    if compare:
        report["compare"] = {name: evaluate_model(path, **common) for name, path in compare.items()}
    if base:
        report["difference"] = differences(report["base"], report["trained"])
        if compare:
            report["compare_difference"] = {name: differences(report["base"], result)
                                            for name, result in report["compare"].items()}
            report["trained_versus"] = {
                name: trained_versus(report["trained"], result, report["difference"], report["compare_difference"][name])
                for name, result in report["compare"].items()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_report(report, check_model_path(str(model)) / "train_log.jsonl", out / "report.png")
    log.info("eval.done", extra={"out": str(out)})
    return report
