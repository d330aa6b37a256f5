"""`stable-align run | worlds | watch | export`: run and inspect SANDBOX worlds.

What a person reads (tables, summaries) goes to stdout; stderr carries the log and, on a terminal only,
the progress bar (log lines print above it). Errors are one ``error: ...`` line: exit 1 when the run
failed or NATS could not be reached (within ``bus.CLIENT_GIVE_UP_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.world.client import WorldClient, connected
from services.world.spec import build_spec
from stablealign.core.errors import StableAlignError
from stablealign.core.logs import get_logger
from stablealign.sandbox.record_stream import ReadStats, TrustedRecords
from stablealign.sandbox.records import record_to_json
from stablealign.v1 import common_pb2, world_pb2
from stablealign_app.cli.rules import exit_code
from stablealign_app.cli.spec_options import with_spec_options
from stablealign_app.embedded import AUTO_WORKERS, embedded_stack_for

console = Console(stderr=True)  # the progress bar
out_console = Console()  # what a person reads
log = get_logger(__name__)
T = TypeVar("T")


def _opt(default, *names: str, help: str):
    # The environment variable (STABLEALIGN_RUN_<FLAG>, or STABLEALIGN_NATS_URL) is set by cli.rules.
    return typer.Option(default, *names, help=help, show_default=True)


def round_table(world: world_pb2.World) -> Table:
    table = Table(title=f"world {world.spec.world_id}: mean ratings per round (1-7; missing excluded)")
    for column in ("round", "interactions", "alignment before", "alignment after", "engagement before",
                   "engagement after", "missing", "seconds"):
        table.add_column(column, justify="right")
    for r in world.rounds:
        means = [f"{getattr(r, f):.3f}" if r.HasField(f) else "-" for f in
                 ("mean_alignment_before", "mean_alignment_after", "mean_engagement_before", "mean_engagement_after")]
        table.add_row(str(r.round), str(r.interactions), *means, str(r.missing_ratings), f"{r.duration_seconds:.1f}")
    return table


class RatingCoverage:
    """Missing (null) observer and partner ratings of a world's records, counted row by row (``add``)
    as the export writes them: no second read of records.jsonl, no list of every row in memory."""

    def __init__(self) -> None:
        self.counts = {"observer": [0, 0], "partners": [0, 0]}  # [ratings, missing]

    def add(self, row: dict) -> None:
        observer = [row.get(f"gen_{aspect}_score_{stage}") for aspect in ("moral", "engagement")
                    for stage in ("before", "after")]
        for name, values in (("observer", observer), ("partners", row.get("rating") or [])):
            self.counts[name][0] += len(values)
            self.counts[name][1] += sum(v is None for v in values)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"ratings": n, "missing": missing, "missing_share": round(missing / n, 4) if n else 0.0}
                for name, (n, missing) in self.counts.items()}


def rating_coverage(rows: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Missing (null) observer and partner ratings of a world's records, counted and as a share."""
    coverage = RatingCoverage()
    for row in rows:
        coverage.add(row)
    return coverage.as_dict()


def say_skipped(stats: ReadStats) -> None:
    """The reader's one line about skipped messages (malformed, foreign, duplicate), on stderr."""
    line = stats.summary()
    if line:
        typer.echo(f"warning: {line}", err=True)


def embedded_fault_counts(workers: dict[str, float] | None = None) -> dict[str, float]:
    """What the embedded services counted during the run: redone interactions, re-sent requests
    (timeouts, no responders), re-sent requests that joined work in flight, answers asked again, LLM
    calls tried again after a failure (a timeout, 429, 5xx); ``workers``: what the stack's worker
    processes counted (added to this process's own)."""
    from stablealign.core import metrics

    counts = {"interaction_retries": metrics.counter_value("stablealign_world_interactions_total", outcome="retry"),
            "request_resends": metrics.counter_value("stablealign_bus_request_retries_total"),
            "request_timeouts": metrics.counter_value("stablealign_bus_request_retries_total", reason="timeout"),
            "requests_joined": metrics.counter_value("stablealign_requests_joined_total"),
            "answers_rejected": metrics.counter_value("stablealign_agent_answers_rejected_total"),
            "llm_retries": metrics.counter_value("stablealign_llm_requests_total", outcome="retry")}
    for key, value in (workers or {}).items():
        if key in counts:
            counts[key] += value
    return counts


