"""Simulation benchmark: SANDBOX throughput through NATS against a local OpenAI-compatible server.

    python -m bench.simulation [--agents 100] [--rounds 2] [--latencies offline,0,200] [--cli-rounds 1]

For each latency the benchmark starts, as separate processes on this machine: a FakeOpenAIServer
(tests.support.devservers) that answers after the given latency, a nats-server with JetStream, and
one process per service (`stable-align serve agent|observer|world`); then it creates a world of
``agents`` agents with the openai backend (chat + embeddings through that server) and reports:

- setup seconds (prior memories embedded and published: World.setup_seconds),
- interactions/s in rounds (agents / round duration, from the world's round summaries),
- sequential LLM round trips on the critical path: median interaction latency / server latency
  (measured, at latency > 0), and the structural count of our critical path,
- LLM requests per interaction as counted by the server,
- peak RSS of the agent service and its RSS per agent after each round (memory must stay flat),
- CPU milliseconds per interaction of every process on the path — agent, observer, world, nats-server
  and the fake LLM server — from the world's creation to its completion (process start-up excluded):
  the robust figure on a shared machine, where wall-clock rates are lower bounds.

Then, at each latency with a server, the path a user takes: ``stable-align run --size S --rounds R
--backend openai`` with its defaults (an embedded stack: one process for the command and the three
services, plus a nats-server child), as a subprocess against the same server — the whole command's wall
time, the world's wall time and setup, interactions/s in rounds, and CPU ms per interaction of the
command (with its nats-server) and of the LLM server.

The baseline, measured in the same run against the same server, is the original's formulation
(bench/original_sandbox.py): every step one blocking request after another (16 round trips per
interaction), a thread pool over agents, and every prior memory embedded with its own request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench import original_sandbox
from services.world.client import WorldClient
from services.world.spec import build_spec
from stablealign.core.metrics import free_port
from stablealign.nats import client as nats_client
from stablealign.v1 import world_pb2
from stablealign_app.natsserver import EmbeddedNatsServer

# The question's embedding is computed before the round (scheduler.QuestionVectors), off the path.
CRITICAL_PATH = ("draft", "feedback ∥ ratings before", "revise", "ratings after")


@dataclass
class SimulationResult:
    latency_ms: float
    agents: int
    rounds: int
    setup_seconds: float
    interactions_per_second: float
    round_seconds: list[float]
    sequential_round_trips_measured: float | None
    sequential_round_trips_structural: int
    llm_requests_per_interaction: float
    agent_peak_rss_mb: float
    agent_rss_per_agent_kb_by_round: list[float] = field(default_factory=list)
    steady_interactions_per_second: float = 0.0  # rounds after the first (backends warmed up)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # over the world, by process
    cpu_ms_per_interaction: dict[str, float] = field(default_factory=dict)  # by process, and "all"
    # The same over the rounds after the first (warmed up: lazy imports, first memory loads, new connections).
    steady_cpu_ms_per_interaction: dict[str, float] = field(default_factory=dict)


@dataclass
class CliResult:
    """``stable-align run`` with its defaults (embedded stack) against the fake server."""

    latency_ms: float
    agents: int
    rounds: int
    command_wall_seconds: float  # process start to exit: imports, nats-server, services, world, records.jsonl
    world_wall_seconds: float  # world creation to completion (world.json wall_seconds)
    setup_seconds: float
    interactions_per_second: float  # in rounds
    round_seconds: list[float]
    cpu_ms_per_interaction: dict[str, float]  # "run" (the command and its nats-server child), "llm_server"


def _wait_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _stats(base: str) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{base}/stats", timeout=5).read())


def bench_spec(size: int, rounds: int, offline: bool) -> world_pb2.WorldSpec:
    """What ``stable-align run --size S --rounds R`` sends (services.world.spec.build_spec, every other field
    its default), with the zero-latency LLM in-process (offline, hashing embedder) or the fake server."""
    if offline:  # deterministic, in-process in the agent/observer services
        return build_spec(size=size, rounds=rounds, backend="offline", embedding_model="hashing")
    return build_spec(size=size, rounds=rounds, backend="openai", model="fake-gpt", embedding_model="fake-embedding")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def _run_world(nats_url: str, spec: world_pb2.WorldSpec, agent_proc: psutil.Process,
                     cpu_procs: dict[str, psutil.Process]) -> tuple[world_pb2.World, list[float], list, dict]:
    """Runs the world; also returns each process's CPU seconds from its creation to its completion."""
    nc = await nats_client.connect(nats_url, name="bench")
    try:
        cpu_before = {name: _cpu(proc) for name, proc in cpu_procs.items()}
        client = WorldClient(nc)
        world = await client.create_world(spec)
        rss_by_round: list[float] = []
        cpu_by_round: list[dict[str, float]] = []  # each process's CPU seconds when a round was seen complete
        peak = [0.0]

        def on_progress(w: world_pb2.World) -> None:
            rss = agent_proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            while len(rss_by_round) < w.completed_rounds:
                rss_by_round.append(rss)
            if len(cpu_by_round) < w.completed_rounds:
                now = {name: _cpu(proc) for name, proc in cpu_procs.items()}
                while len(cpu_by_round) < w.completed_rounds:
                    cpu_by_round.append(now)

        # Polled often enough that a round's CPU is read within ~50 ms of its end.
        world = await client.wait_for_world(world.spec.world_id, timeout=1800, on_progress=on_progress,
                                            poll_seconds=0.05)
        cpu = {name: _cpu(proc) - cpu_before[name] for name, proc in cpu_procs.items()}
        cpu["steady"] = ({name: cpu_by_round[-1][name] - cpu_by_round[0][name] for name in cpu_procs}  # type: ignore
                         if len(cpu_by_round) > 1 else {})
        records = await client.read_records(world.spec.world_id)
        return world, [peak[0], *rss_by_round], records, cpu
    finally:
        await nc.close()


