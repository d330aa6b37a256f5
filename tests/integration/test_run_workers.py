"""`stable-align run` with worker processes (stablealign_app/worker.py): more agent and observer replicas
beside the command's own, on its embedded NATS server.

- Workers take a share of the requests and change no record: the same seed gives the same records with
  two workers as with none.
- A worker killed (SIGKILL) mid-run costs nothing: its requests are re-sent to the other replicas within
  the liveness period, and the world completes with exactly size² × rounds records, none twice.
- A worker does not outlive its run: `kill -9` of the command ends its workers (their stdin closes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stablealign.core.metrics import free_port
from stablealign.sandbox.records import read_jsonl, stable_view

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING", **extra}


def _comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in stable_view(r).items() if k != "world_id"} for r in read_jsonl(path)]


def _workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "stablealign_app.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@pytest.fixture
def slow_llm():
    """The OpenAI-protocol dev server answering after 150 ms, in its own process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.devservers", "openai", "--port", str(port),
                             "--latency-ms", "150"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                return True
            except OSError:
                return False

        _wait_for(up, 30, "the dev LLM server")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_workers_serve_a_share_and_change_no_record(tmp_path):
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        # Long enough (~2-3 s of rounds here) for the workers' start-up (~1-2 s of imports) to end within it.
        result = subprocess.run([*CLI, "run", "--size", "10", "--rounds", "6", "--seed", "3", "--out", str(out)],
                                env=_env(STABLEALIGN_RUN_WORKERS=str(workers)), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stderr.count("backend.offline") == 1  # said once per run, not once per process
        outs[workers] = out
    summary = json.loads((outs[2] / "world.json").read_text())
    assert summary["workers"]["processes"] == 2
    # 600 interactions x 5 requests: the workers answered some of them (queue groups spread the load).
    assert summary["workers"]["requests_served"] > 0
    assert json.loads((outs[0] / "world.json").read_text())["workers"] == {"processes": 0, "requests_served": 0.0}
    assert _comparable(outs[2] / "records.jsonl") == _comparable(outs[0] / "records.jsonl")


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, slow_llm):
    out = tmp_path / "out"
    env = _env(STABLEALIGN_RUN_WORKERS="1", STABLEALIGN_REQUEST_LIVENESS_SECONDS="1", OPENAI_BASE_URL=slow_llm,
               OPENAI_API_KEY="test")
    proc = subprocess.Popen([*CLI, "run", "--size", "4", "--rounds", "3", "--backend", "openai", "--seed", "2",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = _wait_for(lambda: _workers_of(proc), 60, "the worker process")[0]
        # Serving by now (its start takes ~1-2 s); the world's rounds take ~0.8 s each at 150 ms per call.
        time.sleep(3.0)
        assert proc.poll() is None, "the world ended before the worker could be killed: make it longer"
        worker.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "embedded.worker_exited" in stderr  # said, with what it means
    rows = list(read_jsonl(out / "records.jsonl"))
    keys = [(r["iteration"], r["agent_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 4 * 3


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_does_not_outlive_its_run(tmp_path):
    """Nor does the run's nats-server on Linux (its parent-death signal: EmbeddedNatsServer(die_with_parent))."""
    proc = subprocess.Popen([*CLI, "run", "--size", "15", "--rounds", "20", "--seed", "4", "--out", str(tmp_path)],
                            env=_env(STABLEALIGN_RUN_WORKERS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    others: list[psutil.Process] = []
    try:
        worker = _wait_for(lambda: _workers_of(proc), 60, "the worker process")[0]
        others = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid != worker.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for(lambda: _gone(worker), 20, "the worker to exit after its run was killed")
        servers = [p for p in others if "nats-server" in p.name()]
        assert servers, others
        if sys.platform.startswith("linux"):
            _wait_for(lambda: all(_gone(p) for p in servers), 20, "the run's nats-server to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in others:  # the run's nats-server: a SIGKILLed command cannot stop it
            try:
                leftover.kill()
            except psutil.Error:
                pass


def test_workers_may_use_the_llm_url_the_user_named(tmp_path, slow_llm):
    """`--url` is trusted by the command's own services (endpoints.trust); its workers get the same trust,
    else their share of the calls would be refused and the world would fail."""
    out = tmp_path / "out"
    env = _env()
    env.pop("OPENAI_BASE_URL", None)
    env.pop("STABLEALIGN_LLM_ENDPOINTS", None)
    result = subprocess.run([*CLI, "run", "--size", "4", "--rounds", "2", "--backend", "openai", "--url", slow_llm,
                             "--workers", "1", "--seed", "5", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "world.json").read_text())
    assert summary["workers"]["processes"] == 1 and summary["workers"]["requests_served"] > 0
    assert summary["faults"]["interaction_retries"] == 0
    assert len(list(read_jsonl(out / "records.jsonl"))) == 32