def embedded_token_counts() -> dict[str, dict[str, int]]:
    """Tokens the services of this process sent to and got from their LLMs, by task (draft, feedback,
    revise, rate_alignment, rate_engagement): what each step of an interaction costs. Worker processes
    count their own (not included)."""
    from prometheus_client import REGISTRY

    tokens: dict[str, dict[str, int]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "stablealign_llm_tokens_total":
                task = tokens.setdefault(sample.labels.get("task", ""), {"prompt": 0, "completion": 0})
                task[sample.labels["kind"]] = task.get(sample.labels["kind"], 0) + int(sample.value)
    return tokens


async def run_world(spec: world_pb2.WorldSpec, out: Path, nats_url: str | None, timeout: float,
                    quiet: bool = False, workers: int = AUTO_WORKERS) -> world_pb2.World:
    """Creates the world (on an embedded stack with ``workers`` worker processes unless ``nats_url``),
    follows it, writes records.jsonl."""
    stack = None if nats_url else await embedded_stack_for(spec, workers).start()
    url = nats_url or stack.url
    try:
        async with connected(url, options=stack.client_options if stack else None) as nc:
            client = WorldClient(nc)
            started = time.perf_counter()
            world = await client.create_world(spec)
            if spec.agent_model.backend == "offline" and nats_url:  # embedded: the backend says so itself
                log.warning("backend: offline — deterministic answers from the HH-RLHF pool and heuristic "
                            "ratings, not a language model")
            total = world.spec.size ** 2 * world.spec.rounds
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, disable=quiet or not console.is_terminal,
                          transient=False) as progress:
                task = progress.add_task(f"world {world.spec.world_id}", total=total)
                world = await client.wait_for_world(
                    world.spec.world_id, timeout=timeout,
                    on_progress=lambda w: progress.update(task, completed=w.records_published))
            elapsed = time.perf_counter() - started
            out.mkdir(parents=True, exist_ok=True)
            coverage = RatingCoverage()
            exported = await client.export_records(world.spec.world_id, out / "records.jsonl", spec=world.spec,
                                                   on_row=coverage.add)
            say_skipped(exported.stats)
            summary = MessageToDict(world, preserving_proto_field_name=True)
            summary["wall_seconds"] = elapsed
            summary["records"] = exported.records
            summary["records_read"] = exported.stats.as_dict()
            summary["rating_coverage"] = coverage.as_dict()
            if stack:  # the services ran in this process and its workers: their counters are ours to read
                await stack.stop_workers()
                summary["faults"] = embedded_fault_counts(stack.worker_counters)
                summary["llm_tokens"] = embedded_token_counts()
                summary["workers"] = {"processes": stack.workers,
                                      "requests_served": stack.worker_counters.get("requests_served", 0.0)}
            (out / "world.json").write_text(json.dumps(summary, indent=2))
    finally:
        if stack:
            await stack.stop()
    if world.state != world_pb2.WORLD_STATE_COMPLETED:
        raise StableAlignError(f"world {world.spec.world_id} ended {world_pb2.WorldState.Name(world.state)}: "
                               f"{world.error}")
    return world


@with_spec_options()  # --size, --rounds, --setting, ... --world-id: one per world-spec field
def run(
    spec_options: dict[str, Any],
    out: Path = _opt(Path("runs/latest"), "--out", help="Output directory (records.jsonl, world.json)."),
    nats: str = _opt(None, "--nats", help="Use services already running on this NATS server."),
    timeout: float = _opt(3600.0, "--timeout", help="Give up after this many seconds."),
    workers: int = _opt(AUTO_WORKERS, "--workers", help="Worker processes serving more agent and observer "
                        "replicas beside this one (embedded stack only); -1 = one per core beyond the first "
                        "(at most 4; none for fewer than 200 interactions or the hf backend), 0 = none."),
) -> None:
    """Simulate a world and write DIR/records.jsonl (the original's field names) and DIR/world.json."""
    spec = build_spec(**spec_options)
    try:
        world = asyncio.run(run_world(spec, out, nats, timeout, workers=workers))
    except StableAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code(exc, 1)) from None
    out_console.print(round_table(world))
    summary = json.loads((out / "world.json").read_text())
    coverage = summary["rating_coverage"]
    out_console.print("missing ratings: " + ", ".join(
        f"{name} {c['missing']}/{c['ratings']} ({100 * c['missing_share']:.1f} %)" for name, c in coverage.items()))
    if "faults" in summary:
        out_console.print("retries: " + ", ".join(f"{k.replace('_', ' ')} {v:g}"
                                                  for k, v in summary["faults"].items()))
    out_console.print(f"records: {out / 'records.jsonl'} ({world.records_published} interactions)", soft_wrap=True)


