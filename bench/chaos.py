"""Chaos suite: one fault per row, real processes on loopback, every record counted by an independent reader.

    python -m bench.chaos [--size 4] [--rounds 3] [--only agent-kill,llm-30] [--write-docs]   (make chaos)

Each world row starts, on 127.0.0.1 only: a nats-server with JetStream and its own store directory,
an OpenAI-protocol devserver as the LLM (tests.support.devservers, in this process so that its error rate
and hang mode can be switched while it serves), and the services as ``stable-align serve`` subprocesses
(2 agent replicas, 1 observer, 1 world), each in its own process group. Then ``stable-align run --nats URL
--backend openai --url LLM --out DIR`` creates a world as a user would; once the SANDBOX_RECORDS stream
has made ``--trigger`` of the world's LLM calls the row's fault is injected (kill -9 of a process group, a NATS kill -9 and
restart on the same port and store, LLM error rates, a hung LLM). When ``run`` exits, a fresh nats-py
client (not the project's bus helpers) reads ``sandbox.records.<world>`` and counts the messages and the
distinct (round, agent) pairs; records.jsonl written by ``run`` is counted too.

Columns: expected = size² × rounds; got = messages in the stream; distinct = distinct (round, agent);
duplicated = got - distinct; jsonl = rows of records.jsonl; recovery = seconds from the fault's injection
to the first record the stream stored after the fault was cleared (server timestamps; for a fault that
lasts to the end of the world - error rates - from its injection); max gap = longest pause between two
consecutive records of the world; wall = the row, processes started to processes stopped.

The training row kills ``stable-align train`` (kill -9) after a checkpoint, runs the same command again
(it resumes from the last checkpoint) and compares the final weights with an uninterrupted run; its
recovery is from the kill to the resumed run's first step past the one the kill interrupted. The trainer
row does the same through the trainer service, killing the service. Every row has a timeout; every process
is killed by process group when a row ends, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.js.api import DeliverPolicy

from stablealign.core.metrics import free_port
from stablealign.v1 import common_pb2
from stablealign_app.natsserver import EmbeddedNatsServer
from tests.support.devservers import FakeOpenAIServer

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]
REPO = Path(__file__).resolve().parents[1]
STREAM, SUBJECT = "SANDBOX_RECORDS", "sandbox.records.{world_id}"  # stablealign/nats/client.py, spelled out on purpose

# The failure budget and deadlines every world row runs with (env of the services).
SERVICE_ENV = {
    "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1", "STABLEALIGN_METRICS_PORT": "-1",
    "OPENAI_API_KEY": "chaos",
    "STABLEALIGN_LLM_DEADLINE_SECONDS": "8",         # agent/observer: one LLM call (backend retries included)
    "STABLEALIGN_REQUEST_TIMEOUT_SECONDS": "20",     # world: one agent/observer reply
    "STABLEALIGN_ABSENT_BUDGET_SECONDS": "120",      # world: services absent
    "STABLEALIGN_ERROR_BUDGET_CONSECUTIVE": "200",   # world: failed tries in a row while nothing succeeds
    "STABLEALIGN_FAILURE_BACKOFF_MAX_SECONDS": "1",
    "STABLEALIGN_LEASE_SECONDS": "6",
}
CALLS_PER_INTERACTION = 8.5  # LLM requests of one interaction (draft, feedback x partners, 4 ratings, revise)
_LIVE: set[subprocess.Popen | asyncio.subprocess.Process] = set()


# --- processes ----------------------------------------------------------------------------------------------
def _kill_group(proc, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_all_live() -> None:
    for proc in list(_LIVE):
        _kill_group(proc)
    _LIVE.clear()


@dataclass
class Cluster:
    """nats-server + `stable-align serve` process groups; everything loopback, every process tracked."""

    workdir: Path
    llm_url: str
    env: dict[str, str] = field(default_factory=dict)
    nats: EmbeddedNatsServer | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_nats(self) -> None:
        (self.workdir / "nats").mkdir(parents=True, exist_ok=True)
        self.nats = EmbeddedNatsServer(store_dir=self.workdir / "nats", port=free_port()).start()

    @property
    def url(self) -> str:
        return self.nats.url

    def service_env(self) -> dict[str, str]:
        return {**os.environ, **SERVICE_ENV, "OPENAI_BASE_URL": self.llm_url, "STABLEALIGN_NATS_URL": self.url,
                **self.env}

    def serve(self, kind: str, instance: str) -> subprocess.Popen:
        log = open(self.workdir / f"{instance}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([*CLI, "serve", kind, "--instance", instance], env=self.service_env(),
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, cwd=REPO)
        log.close()
        self.procs[instance] = proc
        _LIVE.add(proc)
        return proc

    def kill9(self, instance: str) -> None:
        proc = self.procs.pop(instance)
        _kill_group(proc)
        proc.wait(timeout=30)
        _LIVE.discard(proc)

    def kill9_nats(self) -> None:
        self.nats.process.kill()
        self.nats.process.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait(timeout=10)
            _LIVE.discard(proc)
        self.procs.clear()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                self.nats.stop()


async def _quiet(*_: object) -> None:
    """nats-py's default error callback logs a traceback per failed reconnect: expected here, not news."""


