"""Scale benchmark: one-round worlds of 1,000 to 100,000 agents on the offline backend through NATS.

    python -m bench.scale [--sizes 32,100] [--full] [--rounds 1] [--embedding minilm|hashing]
                          [--baseline-src DIR] [--json FILE]

For each size S (S² agents) the benchmark starts, as separate processes: a nats-server with
JetStream, one process per service (`stable-align serve agent|observer|world`), and then
`stable-align run --size S --rounds R --backend offline --nats URL --out DIR` — exactly what a
user runs against deployed services, records.jsonl export included. While they run it samples
the resident memory of every one of those processes (and their children) every 0.2 s with
psutil and reports, per size:

- wall seconds of `stable-align run` (create → completed → records.jsonl written), the world's
  setup seconds (prior pool + batches) and round seconds, and interactions/s over the round(s),
- peak RSS summed over all processes at the same instant, and each process's own peak,
- KB per agent of that peak, so linearity from 1,000 to 100,000 agents can be read off,
- CPU seconds per process.

Baselines: (1) in this process, the memory per agent of the former layout (a 64 x 384 float32
matrix plus M decoded prior strings per agent) against the shared pool (M int32 indices) on the
same prior pairs; (2) with ``--baseline-src DIR`` (e.g. ``git archive <rev> | tar -x -C DIR``),
the same worlds are run on that source tree too and the ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.simulation import stop_processes  # SIGTERM, then kill after 30 s
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign_app.natsserver import EmbeddedNatsServer

SERVICES = ("agent", "observer", "world")
DEFAULT_SIZES = (32, 100)
FULL_SIZE = 317  # 100,489 agents


@dataclass
class ScaleResult:
    source: str
    size: int
    agents: int
    rounds: int
    embedding: str
    wall_seconds: float
    setup_seconds: float
    round_seconds: list[float]
    interactions_per_second: float
    peak_rss_mb: float
    peak_rss_mb_by_process: dict[str, float]
    cpu_seconds_by_process: dict[str, float]
    records: int
    ok: bool = True
    error: str = ""
    samples: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def kb_per_agent(self) -> float:
        return self.peak_rss_mb * 1024 / self.agents


class RssSampler:
    """Samples the summed RSS of named processes (with their children) in a thread; keeps the peaks."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.procs: dict[str, psutil.Process] = {}
        self.peak_total = 0
        self.peak_by_name: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = psutil.Process(pid)

    def _tree(self, proc: psutil.Process) -> list[psutil.Process]:
        try:
            return [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        total = 0
        with self._lock:
            procs = dict(self.procs)
        for name, proc in procs.items():
            rss, cpu = 0, 0.0
            for p in self._tree(proc):
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    cpu += times.user + times.system
            total += rss
            self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), rss)
            if cpu:
                self.cpu[name] = max(self.cpu.get(name, 0.0), cpu)
        self.peak_total = max(self.peak_total, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def _wait_ready(url: str, timeout: float = 120.0) -> None:
    """Until the agent, observer and world services answer on their subjects (any reply, even an error)."""
    import nats.errors

    nc = await nats_client.connect(url, name="bench-ready")
    try:
        deadline = time.monotonic() + timeout
        for subject in (subjects.AGENT_DRAFT, subjects.OBSERVER_RATE, subjects.WORLD_LIST):
            while True:
                try:
                    await nc.request(subject, b"", timeout=2.0)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no service answers on {subject}") from None
                    await asyncio.sleep(0.3)
    finally:
        await nc.close()


def run_size(size: int, rounds: int, embedding: str, *, source: Path | None, workdir: Path,
             timeout: float) -> ScaleResult:
    """One world of size x size agents on fresh processes; ``source`` runs another source tree's code."""
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1",
           "STABLEALIGN_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1"}
    cwd = None
    if source is not None:
        env["PYTHONPATH"] = str(source)
        cwd = str(source)
        env.setdefault("STABLEALIGN_DATA_DIR", str(_data_dir()))
    out = workdir / f"{'baseline' if source else 'current'}-{size}"
    procs: list[subprocess.Popen] = []
    logs = []
    result_error = ""
    started = time.perf_counter()
    store = workdir / f"nats-{out.name}"
    store.mkdir(parents=True, exist_ok=True)
    with EmbeddedNatsServer(store_dir=store) as server, RssSampler() as sampler:
        env["STABLEALIGN_NATS_URL"] = server.url
        sampler.add("nats-server", server.process.pid)  # (this harness process is not counted)
        try:
            for name in SERVICES:
                log = open(workdir / f"{out.name}-{name}.log", "wb")  # noqa: SIM115 - closed below
                logs.append(log)
                proc = subprocess.Popen([sys.executable, "-m", "stablealign_app.cli.main", "serve", name],
                                        env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                procs.append(proc)
                sampler.add(name, proc.pid)
            asyncio.run(_wait_ready(server.url))
            cmd = [sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", str(size), "--rounds",
                   str(rounds), "--backend", "offline", "--seed", "1", "--out", str(out), "--nats", server.url,
                   "--timeout", str(timeout)]
            if embedding == "hashing":
                cmd += ["--embedding-model", "hashing"]
            started = time.perf_counter()
            cli = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            sampler.add("stable-align run", cli.pid)
            output, _ = cli.communicate(timeout=timeout + 120)
            wall = time.perf_counter() - started
            sampler.sample()
            if cli.returncode != 0:
                result_error = output.decode(errors="replace")[-2000:]
        finally:
            stop_processes(procs)
            for log in logs:
                log.close()
    summary = json.loads((out / "world.json").read_text()) if (out / "world.json").is_file() else {}
    round_seconds = [float(r.get("duration_seconds", 0.0)) for r in summary.get("rounds", [])]
    agents = size * size
    return ScaleResult(
        source=str(source) if source else "current", size=size, agents=agents, rounds=rounds, embedding=embedding,
        wall_seconds=round(wall if not result_error else time.perf_counter() - started, 2),
        setup_seconds=round(float(summary.get("setup_seconds", 0.0)), 2),
        round_seconds=[round(s, 2) for s in round_seconds],
        interactions_per_second=round(agents * len(round_seconds) / sum(round_seconds), 1) if round_seconds else 0.0,
        peak_rss_mb=round(sampler.peak_total / 2**20, 1),
        peak_rss_mb_by_process={k: round(v / 2**20, 1) for k, v in sampler.peak_by_name.items()},
        cpu_seconds_by_process={k: round(v, 1) for k, v in sampler.cpu.items()},
        records=int(summary.get("records", 0)), ok=not result_error and summary.get("state") == "WORLD_STATE_COMPLETED",
        error=result_error, samples=sampler.samples,
    )


def _data_dir() -> Path:
    from stablealign.sandbox import data

    return data.data_dir()


def per_agent_memory(agents: int = 1000, prior_size: int = 50, dim: int = 384) -> dict[str, float]:
    """Bytes per agent of the former per-agent layout vs the shared pool, measured with tracemalloc on
    the real prior pairs (vectors: the hashing embedder, same size as MiniLM's)."""

    from services.world import grid
    from stablealign.llm.backends.embeddings import HashingEmbedder
    from stablealign.sandbox import data
    from stablealign.sandbox.memory import AgentMemory, MemoryPool
    from stablealign.v1 import common_pb2

    pairs = data.load_prior_pairs()
    questions = sorted({p.question for p in pairs})
    row_of = {q: i for i, q in enumerate(questions)}
    vectors = HashingEmbedder(dim).embed_sync(questions)
    draws = [grid.rng_for(1, "prior", a).choice(len(pairs), size=prior_size, replace=False) for a in range(agents)]
    pool = MemoryPool.build(questions, [p.chosen for p in pairs], [row_of[p.question] for p in pairs], vectors)
    # Serialized batches as the agent service receives them (decoding makes each agent's own strings).
    old_batches = []
    for idx in draws:
        entries = []
        for i in idx:
            e = common_pb2.MemoryEntry(question=pairs[i].question, answer=pairs[i].chosen, source="prior", round=-1)
            e.question_embedding.extend(vectors[row_of[pairs[i].question]].tolist())
            entries.append(e)
        old_batches.append(common_pb2.MemoryBatch(entries=entries).SerializeToString())

    def measure(build) -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kept = [build(a) for a in range(agents)]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del kept
        return (after - before) / agents

    def old(a: int) -> AgentMemory:
        batch = common_pb2.MemoryBatch()
        batch.ParseFromString(old_batches[a])
        memory = AgentMemory(capacity=64)  # the former default capacity
        memory.extend(batch.entries, 1)
        return memory

    def new(a: int) -> AgentMemory:
        memory = AgentMemory()
        memory.extend_pool(pool, draws[a], 1)
        return memory

    old_bytes, new_bytes = measure(old), measure(new)
    return {"former_bytes_per_agent": round(old_bytes), "pool_bytes_per_agent": round(new_bytes),
            "pool_bytes_once": pool.nbytes, "ratio": round(old_bytes / max(new_bytes, 1.0), 1),
            "prior_size": prior_size, "dim": dim, "matrix_estimate_bytes": 64 * dim * 4}


def _print(results: list[ScaleResult], baselines: list[ScaleResult], memory: dict) -> None:
    print("\n== per-agent memory of an agent's cached prior (agent service, tracemalloc, "
          f"M={memory['prior_size']}, dim {memory['dim']}) ==")
    print(f"former layout (64 x {memory['dim']} float32 matrix + M decoded strings): "
          f"{memory['former_bytes_per_agent'] / 1024:.1f} KB/agent")
    print(f"shared pool (M int32 indices + object): {memory['pool_bytes_per_agent'] / 1024:.2f} KB/agent "
          f"(+ {memory['pool_bytes_once'] / 2**20:.1f} MB once per pool): {memory['ratio']:.0f}x less")
    header = (f"{'agents':>8} {'src':>8} {'wall s':>8} {'setup s':>8} {'round s':>9} {'inter/s':>8} "
              f"{'peak RSS MB':>11} {'KB/agent':>9}  per process peak MB")
    print("\n== one-round worlds, offline backend, through NATS (all processes together) ==")
    print(header)
    for r in [*results, *baselines]:
        procs = ", ".join(f"{k} {v:.0f}" for k, v in r.peak_rss_mb_by_process.items())
        rounds = "/".join(f"{s:.1f}" for s in r.round_seconds) or "-"
        status = "" if r.ok else "  FAILED"
        print(f"{r.agents:>8} {'base' if r.source != 'current' else 'new':>8} {r.wall_seconds:>8.1f} "
              f"{r.setup_seconds:>8.1f} {rounds:>9} {r.interactions_per_second:>8.1f} {r.peak_rss_mb:>11.0f} "
              f"{r.kb_per_agent:>9.1f}  {procs}{status}")
    for b in baselines:
        match = next((r for r in results if r.size == b.size and r.ok), None)
        if match and b.ok:
            print(f"{b.agents} agents vs baseline: wall {b.wall_seconds / match.wall_seconds:.1f}x faster, "
                  f"peak RSS {b.peak_rss_mb / match.peak_rss_mb:.1f}x smaller")
    ok = [r for r in results if r.ok]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        scale = last.agents / first.agents
        print(f"from {first.agents} to {last.agents} agents ({scale:.0f}x): wall x{last.wall_seconds / first.wall_seconds:.1f}, "
              f"round x{sum(last.round_seconds) / max(sum(first.round_seconds), 1e-9):.1f}, "
              f"peak RSS x{last.peak_rss_mb / first.peak_rss_mb:.1f}, "
              f"marginal {(last.peak_rss_mb - first.peak_rss_mb) * 1024 / (last.agents - first.agents):.1f} KB/agent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="grid sides, comma-separated (32 = 1,024 agents, 100 = 10,000)")
    parser.add_argument("--full", action="store_true", help=f"also size {FULL_SIZE} (100,489 agents; tens of minutes "
                                                            "on 2 cores)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--embedding", choices=("minilm", "hashing"), default="minilm",
                        help="minilm: the offline default (all-MiniLM-L6-v2, cached on disk); hashing: no model")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a source tree of an earlier version (with stablealign/v1 generated) to measure too")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.full and FULL_SIZE not in sizes:
        sizes.append(FULL_SIZE)
    results: list[ScaleResult] = []
    baselines: list[ScaleResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            result = run_size(size, args.rounds, args.embedding, source=None, workdir=workdir, timeout=args.timeout)
            results.append(result)
            print(json.dumps({k: v for k, v in asdict(result).items() if k != "error"}), flush=True)
            if result.error:
                print(result.error, file=sys.stderr)
            if args.baseline_src:
                base = run_size(size, args.rounds, args.embedding, source=args.baseline_src.resolve(),
                                workdir=workdir, timeout=args.timeout)
                baselines.append(base)
                print(json.dumps({k: v for k, v in asdict(base).items() if k != "error"}), flush=True)
                if base.error:
                    print(base.error, file=sys.stderr)
    memory = per_agent_memory()
    _print(results, baselines, memory)
    if args.json:
        args.json.write_text(json.dumps({"memory": memory, "results": [asdict(r) for r in results],
                                         "baselines": [asdict(b) for b in baselines]}, indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
