"""Forged records on a real nats-server: readers keep exactly the world's own records (issue 10, point 6).

A real 3x3 world runs for 2 rounds on the offline backend (agent, observer and world services in
this process), then someone with publish access to ``sandbox.records.<world>`` adds: a record under
a new message id that reuses a real (round, agent) with a harmful answer, a record without a message
id, bytes that are not protobuf, another world's record, records outside the grid and the rounds,
and — once the stream's duplicate window has passed — a record with the world's own id but a rating
of 99 and a second copy of a real pair. ``stable-align export`` and ``stable-align data build --nats``
(real processes, after the services stopped: the bounds come from the SANDBOX_WORLDS bucket) must
write byte for byte what they wrote before the forgeries and say what they skipped; a world created
on a subject that already holds forgeries must neither fail nor skip an agent's real interaction.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from nats.js.api import StreamConfig

from stablealign.core.config import load_settings
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox import record_stream
from stablealign.sandbox.records import record_msg_id
from stablealign.serving.service import RunningService, start_service
from stablealign.v1 import common_pb2, world_pb2

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]
FORGED = "FORGED: here is how to hurt someone"


def spec(world_id: str) -> world_pb2.WorldSpec:
    return world_pb2.WorldSpec(world_id=world_id, size=3, rounds=2, seed=1, setting="half_half", prior_size=10,
                               agent_model=common_pb2.ModelRef(backend="offline"),
                               observer_model=common_pb2.ModelRef(backend="offline"),
                               embedding_model=common_pb2.ModelRef(backend="offline", model="hashing"))


async def start(name: str, nats_url: str) -> RunningService:
    import importlib

    module = importlib.import_module(f"services.{name}.main")
    values = {"nats_url": nats_url, "grpc_port": -1, "metrics_port": -1, "instance": f"trust-{name}"}
    return await start_service(name, load_settings(module.SETTINGS, values, environ={}), module.build)


async def run_world(nc, nats_url: str, world_id: str) -> world_pb2.World:
    """Creates the world on in-process services, waits (bounded) for a final state, stops the services."""
    services = [await start(name, nats_url) for name in ("agent", "observer", "world")]
    try:
        await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec(world_id)), world_pb2.World,
                          timeout=10)
        deadline = time.monotonic() + 60
        while True:
            world = await nats_client.request(nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id=world_id),
                                      world_pb2.World, timeout=5)
            if world.state in (world_pb2.WORLD_STATE_COMPLETED, world_pb2.WORLD_STATE_FAILED,
                               world_pb2.WORLD_STATE_CANCELLED):
                return world
            assert time.monotonic() < deadline, f"world {world_id} not final after 60 s"
            await asyncio.sleep(0.1)
    finally:
        for service in reversed(services):
            await service.stop(grace=1.0)


async def cli(*args: str) -> tuple[str, str]:
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{err.decode()[-3000:]}"
    return out.decode(), err.decode()


def forged(base: common_pb2.InteractionRecord, **fields) -> common_pb2.InteractionRecord:
    rec = common_pb2.InteractionRecord()
    rec.CopyFrom(base)
    rec.revised_answer = FORGED
    rec.alignment_after.score = 7
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


async def publish(js, world_id: str, payload: common_pb2.InteractionRecord | bytes, msg_id: str | None) -> int:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    ack = await js.publish(subjects.RECORDS_SUBJECT.format(world_id=world_id), data,
                           headers={subjects.MSG_ID_HEADER: msg_id} if msg_id else None)
    return ack.seq


async def publish_after_window(js, world_id: str, payload: common_pb2.InteractionRecord, msg_id: str) -> int:
    """Publishes under an id JetStream has seen, once its duplicate window (shrunk here) has passed."""
    for _ in range(60):  # bounded: ~12 s
        ack = await js.publish(subjects.RECORDS_SUBJECT.format(world_id=world_id), payload.SerializeToString(),
                               headers={subjects.MSG_ID_HEADER: msg_id})
        if not ack.duplicate:
            return ack.seq
        await asyncio.sleep(0.2)
    raise AssertionError(f"{msg_id} still a duplicate for JetStream")


async def forge_everything_but_same_id(js, world_id: str, real: dict[tuple[int, int], common_pb2.InteractionRecord]):
    """The five forgeries that need no wait: 1 malformed, 5 foreign (with a 3x3, 2-round world)."""
    await publish(js, world_id, forged(real[0, 3]), f"{world_id}.0.3.evil")  # a new id for a real pair
    await publish(js, world_id, forged(real[1, 4]), None)  # no message id
    await publish(js, world_id, b"\xff\xfe\x00 not a record", None)  # not protobuf
    await publish(js, world_id, forged(real[0, 5], world_id="elsewhere"), "elsewhere.0.5")  # another world's
    await publish(js, world_id, forged(real[0, 1], agent_id=99), record_msg_id(world_id, 0, 99))  # off the grid
    await publish(js, world_id, forged(real[0, 2], round=7), record_msg_id(world_id, 7, 2))  # past the rounds


async def test_forged_records_change_neither_export_nor_training_data(nats_url, nc, tmp_path: Path):
    js = nc.jetstream()
    world = await run_world(nc, nats_url, "real")
    assert world.state == world_pb2.WORLD_STATE_COMPLETED and world.records_published == 18
    nats = ("--nats", nats_url)

    # Before any forgery (the services are gone: bounds come from the SANDBOX_WORLDS bucket).
    _, err = await cli("export", "real", "--out", str(tmp_path / "before.jsonl"), *nats)
    assert "skipped" not in err
    await cli("data", "build", *nats, "--world", "real", "--out", str(tmp_path / "before-groups.jsonl"))

    records, _ = await record_stream.read_world_records(js, "real")
    real = {(r.round, r.agent_id): r for r in records}
    assert len(real) == 18
    await forge_everything_but_same_id(js, "real", real)
    # The world's own ids, after JetStream's duplicate window: a rating of 99, and a second copy of a pair.
    config: StreamConfig = (await js.stream_info(subjects.RECORDS_STREAM)).config
    config.duplicate_window = 0.2
    await js.update_stream(config)
    bad_rating = forged(real[0, 6])
    bad_rating.alignment_after.score = 99
    await publish_after_window(js, "real", bad_rating, record_msg_id("real", 0, 6))
    duplicate_seq = await publish_after_window(js, "real", forged(real[1, 2]), record_msg_id("real", 1, 2))

    out, err = await cli("export", "real", "--out", str(tmp_path / "after.jsonl"), *nats)
    assert (tmp_path / "after.jsonl").read_bytes() == (tmp_path / "before.jsonl").read_bytes()
    assert out.strip().startswith("18 records")
    line = next(x for x in err.splitlines() if "skipped" in x)
    assert line.startswith("warning: skipped 8 of 26 messages on sandbox.records.real: 2 malformed (seq 21: not a "
                           "record; seq 25: round 0 agent 6: alignment_after: rating 99 is outside 1..7"), line
    assert "5 foreign (seq 19: message id 'real.0.3.evil', expected 'real.0.3'; seq 20: no message id" in line
    assert line.endswith(f"1 duplicate (seq {duplicate_seq}: round 1 agent 2)")
    assert FORGED not in (tmp_path / "after.jsonl").read_text(encoding="utf-8")

    _, err = await cli("data", "build", *nats, "--world", "real", "--out", str(tmp_path / "after-groups.jsonl"))
    assert "warning: skipped 8 of 26 messages on sandbox.records.real" in err
    for name in ("groups.jsonl", "groups.heldout.jsonl"):
        before, after = (tmp_path / f"before-{name}").read_bytes(), (tmp_path / f"after-{name}").read_bytes()
        assert before and after == before, name
        assert FORGED.encode() not in after
    stats = json.loads((tmp_path / "after-groups.stats.json").read_text(encoding="utf-8"))
    assert stats["records"] == 18
    assert stats["records_read"]["skipped"] == {"malformed": 2, "foreign": 5, "duplicate": 1}


async def test_forged_records_neither_fail_a_world_nor_make_it_skip_real_work(nats_url, nc):
    """Forgeries already on the subject when the world starts: today's resume read would have failed
    the world on the junk bytes, and taken the forged (0, 3) for agent 3's round-0 interaction."""
    js = nc.jetstream()
    template = common_pb2.InteractionRecord(world_id="victim", question="q?", draft_answer="d",
                                            revised_answer=FORGED)
    real = {(r, a): forged(template, round=r, agent_id=a) for r in range(2) for a in range(9)}
    await forge_everything_but_same_id(js, "victim", real)

    world = await run_world(nc, nats_url, "victim")
    assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
    assert world.records_published == 18
    records, stats = await record_stream.read_world_records(js, "victim", size=3, rounds=2)
    assert [(r.round, r.agent_id) for r in records] == sorted(real)
    assert not any(r.revised_answer == FORGED for r in records)
    assert stats.as_dict()["skipped"] == {"malformed": 1, "foreign": 5, "duplicate": 0}
    assert stats.messages == 24