async def _monitor(url: str):
    return await nats.connect(url, name="chaos-monitor", allow_reconnect=True, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.25, connect_timeout=2, error_cb=_quiet)


async def _wait_responders(nc, subjects: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for subject in subjects:
        while True:
            try:
                await nc.request(subject, b"\xff", timeout=1.0)  # malformed: an error reply says someone is there
                break
            except Exception:  # noqa: BLE001 - no responders yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no responder on {subject} after {timeout:.0f}s") from None
                await asyncio.sleep(0.2)


async def _stream_count(nc, world_id: str) -> int:
    try:
        info = await nc.jetstream().stream_info(STREAM, subjects_filter=SUBJECT.format(world_id=world_id))
    except Exception:  # noqa: BLE001 - NATS away or the stream not there yet
        return -1
    return sum((info.state.subjects or {}).values())


# --- the independent reader ---------------------------------------------------------------------------------
@dataclass
class Count:
    got: int
    distinct: int
    stored: int  # the stream's own count for the subject (stream_info), a cross-check of `got`
    times: list[float]  # server timestamps, in stream order
    msg_ids_distinct: int


async def read_records(url: str, world_id: str, timeout: float = 30.0) -> Count:
    """Every message of ``sandbox.records.<world>``, read by a fresh client with an ordered consumer."""
    nc = await nats.connect(url, name="chaos-reader", connect_timeout=5, max_reconnect_attempts=5, error_cb=_quiet)
    try:
        js = nc.jetstream()
        subject = SUBJECT.format(world_id=world_id)
        info = await js.stream_info(STREAM, subjects_filter=subject)
        stored = sum((info.state.subjects or {}).values())
        pairs, ids, times = set(), set(), []
        got = 0
        if stored:
            sub = await js.subscribe(subject, stream=STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
                    record = common_pb2.InteractionRecord()
                    record.ParseFromString(msg.data)
                    got += 1
                    pairs.add((record.round, record.agent_id))
                    ids.add((msg.headers or {}).get("Nats-Msg-Id", f"none-{got}"))
                    times.append(msg.metadata.timestamp.timestamp())
                    if msg.metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
        return Count(got=got, distinct=len(pairs), stored=stored, times=times, msg_ids_distinct=len(ids))
    finally:
        await nc.close()


# --- rows ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    fault: str
    expected: int | str = 0
    got: int | str = "-"
    distinct: int | str = "-"
    duplicated: int | str = "-"
    jsonl: int | str = "-"
    state: str = "-"
    recovery_s: float | None = None
    max_gap_s: float | None = None
    wall_s: float = 0.0
    note: str = ""
    ok: bool = False


@dataclass
class Fault:
    """What happened: when it was injected and when it was cleared (wall clock, time.time())."""

    injected: float = 0.0
    cleared: float = 0.0
    note: str = ""


FaultFn = Callable[[Cluster, FakeOpenAIServer, Fault], Awaitable[None]]


async def _kill_agent(c: Cluster, llm: FakeOpenAIServer, f: Fault) -> None:
    f.injected = time.time()
    await asyncio.to_thread(c.kill9, "agent-0")
    f.cleared = time.time()
    f.note = "1 of 2 replicas, not restarted"


def _kill_and_restart(kind: str, away_seconds: float, note: str) -> FaultFn:
    """kill -9 of the only ``kind`` replica, the same instance started again ``away_seconds`` later."""

    async def fault(c: Cluster, llm: FakeOpenAIServer, f: Fault) -> None:
        f.injected = time.time()
        await asyncio.to_thread(c.kill9, f"{kind}-0")
        await asyncio.sleep(away_seconds)
        c.serve(kind, f"{kind}-0")
        f.cleared = time.time()
        f.note = note

    return fault


_kill_observer = _kill_and_restart("observer", 5.0, "the only replica, back after 5 s")
_kill_world = _kill_and_restart("world", 3.0, "back after 3 s (same instance); `run` follows")


async def _kill_nats(c: Cluster, llm: FakeOpenAIServer, f: Fault) -> None:
    f.injected = time.time()
    await asyncio.to_thread(c.kill9_nats)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(c.nats.start)
    f.cleared = time.time()
    f.note = "kill -9, same port and store after 2 s"


def _error_rate(rate: float) -> FaultFn:
    async def inject(c: Cluster, llm: FakeOpenAIServer, f: Fault) -> None:
        llm.error_rate = rate
        f.injected = f.cleared = time.time()
        f.note = f"{rate:.0%} of LLM calls 500/429 until the end"
    return inject


async def _hang(c: Cluster, llm: FakeOpenAIServer, f: Fault) -> None:
    f.injected = time.time()
    llm.hang = True
    await asyncio.sleep(10.0)
    llm.hang = False
    f.cleared = time.time()
    f.note = "no LLM reply for 10 s, then healthy"


WORLD_ROWS: dict[str, tuple[str, FaultFn]] = {
    "agent-kill": ("kill -9 agent replica", _kill_agent),
    "observer-kill": ("kill -9 observer, restart", _kill_observer),
    "world-kill": ("kill -9 world service, restart", _kill_world),
    "nats-kill": ("kill -9 nats-server, restart", _kill_nats),
    "llm-30": ("LLM 30 % errors", _error_rate(0.3)),
    "llm-60": ("LLM 60 % errors", _error_rate(0.6)),
    "llm-hang": ("LLM hung 10 s", _hang),
}


async def world_row(key: str, *, size: int, rounds: int, trigger: float, timeout: float, workdir: Path,
                    latency: float = 0.05) -> Row:
    label, inject = WORLD_ROWS[key]
    row = Row(fault=label, expected=size * size * rounds)
    started = time.monotonic()
    world_id = f"chaos-{key}"
    out = workdir / "out"
    async with FakeOpenAIServer(latency_seconds=latency, error_statuses=(500, 429), error_seed=11) as llm:
        cluster = Cluster(workdir, llm_url=llm.base_url)
        run = None
        monitor = None
        try:
            cluster.start_nats()
            for name, kind in (("agent-0", "agent"), ("agent-1", "agent"), ("observer-0", "observer"),
                               ("world-0", "world")):
                cluster.serve(kind, name)
            monitor = await _monitor(cluster.url)
            await _wait_responders(monitor, ["sandbox.agent.draft", "sandbox.observer.rate", "sandbox.world.get"],
                                   timeout=90)
            run_log = open(workdir / "run.log", "wb")  # noqa: SIM115, ASYNC230 - a local file, once
            run = await asyncio.create_subprocess_exec(
                *CLI, "run", "--nats", cluster.url, "--size", str(size), "--rounds", str(rounds),
                "--backend", "openai", "--url", llm.base_url, "--model", "fake-gpt",
                "--embedding-backend", "offline", "--embedding-model", "hashing", "--prior-size", "5",
                "--seed", "3", "--world-id", world_id, "--out", str(out), "--timeout", str(int(timeout)),
                env=cluster.service_env(), stdout=asyncio.subprocess.DEVNULL, stderr=run_log,
                start_new_session=True, cwd=REPO)
            run_log.close()
            _LIVE.add(run)
            # Records of a round arrive together at its end, so the trigger is LLM traffic: a share of the
            # world's calls (about CALLS_PER_INTERACTION per interaction), which lands inside a round.
            calls = max(1, int(trigger * size * size * rounds * CALLS_PER_INTERACTION))
            deadline = time.monotonic() + timeout
            while llm.requests_total < calls:
                if run.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the world never made {calls} LLM calls (made {llm.requests_total})")
                await asyncio.sleep(0.02)
            at_fault = await _stream_count(monitor, world_id)
            fault = Fault()
            await inject(cluster, llm, fault)
            try:
                await asyncio.wait_for(run.wait(), timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                row.note = f"`run` still running after {timeout:.0f}s; "
            count = await read_records(cluster.url, world_id)
            row.got, row.distinct, row.duplicated = count.got, count.distinct, count.got - count.distinct
            jsonl = out / "records.jsonl"
            row.jsonl = sum(1 for line in jsonl.read_text().splitlines() if line.strip()) if jsonl.exists() else 0
            summary = out / "world.json"
            row.state = (json.loads(summary.read_text()).get("state", "?").replace("WORLD_STATE_", "")
                         if summary.exists() else f"run exit {run.returncode}")
            after = [t for t in count.times if t > fault.cleared]
            row.recovery_s = (after[0] - fault.injected) if after else None
            gaps = [b - a for a, b in zip(count.times, count.times[1:])]
            row.max_gap_s = max(gaps) if gaps else None
            stats = (f"fault at {at_fault} records; LLM requests {llm.requests_total}, "
                     f"failed {sum(s != 200 for _, _, s in llm.request_log)}")
            row.note += "; ".join(x for x in (fault.note, stats) if x)
            if count.stored != count.got:
                row.note += f"; stream_info says {count.stored}"
            row.ok = (row.got == row.distinct == row.expected == row.jsonl and row.state == "COMPLETED"
                      and run.returncode == 0)
            if run.returncode not in (0, None):
                tail = (workdir / "run.log").read_text(errors="replace")[-600:]
                row.note += f"; run exit {run.returncode}: {tail!r}"
        finally:
            if run is not None and run.returncode is None:
                _kill_group(run)
                await run.wait()
            _LIVE.discard(run)
            if monitor is not None:
                with contextlib.suppress(Exception):
                    await monitor.close()
            await asyncio.to_thread(cluster.stop)
    row.wall_s = time.monotonic() - started
    return row


# --- training: kill -9 mid-job, resume, same weights ----------------------------------------------------------
def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_METRICS_PORT": "-1"}
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"stable-align {' '.join(args[:2])}: exit {result.returncode}: {result.stderr[-1500:]}")
    return result


def _log_steps(out: Path) -> list[int]:
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(int(json.loads(line)["step"]))
    return steps


def training_row(workdir: Path, *, steps: int = 24, save_steps: int = 4, kill_after: int = 9,
                 timeout: float = 600) -> Row:
    row = Row(fault="kill -9 training job, resume", expected=f"{steps} steps")
    started = time.monotonic()
    model, data = _prepare_training(workdir)

    def train_args(out: Path) -> list[str]:
        return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
                "--save-steps", str(save_steps), "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
                "--max-length", "128", "--seed", "5", "--warmup-ratio", "0", "--resume"]

    _cli(*train_args(workdir / "unbroken"), timeout=timeout)
    broken = workdir / "broken"
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_METRICS_PORT": "-1"}
    proc = subprocess.Popen([*CLI, *train_args(broken)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    _LIVE.add(proc)
    try:
        deadline = time.monotonic() + timeout
        while (max(_log_steps(broken), default=0) < kill_after and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        killed_at = max(_log_steps(broken), default=0)
        injected = time.time()
        _kill_group(proc)
        proc.wait(timeout=30)
    finally:
        _LIVE.discard(proc)
    if killed_at >= steps:
        row.note = "the job finished before it could be killed"
        row.wall_s = time.monotonic() - started
        return row
    checkpoint = (killed_at // save_steps) * save_steps
    proc = subprocess.Popen([*CLI, *train_args(broken)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, cwd=REPO, text=True)
    _LIVE.add(proc)
    first_new = None
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if first_new is None and max(_log_steps(broken), default=0) > killed_at:  # progress past the kill
                first_new = time.time()
            time.sleep(0.01)
        if proc.poll() is None:
            _kill_group(proc)
        proc.wait(timeout=30)
    finally:
        _LIVE.discard(proc)
    from safetensors.torch import load_file

    logged = _log_steps(broken)
    row.got, row.distinct = len(logged), len(set(logged))
    row.duplicated = row.got - row.distinct
    row.jsonl = "-"
    a, b = load_file(str(workdir / "unbroken" / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    same = diff < 1e-6 and set(a) == set(b)
    row.state = "same weights" if same else f"weights differ (max abs diff {diff:.2e})"
    row.recovery_s = (first_new - injected) if first_new else None
    row.note = f"killed after step {killed_at}, resumed from checkpoint step {checkpoint}; max abs diff {diff:.1e}"
    row.ok = same and logged == list(range(1, steps + 1)) and proc.returncode == 0
    row.wall_s = time.monotonic() - started
    return row


TRAIN_ARGS = {"max_steps": "24", "save_steps": "4", "per_device_train_batch_size": "2",
              "gradient_accumulation_steps": "2", "learning_rate": "3e-3", "max_length": "128", "seed": "5",
              "warmup_ratio": "0"}


def _prepare_training(workdir: Path) -> tuple[Path, Path]:
    model, sim, data = workdir / "tiny", workdir / "sim", workdir / "data" / "alignment.jsonl"
    _cli("model", "init-tiny", "--out", str(model))
    _cli("run", "--size", "3", "--rounds", "2", "--backend", "offline", "--seed", "1", "--out", str(sim))
    _cli("data", "build", "--records", str(sim / "records.jsonl"), "--out", str(data), "--seed", "1")
    return model, data


def _job(url: str, job_id: str) -> dict:
    return json.loads(_cli("jobs", "show", job_id, "--json", "--nats", url, timeout=60).stdout)


def _wait_job(url: str, job_id: str, timeout: float, states: tuple[str, ...]) -> dict:
    """The job once in one of ``states`` (none: as soon as the trainer answers), or as it is at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = _job(url, job_id)
        except RuntimeError:  # the trainer not (yet) answering
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if not states or job.get("state", "").replace("JOB_STATE_", "") in states or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def _wait_gone(pid: str | None, timeout: float) -> float:
    """Seconds until process ``pid`` no longer exists (bounded by ``timeout``)."""
    started = time.monotonic()
    while pid and pid.isdigit() and time.monotonic() - started < timeout:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(0.05)
    return time.monotonic() - started


def trainer_service_row(workdir: Path, *, kill_after: int = 9, timeout: float = 400) -> Row:
    """kill -9 of the trainer service mid-job (its job's process group is left alone, as in a crash);
    restarted, it fails the job and stops the orphan; the job submitted again (same id) resumes from the checkpoint
    in its own output directory."""
    steps, save = int(TRAIN_ARGS["max_steps"]), int(TRAIN_ARGS["save_steps"])
    row = Row(fault="kill -9 trainer service, restart, resubmit", expected=f"{steps} steps")
    started = time.monotonic()
    model, data = _prepare_training(workdir)
    # The job's model, data and output live in the row's directory: the trainer's roots (issue 10.5); each job
    # writes to <root>/<job_id> (issue 19).
    roots = {f"STABLEALIGN_TRAINER_{name}": str(workdir) for name in ("DATA_ROOTS", "MODEL_ROOTS", "OUTPUT_ROOT")}
    cluster = Cluster(workdir, llm_url="http://127.0.0.1:9/v1", env=roots)
    orphan = None
    try:
        cluster.start_nats()
        cluster.serve("trainer", "trainer-0")
        args = [f"--arg={k}={v}" for k, v in TRAIN_ARGS.items()]

        def submit(job_id: str) -> Path:
            _cli("jobs", "submit", "--job-id", job_id, "--model", str(model), "--data", str(data),
                 "--runner", "local", *args, "--nats", cluster.url, timeout=120)
            return workdir / job_id

        unbroken = submit("unbroken")
        done = _wait_job(cluster.url, "unbroken", timeout, ("SUCCEEDED", "FAILED", "CANCELLED"))
        if done.get("state") != "JOB_STATE_SUCCEEDED":
            raise RuntimeError(f"the uninterrupted job ended {done.get('state')}: {done.get('message')}")
        broken = submit("broken")
        deadline = time.monotonic() + timeout
        while max(_log_steps(broken), default=0) < kill_after and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at = max(_log_steps(broken), default=0)
        orphan = _job(cluster.url, "broken").get("handle")
        injected = time.time()
        cluster.kill9("trainer-0")
        time.sleep(2.0)
        cluster.serve("trainer", "trainer-0")
        first = _wait_job(cluster.url, "broken", 120, ("SUCCEEDED", "FAILED", "CANCELLED"))
        first_state = first.get("state", "?").replace("JOB_STATE_", "")
        if killed_at >= steps or first_state == "SUCCEEDED":
            row.note = f"the job was not interrupted (killed at step {killed_at}, ended {first_state})"
            return row
        # The restarted trainer SIGTERMs the orphaned training process group; wait until it is gone before
        # the job runs again in its output directory (seconds it took: in the note).
        gone_after = _wait_gone(orphan, 30.0)
        reached = max(_log_steps(broken), default=0)  # the orphan may have trained on meanwhile
        submit("broken")  # the same job again: FAILED -> QUEUED, resuming its own checkpoint
        first_new = None
        checkpoint = (reached // save) * save
        state, asked = "?", 0.0
        while time.monotonic() < deadline:
            if first_new is None and max(_log_steps(broken), default=0) > reached:  # progress past the orphan
                first_new = time.time()
            if time.monotonic() - asked > 2.0:
                state = _wait_job(cluster.url, "broken", 30, ()).get("state", "").replace("JOB_STATE_", "")
                asked = time.monotonic()
                if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
            time.sleep(0.05)
        from safetensors.torch import load_file

        logged = _log_steps(broken)
        row.got, row.distinct, row.duplicated = len(logged), len(set(logged)), len(logged) - len(set(logged))
        a = load_file(str(unbroken / "model.safetensors"))
        b = load_file(str(broken / "model.safetensors")) if (broken / "model.safetensors").exists() else {}
        diff = max((float((a[k] - b[k]).abs().max()) for k in a if k in b), default=float("inf"))
        same = diff < 1e-6 and set(a) == set(b)
        row.state = "same weights" if same else f"weights differ (max abs diff {diff:.2e})"
        row.recovery_s = (first_new - injected) if first_new else None
        row.note = (f"service killed at step {killed_at}: job {first_state} ({first.get('message', '')[:40]}); "
                    f"orphaned training process reached step {reached}, gone {gone_after:.1f}s after the restart; "
                    f"resubmitted, resumed from checkpoint step {checkpoint}; "
                    f"resubmitted job {state}; max abs diff {diff:.1e}")
        row.ok = same and logged == list(range(1, steps + 1)) and state == "SUCCEEDED"
        return row
    finally:
        if orphan and orphan.isdigit():  # the trainer stops it on restart; this is for a row that broke first
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(orphan), signal.SIGKILL)
        cluster.stop()
        row.wall_s = time.monotonic() - started


# --- the table ----------------------------------------------------------------------------------------------
HEADER = ("| fault | expected | got (stream) | distinct | duplicated | records.jsonl | world state | recovery s "
          "| max gap s | wall s | ok | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[Row]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(f"| {r.fault} | {r.expected} | {r.got} | {r.distinct} | {r.duplicated} | {r.jsonl} | {r.state} "
                     f"| {_s(r.recovery_s)} | {_s(r.max_gap_s)} | {r.wall_s:.0f} | {'yes' if r.ok else 'NO'} "
                     f"| {r.note.replace('|', '/')} |")
    return "\n".join(lines)


DOC_INTRO = """# Reliability: the chaos table

`make chaos` (`python -m bench.chaos`) injects one fault per row into a real deployment on loopback -
a nats-server with JetStream, `stable-align serve agent` ×2, `observer`, `world` as separate processes,
an OpenAI-protocol devserver as the LLM - while `stable-align run --nats URL` simulates a world, then
counts the world's records with an independent reader (a fresh nats-py client reading
`sandbox.records.<world>` from the SANDBOX_RECORDS stream). Every row must end with the world
COMPLETED and exactly size² × rounds records, none duplicated, in the stream and in records.jsonl.

What each row does, and what makes it pass:

- **kill -9 agent replica**: one of two agent replicas is killed mid-round and not restarted; requests
  it held are re-sent after `bus.LIVENESS_SECONDS` of silence and served by the other replica.
- **kill -9 observer, restart**: the only observer is killed and started again 5 s later; the world waits
  within its absent budget (`STABLEALIGN_ABSENT_BUDGET_SECONDS`).
- **kill -9 world service, restart**: the world service is killed and started again 3 s later under the
  same instance name: it takes the world back from its KV state; `run` follows it through the restart.
- **kill -9 nats-server, restart**: same port, same JetStream store, 2 s later; every client reconnects,
  failed requests and interactions are retried, duplicate publishes are dropped by message id.
- **LLM 30 % / 60 % errors**: from the trigger to the end, that share of LLM calls fail with 500/429; the
  backend retries, then the world retries the interaction within its error budget
  (`STABLEALIGN_ERROR_BUDGET_CONSECUTIVE`).
- **LLM hung 10 s**: no reply at all for 10 s; each call is cut at `STABLEALIGN_LLM_DEADLINE_SECONDS`
  and its interaction tried again.
- **kill -9 training job, resume**: `stable-align train` on the tiny model is killed after a checkpoint
  and the same command run again; it resumes from the checkpoint, logs each step once, and ends with the
  same weights as an uninterrupted run (max |Δ| < 1e-6).
- **kill -9 trainer service, restart, resubmit**: the same through the trainer service (`stable-align serve
  trainer`, `stable-align jobs submit --runner local`): the service is killed mid-job and started again
  2 s later; it marks the job FAILED ("trainer restarted") and stops the orphaned training process; the
  same job submitted again (same id and spec) runs in its own output directory and resumes from its last
  checkpoint.

Settings of the world rows (service environment): """


def write_docs(path: Path, rows: list[Row], args: argparse.Namespace, command: str) -> None:
    settings = ", ".join(f"`{k}={v}`" for k, v in SERVICE_ENV.items() if k.startswith("STABLEALIGN_")
                         and "PORT" not in k and "LOG" not in k)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    path.write_text(
        f"{DOC_INTRO}{settings}; world {args.size}×{args.size}×{args.rounds}, fault injected once the LLM has "
        f"served {args.trigger:.0%} of the world's calls, "
        f"LLM latency {args.latency_ms:g} ms.\n\n"
        "Columns: expected = size² × rounds; got = messages of the world in the stream; distinct = distinct "
        "(round, agent); duplicated = got - distinct; recovery s = from the fault's injection to the first record "
        "stored after it was cleared (for error rates, which last to the end: after the injection); max gap s = "
        "longest pause between two consecutive records; wall s = the whole row, processes included. For the "
        "training rows got/distinct count the steps in train_log.jsonl and recovery is from the kill to the "
        "first step the resumed run logs past the one the kill interrupted (restart, model load, checkpoint load "
        "and the redone steps).\n\n"
        f"Measured with `{command}` on {machine}, {datetime.date.today().isoformat()}:\n\n"
        f"{table(rows)}\n\n"
        "What the table shows beyond pass/fail: an agent replica killed mid-request costs one liveness period "
        "(max gap ≈ `bus.LIVENESS_SECONDS` = 10 s) and no extra LLM calls; while the observer is away the world "
        "retries the interactions waiting for it from their rating step (the draft and the feedback already "
        "received are kept, `interaction.InteractionProgress`), so that row costs the LLM calls of a quiet world "
        "(before this, redoing whole interactions cost about twice as many); 60 % LLM errors cost about 3× the "
        "calls and several times the wall time (the max gap: one "
        "unlucky interaction retried with backoff holds the end of its round) but no record; a hung LLM costs "
        "the hang plus up to one LLM deadline; a world-service restart costs little more than the outage; a "
        "NATS restart costs the outage plus, when a request was lost with the connection, one liveness period "
        "(10 s); recovery times vary between runs by that much.\n\n"
        "Re-run: `make chaos` (all rows, a few minutes on 2 cores), `python -m bench.chaos --only agent-kill,llm-60` "
        "(some rows), `--write-docs` to rewrite this file. `tests/integration/test_chaos_smoke.py` runs two rows "
        "on a 3×3×1 world in `make test`.\n")


async def run_rows(keys: list[str], args: argparse.Namespace) -> list[Row]:
    rows = []
    for key in keys:
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{key}-"))
        print(f"[chaos] {key} ...", file=sys.stderr, flush=True)
        try:
            if key in TRAINING_ROWS:
                row = await asyncio.wait_for(asyncio.to_thread(TRAINING_ROWS[key][1], workdir),
                                             timeout=args.row_timeout * 2)
            else:
                row = await asyncio.wait_for(
                    world_row(key, size=args.size, rounds=args.rounds, trigger=args.trigger,
                              timeout=args.row_timeout - 30, workdir=workdir, latency=args.latency_ms / 1000),
                    timeout=args.row_timeout)
        except Exception as exc:  # noqa: BLE001 - a row that breaks is a row that failed, the rest still run
            label = {**WORLD_ROWS, **TRAINING_ROWS}[key][0]
            row = Row(fault=label, expected=args.size ** 2 * args.rounds, note=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            _kill_all_live()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        print(f"[chaos] {key}: {'ok' if row.ok else 'FAILED'} {row.note}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


TRAINING_ROWS = {"train-kill": ("kill -9 training job, resume", training_row),
                 "trainer-kill": ("kill -9 trainer service, restart, resubmit", trainer_service_row)}
ALL = [*WORLD_ROWS, *TRAINING_ROWS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trigger", type=float, default=0.4,
                        help="Inject the fault once the LLM has served this share of the world's calls.")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="LLM devserver latency per request.")
    parser.add_argument("--only", default="", help=f"Comma-separated rows of: {','.join(ALL)}.")
    parser.add_argument("--row-timeout", type=float, default=240.0, help="Seconds one row may take.")
    parser.add_argument("--write-docs", action="store_true", help="Write the table to docs/reliability.md.")
    parser.add_argument("--keep", action="store_true", help="Keep each row's work directory (logs).")
    args = parser.parse_args(argv)
    # The devserver logs a traceback for each request whose client was killed mid-request: expected here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    keys = [k for k in args.only.split(",") if k] or ALL
    unknown = set(keys) - set(ALL)
    if unknown:
        parser.error(f"unknown rows: {sorted(unknown)}")
    try:
        rows = asyncio.run(run_rows(keys, args))
    finally:
        _kill_all_live()
    print(table(rows))
    if args.write_docs:
        command = "python -m bench.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(REPO / "docs" / "reliability.md", rows, args, command.strip())
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
