"""The `stable-align` contracts of DESIGN §3, run as a user would: real processes, real nats-server.

- `run --size 3 --rounds 2 --backend offline --seed 1 --out DIR` writes exactly 18 records with the
  original's field names; the same seed gives the same records.
- `run --nats URL` on separately started `serve` processes gives the same records, and the
  SANDBOX_RECORDS stream then holds exactly size² × rounds messages.
- Two agent replicas share the load; SIGKILL of one mid-round loses and duplicates nothing.
- `serve` drains on SIGTERM and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.records import ORIGINAL_KEYS, read_jsonl, stable_view

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1",
           "STABLEALIGN_METRICS_PORT": "-1", **extra}
    return env


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *args], env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def _records(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in stable_view(r).items() if k != "world_id"} for r in rows]


def _start_services(url: str, names: list[str], **extra_env: str) -> list[subprocess.Popen]:
    env = _env(STABLEALIGN_NATS_URL=url, **extra_env)
    procs = []
    for i, name in enumerate(names):
        procs.append(subprocess.Popen([*CLI, "serve", name, "--instance", f"{name}-{i}"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    codes = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=60))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
    return codes


async def _wait_subscribers(url: str, subjects: list[str], timeout: float = 60.0) -> None:
    """Waits (bounded) until every subject has a responder, i.e. the services are up."""
    nc = await nats_client.connect(url, name="probe")
    try:
        deadline = time.monotonic() + timeout
        for subject in subjects:
            while True:
                try:
                    await nc.request(subject, b"\xff", timeout=1.0)  # malformed on purpose: an error reply is fine
                    break
                except Exception:  # noqa: BLE001 - no responders yet
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no responder on {subject}") from None
                    await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _stream_count(url: str, world_id: str) -> int:
    nc = await nats_client.connect(url, name="probe")
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.RECORDS_STREAM, subjects_filter=subjects.RECORDS_SUBJECT.format(world_id=world_id))
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("embedded")
    result = _run(["run", "--size", "3", "--rounds", "2", "--backend", "offline", "--seed", "1", "--out", str(out)])
    assert "offline" in result.stderr  # the offline backend says so
    return _records(out / "records.jsonl")


def test_run_writes_18_records_with_original_fields(embedded_run):
    rows = embedded_run
    assert len(rows) == 18
    assert {(r["iteration"], r["agent_id"]) for r in rows} == {(r, a) for r in range(2) for a in range(9)}
    radius = 3 // 2
    for row in rows:
        assert set(ORIGINAL_KEYS) <= set(row)
        a = row["agent_id"]
        assert row["target_id"] and a not in row["target_id"]
        for t in row["target_id"]:
            assert math.dist(divmod(a, 3), divmod(t, 3)) <= radius
        scores = row["rating"] + [row[k] for k in ("gen_moral_score_before", "gen_moral_score_after",
                                                    "gen_engagement_score_before", "gen_engagement_score_after")]
        assert all(s is None or 1 <= s <= 7 for s in scores)


def test_same_seed_same_records(embedded_run, tmp_path):
    _run(["run", "--size", "3", "--rounds", "2", "--backend", "offline", "--seed", "1", "--out", str(tmp_path)])
    assert _comparable(_records(tmp_path / "records.jsonl")) == _comparable(embedded_run)


def test_run_on_separate_services_matches_embedded(embedded_run, nats_server, tmp_path):
    procs = _start_services(nats_server.url, ["agent", "agent", "observer", "world"])
    try:
        asyncio.run(_wait_subscribers(nats_server.url, [subjects.AGENT_DRAFT, subjects.OBSERVER_RATE, subjects.WORLD_GET]))
        _run(["run", "--size", "3", "--rounds", "2", "--backend", "offline", "--seed", "1", "--out", str(tmp_path),
              "--nats", nats_server.url, "--world-id", "separate"])
        rows = _records(tmp_path / "records.jsonl")
        assert _comparable(rows) == _comparable(embedded_run)
        assert asyncio.run(_stream_count(nats_server.url, "separate")) == 18
        # The inspection commands against the same running services.
        nats = ["--nats", nats_server.url]
        assert "separate" in _run(["worlds", "list", *nats]).stdout
        shown = json.loads(_run(["worlds", "show", "separate", "--json", *nats]).stdout)
        assert shown["state"] == "WORLD_STATE_COMPLETED" and len(shown["rounds"]) == 2
        _run(["export", "separate", "--out", str(tmp_path / "exported.jsonl"), *nats])
        assert _records(tmp_path / "exported.jsonl") == rows
        watched = _run(["watch", "separate", "--replay", "--limit", "18", *nats], timeout=60)
        assert watched.stdout.count("\n") >= 18
        missing = subprocess.run([*CLI, "worlds", "show", "nope", *nats], env=_env(), capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode == 1 and "unknown world" in missing.stderr.lower()
    finally:
        codes = _stop(procs)
    assert codes == [0, 0, 0, 0], "serve must drain on SIGTERM and exit 0"


def test_killing_an_agent_replica_mid_round_loses_nothing(nats_server, tmp_path):
    from tests.support.devservers import FakeOpenAIServer

    async def scenario() -> None:
        async with FakeOpenAIServer(latency_seconds=0.15) as fake:
            base = fake.base_url
            env = dict(OPENAI_BASE_URL=base, OPENAI_API_KEY="test", STABLEALIGN_REQUEST_TIMEOUT_SECONDS="3")
            procs = _start_services(nats_server.url, ["agent", "agent", "observer", "world"], **env)
            try:
                await _wait_subscribers(nats_server.url, [subjects.AGENT_DRAFT, subjects.OBSERVER_RATE, subjects.WORLD_GET])
                run = await asyncio.create_subprocess_exec(
                    *CLI, "run", "--size", "4", "--rounds", "2", "--backend", "openai", "--model", "fake-gpt",
                    "--embedding-model", "hashing", "--embedding-backend", "offline", "--prior-size", "5",
                    "--seed", "3", "--out", str(tmp_path), "--nats", nats_server.url, "--world-id", "killed",
                    env=_env(**env), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                # Kill one replica once the first round is under way.
                deadline = time.monotonic() + 60
                while fake.requests_total < 20 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                procs[0].kill()
                _, err = await asyncio.wait_for(run.communicate(), timeout=180)
                assert run.returncode == 0, err.decode()[-4000:]
                assert await _stream_count(nats_server.url, "killed") == 32
            finally:
                _stop(procs)

    asyncio.run(scenario())
    rows = _records(tmp_path / "records.jsonl")
    assert len(rows) == 32
    assert len({(r["iteration"], r["agent_id"]) for r in rows}) == 32