worlds_app = typer.Typer(help="Inspect worlds known to a running world service.", no_args_is_help=True)


def _nats_option():
    return typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL.")


async def with_world_client(url: str, fn: Callable[[WorldClient], Awaitable[T]]) -> T:
    """``fn`` with a world client on a connection of its own to ``url`` (closed after)."""
    async with connected(url) as nc:
        return await fn(WorldClient(nc))


def call_world(url: str, fn: Callable[[WorldClient], Awaitable[T]]) -> T:
    """What a `worlds`/`watch`/`export` command runs: ``fn`` with a world client; an error of the
    client (unreachable NATS, unknown world...) is one ``error: ...`` line and its exit code."""
    try:
        return asyncio.run(with_world_client(url, fn))
    except StableAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_code(exc, 1)) from None


@worlds_app.command("list")
def worlds_list(nats: str = _nats_option()) -> None:
    """All worlds with state and progress."""
    worlds = call_world(nats, lambda client: client.list_worlds())
    table = Table("world", "state", "size", "rounds", "done", "records")
    for w in worlds:
        table.add_row(w.spec.world_id, world_pb2.WorldState.Name(w.state).removeprefix("WORLD_STATE_"),
                      str(w.spec.size), str(w.spec.rounds), str(w.completed_rounds), str(w.records_published))
    Console().print(table)


@worlds_app.command("show")
def worlds_show(world_id: str, nats: str = _nats_option(),
                as_json: bool = typer.Option(False, "--json", help="Print the world as JSON.")) -> None:
    """One world's spec, state and per-round means."""
    world = call_world(nats, lambda client: client.get_world(world_id))
    if as_json:
        print(json.dumps(MessageToDict(world, preserving_proto_field_name=True), indent=2))
        return
    Console().print(f"state: {world_pb2.WorldState.Name(world.state)}  error: {world.error or '-'}")
    Console().print(round_table(world))


def export(world_id: str, out: Path = typer.Option(..., "--out", help="JSONL file to write."),
           nats: str = _nats_option()) -> None:
    """Write a world's records from the SANDBOX_RECORDS stream to JSONL, ordered by (round, agent).

    Only records carrying the world's message id are written, one per (round, agent); malformed,
    foreign and duplicate messages are skipped and counted in one ``warning: skipped ...`` line."""
    exported = call_world(nats, lambda client: client.export_records(world_id, out))
    say_skipped(exported.stats)
    out_console.print(f"{exported.records} records -> {out}", soft_wrap=True)


def watch(world_id: str, nats: str = _nats_option(),
          limit: int = typer.Option(0, "--limit", help="Stop after N interactions (0: until interrupted)."),
          replay: bool = typer.Option(False, "--replay", help="Show records published before too.")) -> None:
    """Live table of a world's interactions as they are published."""

    async def follow(client: WorldClient) -> None:
        table = Table("round", "agent", "label", "align before", "align after", "partners", "question", expand=True)
        seen = 0

        def add(record: common_pb2.InteractionRecord) -> None:
            row = record_to_json(record)
            table.add_row(str(row["iteration"]), str(row["agent_id"]), row["label"],
                          str(row["gen_moral_score_before"]), str(row["gen_moral_score_after"]),
                          ",".join(map(str, row["target_id"])), row["question"][:60])

        with Live(table, console=Console(), refresh_per_second=4):
            trusted = TrustedRecords(world_id)  # the readers' rule: forged or broken messages are not shown
            try:
                async with contextlib.aclosing(client.follow_records(trusted, replay=replay)) as records:
                    async for record in records:
                        add(record)
                        seen += 1
                        if limit and seen >= limit:
                            break
            finally:
                say_skipped(trusted.stats)

    try:
        call_world(nats, follow)
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.add_typer(worlds_app, name="worlds")
    app.command("watch")(watch)
    app.command("export")(export)