# The fake server's process by root URL, for its CPU figures.
FAKE_SERVER_PIDS: dict[str, int] = {}


@contextlib.contextmanager
def fake_openai_server(latency_ms: float):
    """A FakeOpenAIServer in its own process; yields its root URL (without /v1)."""
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.support.devservers", "openai", "--port", str(port),
                             "--latency-ms", str(latency_ms)])
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models")
        FAKE_SERVER_PIDS[f"http://127.0.0.1:{port}"] = fake.pid
        yield f"http://127.0.0.1:{port}"
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process still running, then a kill for any still there after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_ours(root: str | None, latency_ms: float, size: int, rounds: int) -> SimulationResult:
    """``root`` None: the offline backend (no HTTP at all), else the fake OpenAI server at ``root``."""
    # The concurrency limits are the defaults a user gets (services' max_concurrency, the backends'
    # default_max_concurrency); set STABLEALIGN_MAX_CONCURRENCY / STABLEALIGN_LLM_MAX_CONCURRENCY to try others.
    env = {**os.environ, "OPENAI_BASE_URL": f"{root}/v1" if root else "", "OPENAI_API_KEY": "bench",
           "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1", "STABLEALIGN_METRICS_PORT": "-1"}
    procs: list[subprocess.Popen] = []
    try:
        with EmbeddedNatsServer() as server:
            env["STABLEALIGN_NATS_URL"] = server.url
            for name in ("agent", "observer", "world"):
                procs.append(subprocess.Popen([sys.executable, "-m", "stablealign_app.cli.main", "serve", name], env=env))
            time.sleep(3.0)  # services connect and register their subscriptions
            before = _stats(root) if root else {"requests_by_path": {}}
            cpu_procs = {name: psutil.Process(p.pid) for name, p in zip(("agent", "observer", "world"), procs)}
            cpu_procs["nats-server"] = psutil.Process(server.process.pid)
            if root:
                cpu_procs["llm_server"] = psutil.Process(FAKE_SERVER_PIDS[root])
            world, rss, records, cpu = asyncio.run(_run_world(
                server.url, bench_spec(size, rounds, root is None), cpu_procs["agent"], cpu_procs))
            steady = cpu.pop("steady")
            after = _stats(root) if root else {"requests_by_path": {}}
            stop_processes(procs)
    finally:
        stop_processes(procs)
    agents = size * size
    if world.state != world_pb2.WORLD_STATE_COMPLETED:
        raise RuntimeError(f"world ended {world_pb2.WorldState.Name(world.state)}: {world.error}")
    round_seconds = [r.duration_seconds for r in world.rounds]
    totals = [r.latency_seconds["total"] for r in records if "total" in r.latency_seconds]
    # Requests of the setup (prior embeddings) are excluded: count chat + per-interaction embeddings only.
    by_path_before, by_path_after = before["requests_by_path"], after["requests_by_path"]
    # Chat calls are all per interaction; the question embeddings are batched per round (one request per
    # 256 distinct questions) like the setup's prior embeddings, so the figure counts chat calls only.
    chat_calls = by_path_after.get("/v1/chat/completions", 0) - by_path_before.get("/v1/chat/completions", 0)
    per_interaction = chat_calls / len(records) if root else 0.0
    return SimulationResult(
        latency_ms=latency_ms, agents=agents, rounds=rounds, setup_seconds=world.setup_seconds,
        interactions_per_second=agents * len(round_seconds) / sum(round_seconds),
        round_seconds=round_seconds,
        sequential_round_trips_measured=(statistics.median(totals) / (latency_ms / 1000)) if latency_ms else None,
        sequential_round_trips_structural=len(CRITICAL_PATH),
        llm_requests_per_interaction=per_interaction,
        agent_peak_rss_mb=rss[0] / 2**20,
        agent_rss_per_agent_kb_by_round=[r / agents / 1024 for r in rss[1:]],
        steady_interactions_per_second=(agents * (len(round_seconds) - 1) / sum(round_seconds[1:])
                                        if len(round_seconds) > 1 else 0.0),
        cpu_seconds={k: round(v, 2) for k, v in cpu.items()},
        cpu_ms_per_interaction={**{k: round(1000 * v / len(records), 2) for k, v in cpu.items()},
                                "all": round(1000 * sum(cpu.values()) / len(records), 2)},
        steady_cpu_ms_per_interaction=(
            {**{k: round(1000 * v / (agents * (len(round_seconds) - 1)), 2) for k, v in steady.items()},
             "all": round(1000 * sum(steady.values()) / (agents * (len(round_seconds) - 1)), 2)} if steady else {}),
    )


