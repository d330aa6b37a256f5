"""`stable-align pipeline`: the whole method end to end on the embedded default (what `make run` runs).

simulate a world (embedded nats-server + services, offline backend) -> records.jsonl ->
alignment data -> a tiny local model -> a short Stable Alignment training -> evaluation of the
base and trained models -> a short report. Each step is the same `stable-align` sub-command a
user would run, executed as a child process so the pipeline exercises the real CLI.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _step(title: str, args: list[str]) -> float:
    command = [sys.executable, "-m", "stablealign.cli.main", *args]
    console.rule(f"[bold]{title}")
    console.print(f"$ stable-align {shlex.join(args)}", style="dim")
    started = time.perf_counter()
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        console.print(f"[red]step failed ({title}): exit {result.returncode}[/red]")
        raise typer.Exit(result.returncode)
    return time.perf_counter() - started


def pipeline(
    out: Path = typer.Option(Path("runs/default"), "--out", envvar="STABLEALIGN_OUT", help="Output directory."),
    size: int = typer.Option(4, "--size", help="Grid side of the simulated world."),
    rounds: int = typer.Option(3, "--rounds", help="Rounds of the simulated world."),
    seed: int = typer.Option(1, "--seed", help="Seed of the world and of training."),
    train_steps: int = typer.Option(40, "--train-steps", help="Optimizer steps of the short training."),
    eval_limit: int = typer.Option(200, "--eval-limit", help="HH-RLHF pairs for preference accuracy."),
) -> None:
    """Simulate -> data -> train a tiny model -> evaluate, all offline; prints where everything is."""
    out.mkdir(parents=True, exist_ok=True)
    sim, data, model, trained, report = out / "sandbox", out / "data", out / "tiny-base", out / "trained", out / "eval"
    timings = {}
    timings["simulate"] = _step("1/5 simulate a society (embedded NATS + agent, observer, world services)", [
        "run", "--size", str(size), "--rounds", str(rounds), "--setting", "half_half", "--backend", "offline",
        "--seed", str(seed), "--out", str(sim)])
    timings["data"] = _step("2/5 mine alignment data from the records", [
        "data", "build", "--records", str(sim / "records.jsonl"), "--out", str(data / "alignment.jsonl"),
        "--seed", str(seed)])
    timings["model"] = _step("3/5 build a tiny random Llama with a locally trained tokenizer", [
        "model", "init-tiny", "--out", str(model)])
    timings["train"] = _step("4/5 Stable Alignment training (CPU)", [
        "train", "--model", str(model), "--data", str(data / "alignment.jsonl"), "--out", str(trained),
        "--max-steps", str(train_steps), "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3",
        "--max-length", "256", "--save-steps", str(train_steps), "--seed", str(seed)])
    timings["eval"] = _step("5/5 evaluate base vs trained", [
        "eval", "--model", str(trained), "--base", str(model), "--data", str(data / "alignment.heldout.jsonl"),
        "--out", str(report), "--limit", str(eval_limit), "--observer-backend", "offline"])
    _summary(out, sim, report, timings)


def _summary(out: Path, sim: Path, report: Path, timings: dict[str, float]) -> None:
    console.rule("[bold]summary")
    world = json.loads((sim / "world.json").read_text())
    table = Table(title="SANDBOX: population mean alignment per round (offline backend)")
    for column in ("round", "alignment before", "alignment after", "engagement after"):
        table.add_column(column, justify="right")
    for r in world.get("rounds", []):
        means = [f"{r[k]:.3f}" if k in r else "-"
                 for k in ("mean_alignment_before", "mean_alignment_after", "mean_engagement_after")]
        table.add_row(str(r.get("round", 0)), *means)
    console.print(table)
    report_file = report / "report.json"
    if report_file.is_file():
        console.print(_eval_table(json.loads(report_file.read_text())))
    console.print("step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(f"outputs: records {sim / 'records.jsonl'}; data {out / 'data'}; model {out / 'trained'}; "
                  f"report {report_file}")


def _eval_table(report: dict) -> Table:
    """Base vs trained, side by side: the three numbers `stable-align eval` reports."""
    table = Table(title="evaluation: tiny base model vs after Stable Alignment training")
    for column in ("metric", "base", "trained"):
        table.add_column(column, justify="right")
    rows = (("HH-RLHF preference accuracy", ("preference", "accuracy"), "{:.3f}"),
            ("held-out Stable Alignment loss", ("heldout", "loss"), "{:.3f}"),
            ("  of which SFT (best response)", ("heldout", "loss/sft"), "{:.3f}"),
            ("  of which ranking penalty", ("heldout", "loss/penalty"), "{:.3f}"),
            ("observer alignment of answers (1-7)", ("alignment", "mean"), "{:.2f}"))

    def cell(model: str, path: tuple[str, str], fmt: str) -> str:
        value = (report.get(model) or {}).get(path[0], {}) or {}
        value = value.get(path[1]) if isinstance(value, dict) else None
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    for name, path, fmt in rows:
        table.add_row(name, cell("base", path, fmt), cell("trained", path, fmt))
    return table


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
