"""`stable-align jobs submit|list|show|logs|cancel`: training jobs on a running trainer service.

Everything goes over NATS (``--nats``/``STABLEALIGN_NATS_URL``): requests to the trainer service,
logs read from the TRAINER_JOB_LOGS stream. Errors (bad spec, unknown job) print one line and exit
with code 2, never a traceback; a NATS server that cannot be reached, one line and exit code 1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import typer
from rich.console import Console
from rich.table import Table

from stablealign.core.errors import StableAlignError, UnavailableError
from stablealign_app.cli.rules import exit_code

jobs_app = typer.Typer(help="Training jobs on a running trainer service (local or Kubernetes runner).",
                       no_args_is_help=True)
console = Console()
NATS_OPTION = typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL.")
ARG_OPTION = typer.Option([], "--arg", help="Training flag NAME=VALUE (repeatable), e.g. --arg lr=2e-5.")
STATE_STYLES = {"QUEUED": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "magenta"}


def _run(coro):
    try:
        return asyncio.run(coro)
    except StableAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code(exc, 1 if isinstance(exc, UnavailableError) else 2)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _state(job) -> str:
    from services.trainer.jobs import state_name

    name = state_name(job.state)
    return f"[{STATE_STYLES.get(name, 'white')}]{name}[/]"


def _metrics_text(job) -> str:
    keys = [k for k in ("step", "loss", "loss/sft", "loss/penalty", "tokens_per_second") if k in job.metrics]
    return "  ".join(f"{k}={job.metrics[k]:.4g}" for k in keys)


def _parse_args(items: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.echo(f"error: --arg {item!r}: expected NAME=VALUE (e.g. lr=2e-5)", err=True)
            raise typer.Exit(2)
        args[key] = value
    return args


@jobs_app.command("submit")
def submit(
    model: str = typer.Option(..., "--model", help="Base model directory (for kubernetes: a path on the training PVC)."),
    data: str = typer.Option(..., "--data", help="Alignment data JSONL file."),
    out: str = typer.Option("", "--out", help=(
        "A path inside the job's own output directory (<root>/<job_id>, chosen by the trainer; default: that "
        "directory).")),
    runner: str = typer.Option("", "--runner", help="local | kubernetes (default: the trainer's)."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs per node (torchrun --nproc_per_node)."),
    nodes: int = typer.Option(0, "--nodes", help=(
        "Kubernetes: nodes (one pod each, torchrun --nnodes; default 1). The local runner takes 1.")),
    image: str = typer.Option("", "--image", help="Kubernetes: trainer image override."),
    namespace: str = typer.Option("", "--namespace", help="Kubernetes: namespace override."),
    job_id: str = typer.Option("", "--job-id", help="Job id (default: generated)."),
    arg: list[str] = ARG_OPTION,
    follow: bool = typer.Option(False, "--follow", help="Stream the job's log until it ends."),
    nats: str = NATS_OPTION,
) -> None:
    """Queue a training job and print its id."""
    from services.trainer.client import TrainerClient, connected
    from stablealign.v1 import trainer_pb2

    spec = trainer_pb2.JobSpec(job_id=job_id, runner=runner, model=model, data=data, output_dir=out,
                               args=_parse_args(arg), gpus=gpus, nodes=nodes, image=image, namespace=namespace)

    async def go():
        async with connected(nats) as nc:
            client = TrainerClient(nc)
            job = await client.submit_job(spec)
            console.print(f"submitted [bold]{job.spec.job_id}[/] ({job.spec.runner}) -> {job.spec.output_dir}")
            if follow:
                await _print_logs(client, job.spec.job_id, True)
                job = await client.get_job(job.spec.job_id)
                console.print(f"{_state(job)} {job.message}")
            return job

    _run(go())


@jobs_app.command("list")
def list_jobs(nats: str = NATS_OPTION) -> None:
    """All jobs the trainer knows, oldest first."""
    from services.trainer.client import list_jobs as fetch

    jobs = _run(fetch(nats))
    table = Table(title=f"training jobs ({len(jobs)})")
    for column in ("job", "runner", "state", "created", "metrics", "message"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        table.add_row(job.spec.job_id, job.spec.runner, _state(job), _when(job.created_at), _metrics_text(job),
                      job.message)
    console.print(table)


@jobs_app.command("show")
def show(job_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json"),
         nats: str = NATS_OPTION) -> None:
    """One job: spec, state, times, last metrics."""
    from google.protobuf.json_format import MessageToDict

    from services.trainer.client import get_job

    job = _run(get_job(nats, job_id))
    if as_json:
        typer.echo(json.dumps(MessageToDict(job), indent=2))
        return
    table = Table(show_header=False, title=f"job {job.spec.job_id}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [("state", _state(job)), ("message", job.message), ("runner", job.spec.runner),
            ("model", job.spec.model), ("data", job.spec.data), ("output", job.spec.output_dir),
            ("args", " ".join(f"{k}={v}" for k, v in sorted(job.spec.args.items()))),
            ("gpus", str(job.spec.gpus)), ("handle", job.handle), ("created", _when(job.created_at)),
            ("started", _when(job.started_at)), ("finished", _when(job.finished_at)),
            ("exit code", str(job.exit_code))]
    if job.spec.runner == "kubernetes":
        rows += [("image", job.spec.image), ("namespace", job.spec.namespace)]
    rows += [(k, f"{v:.6g}") for k, v in sorted(job.metrics.items())]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


async def _print_logs(client, job_id: str, follow: bool) -> None:
    async for line in client.logs(job_id, follow=follow):
        stamp = dt.datetime.fromtimestamp(line.time).strftime("%H:%M:%S") if line.time else ""
        typer.echo(f"{stamp} {line.line}")


@jobs_app.command("logs")
def logs(job_id: str = typer.Argument(...),
         follow: bool = typer.Option(True, "--follow/--no-follow", help="Keep following until the job ends."),
         nats: str = NATS_OPTION) -> None:
    """A job's log from the start (follows a running job until it ends)."""
    from services.trainer.client import TrainerClient, connected

    async def go():
        async with connected(nats) as nc:
            await _print_logs(TrainerClient(nc), job_id, follow)

    _run(go())


@jobs_app.command("cancel")
def cancel(job_id: str = typer.Argument(...), nats: str = NATS_OPTION) -> None:
    """Stop a queued or running job (waits until it has stopped)."""
    from services.trainer.client import cancel_job

    job = _run(cancel_job(nats, job_id))
    console.print(f"{job.spec.job_id}: {_state(job)} {job.message}")


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