def run_cli(root: str, latency_ms: float, size: int, rounds: int) -> CliResult:
    """``stable-align run`` as a user runs it (embedded stack, defaults) against the fake server at ``root``."""
    fake = psutil.Process(FAKE_SERVER_PIDS[root])
    env = {**os.environ, "OPENAI_BASE_URL": f"{root}/v1", "OPENAI_API_KEY": "bench", "STABLEALIGN_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        fake_before = _cpu(fake)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", str(size), "--rounds",
                        str(rounds), "--backend", "openai", "--out", out], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        fake_cpu = _cpu(fake) - fake_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its (waited-for) nats-server
        run_cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        summary = json.loads((Path(out) / "world.json").read_text())
    round_seconds = [r["duration_seconds"] for r in summary["rounds"]]
    interactions = size * size * rounds
    return CliResult(
        latency_ms=latency_ms, agents=size * size, rounds=rounds, command_wall_seconds=round(wall, 2),
        world_wall_seconds=round(summary["wall_seconds"], 2), setup_seconds=round(summary.get("setup_seconds", 0.0), 2),
        interactions_per_second=round(interactions / sum(round_seconds), 1), round_seconds=round_seconds,
        cpu_ms_per_interaction={"run (whole command)": round(1000 * run_cpu / interactions, 1),
                                "llm_server": round(1000 * fake_cpu / interactions, 1)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100, help="a square number (S x S)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latencies", default="offline,0,200",
                        help="server latencies in ms, comma-separated; 'offline' = the offline backend, no server")
    parser.add_argument("--baseline-agents", type=int, default=20,
                        help="agents in the original-style baseline (its setup is scaled to --agents)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--cli-rounds", type=int, default=1,
                        help="rounds of the `stable-align run` measurement at each server latency (0: skip it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    size = int(round(args.agents ** 0.5))
    if size * size != args.agents:
        parser.error("--agents must be a square number")
    results = []
    for item in args.latencies.split(","):
        if item.strip() == "offline":
            ours = run_ours(None, 0.0, size, args.rounds)
            results.append({"ours": asdict(ours), "baseline": None, "backend": "offline"})
            _print(ours, None, "offline backend (no HTTP)")
            continue
        latency = float(item)
        with fake_openai_server(latency) as root:
            ours = run_ours(root, latency, size, args.rounds)
            os.environ["STABLEALIGN_BENCH_OPENAI_URL"] = f"{root}/v1"
            cli = run_cli(root, latency, size, args.cli_rounds) if args.cli_rounds > 0 else None
            base = None if args.no_baseline else original_sandbox.run_baseline(latency, args.baseline_agents,
                                                                               args.agents)
        results.append({"ours": asdict(ours), "baseline": asdict(base) if base else None, "backend": "openai",
                        "cli": asdict(cli) if cli else None})
        _print(ours, base, f"OpenAI-compatible server, latency {latency:.0f} ms")
        if cli:
            _print_cli(cli)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _print(ours: SimulationResult, base, title: str) -> None:
    print(f"\n== {title}: {ours.agents} agents, {ours.rounds} rounds ==", flush=True)
    rows = [
        ("interactions/s (rounds)", f"{ours.interactions_per_second:.1f}",
         f"{base.interactions_per_second:.1f}" if base else "-"),
        ("interactions/s (rounds after the 1st)", f"{ours.steady_interactions_per_second:.1f}", "-"),
        ("setup seconds", f"{ours.setup_seconds:.2f}", f"{base.setup_seconds:.1f}" if base else "-"),
        ("sequential LLM round trips", f"{ours.sequential_round_trips_structural}"
         + (f" (measured {ours.sequential_round_trips_measured:.2f})" if ours.sequential_round_trips_measured else ""),
         f"{base.sequential_round_trips}" if base else "-"),
        ("LLM chat requests / interaction", f"{ours.llm_requests_per_interaction:.1f}",
         f"{base.requests_per_interaction:.1f}" if base else "-"),
        ("CPU ms / interaction", " ".join(f"{_SHORT.get(k, k)} {v:.1f}" for k, v in ours.cpu_ms_per_interaction.items()),
         "-"),
        ("CPU ms / interaction (after the 1st)",
         " ".join(f"{_SHORT.get(k, k)} {v:.1f}" for k, v in ours.steady_cpu_ms_per_interaction.items()) or "-", "-"),
        ("agent service peak RSS MB", f"{ours.agent_peak_rss_mb:.0f}", "-"),
        ("agent RSS KB/agent by round", ", ".join(f"{x:.0f}" for x in ours.agent_rss_per_agent_kb_by_round), "-"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'ours':>24}  {'original-style':>16}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>24}  {b:>16}")
    llm = ours.cpu_ms_per_interaction.get("llm_server")
    if llm:
        print(_ceiling_line(ours.agents, ours.latency_ms, llm))
    if base:
        print(f"speed-up interactions/s: {ours.interactions_per_second / base.interactions_per_second:.1f}x; "
              f"setup: {base.setup_seconds / max(ours.setup_seconds, 1e-9):.1f}x faster")


_SHORT = {"agent": "agt", "observer": "obs", "world": "wld", "nats-server": "nats", "llm_server": "llm"}


def stand_in_ceiling(agents: int, latency_ms: float, llm_cpu_ms_per_interaction: float) -> float:
    """About the interactions/s that the LLM stand-in alone allows, whatever our side costs.

    The fake server is one asyncio process that waits out a request's latency first and then does its work
    (HTTP parsing aside: reading the body, the reply, its JSON). A wave of a round (``CRITICAL_PATH``) arrives
    at once, so its replies leave one after another on that process's core once the latency is over: a
    round lasts about len(CRITICAL_PATH) x latency + the server's CPU for the round (a little less: the
    HTTP parsing overlaps the wait). On a machine where that server shares the cores with the services this
    caps what a run can show.
    """
    round_floor = len(CRITICAL_PATH) * latency_ms / 1000 + agents * llm_cpu_ms_per_interaction / 1000
    return agents / round_floor if round_floor > 0 else float("inf")


def _ceiling_line(agents: int, latency_ms: float, llm_cpu_ms: float) -> str:
    return (f"ceiling set by the LLM stand-in alone ({len(CRITICAL_PATH)} x {latency_ms:.0f} ms + its {llm_cpu_ms:.1f} "
            f"CPU ms per interaction on its one core): about "
            f"{stand_in_ceiling(agents, latency_ms, llm_cpu_ms):.1f} interactions/s")


def _print_cli(cli: CliResult) -> None:
    print(f"-- stable-align run --size {int(cli.agents ** 0.5)} --rounds {cli.rounds} --backend openai "
          f"(defaults: embedded stack), latency {cli.latency_ms:.0f} ms --", flush=True)
    print(f"whole command {cli.command_wall_seconds:.2f} s; world {cli.world_wall_seconds:.2f} s (setup "
          f"{cli.setup_seconds:.2f} s); {cli.interactions_per_second:.1f} interactions/s in rounds "
          f"({', '.join(f'{r:.2f}' for r in cli.round_seconds)} s); CPU ms / interaction: "
          + ", ".join(f"{k} {v:.1f}" for k, v in cli.cpu_ms_per_interaction.items()), flush=True)
    print(_ceiling_line(cli.agents, cli.latency_ms, cli.cpu_ms_per_interaction.get("llm_server", 0.0)), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
