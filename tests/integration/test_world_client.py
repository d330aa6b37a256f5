"""The world client (services/world/client.py) against a real nats-server and real world services.

Agent, observer and world services run in this process (``start_service``) on a fresh nats-server;
every call goes through the client as the CLI, the embedded stack and the benchmarks make it:
create, get, list, wait, cancel, resume, and the records — read, exported, as rows, followed live,
through the one trust rule (a forged message on the world's subject is skipped and counted), with
the bounds coming from the world service or, once none runs, from the SANDBOX_WORLDS bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from services.world.client import WorldClient, read_record_rows
from stablealign.core.errors import ConflictError, NotFoundError
from stablealign.nats import subjects
from stablealign.sandbox.record_stream import TrustedRecords
from stablealign.v1 import common_pb2, world_pb2
from tests.integration.test_world_service import small_spec, start

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def sandbox(nats_url, nc):
    """Agent, observer and world services; the world service is stopped last (tests may stop it first)."""
    running = [await start(name, nats_url) for name in ("agent", "observer", "world")]
    yield running
    for service in reversed(running):
        await service.stop(grace=1.0)


async def forge(nc, world_id: str) -> None:
    """A record of the world on its subject, but under a message id the world never uses."""
    record = common_pb2.InteractionRecord(world_id=world_id, round=0, agent_id=0)
    await nc.jetstream().publish(subjects.RECORDS_SUBJECT.format(world_id=world_id), record.SerializeToString(),
                                 headers={subjects.MSG_ID_HEADER: "forged-0"})


async def test_a_world_from_create_to_its_records(nats_url, nc, sandbox, tmp_path):
    client = WorldClient(nc)
    await forge(nc, "w-forged")  # published before the world's own records: first in the stream
    world = await client.create_world(small_spec("w-forged", size=3, rounds=2))
    assert world.spec.world_id == "w-forged" and world.state in (world_pb2.WORLD_STATE_PENDING,
                                                                 world_pb2.WORLD_STATE_RUNNING)
    generated = await client.create_world(small_spec("", size=2, rounds=1))
    assert generated.spec.world_id.startswith("w-") and len(generated.spec.world_id) == 14
    with pytest.raises(ConflictError):  # an id taken before the first try is a real conflict
        await client.create_world(small_spec("w-forged", size=2, rounds=1))

    seen: list[int] = []
    done = await client.wait_for_world("w-forged", timeout=60, on_progress=lambda w: seen.append(w.records_published))
    assert done.state == world_pb2.WORLD_STATE_COMPLETED, done.error
    assert done.records_published == 18 and seen[-1] == 18 and seen == sorted(seen)
    assert (await client.get_world("w-forged")).state == world_pb2.WORLD_STATE_COMPLETED
    await client.wait_for_world(generated.spec.world_id, timeout=60)
    listed = {w.spec.world_id: w.state for w in await client.list_worlds()}
    assert listed == {"w-forged": world_pb2.WORLD_STATE_COMPLETED,
                      generated.spec.world_id: world_pb2.WORLD_STATE_COMPLETED}
    with pytest.raises(NotFoundError):
        await client.get_world("nope")
    with pytest.raises(NotFoundError):  # a typed error ends the wait at once: it is not an outage
        await client.wait_for_world("nope", timeout=60)

    # The records: one per (round, agent), in that order, the forged message skipped everywhere.
    records = await client.read_records("w-forged")
    keys = [(r.round, r.agent_id) for r in records]
    assert keys == [(rnd, agent) for rnd in range(2) for agent in range(9)]
    exported = await client.export_records("w-forged", tmp_path / "records.jsonl")
    assert exported.records == 18 and exported.stats.skipped["foreign"] == 1
    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    rows, stats = await read_record_rows(nats_url, "w-forged")
    assert rows == lines and stats.kept == 18 and stats.skipped["foreign"] == 1
    trusted = TrustedRecords("w-forged")
    followed = []
    async with contextlib.aclosing(client.follow_records(trusted, replay=True)) as live:
        async for record in live:
            followed.append((record.round, record.agent_id))
            if len(followed) == 18:
                break
    assert sorted(followed) == keys and trusted.stats.skipped["foreign"] == 1

    # Bounds: from the world service, then from the bucket once no world service answers.
    assert await client.world_bounds("w-forged") == (3, 2)
    assert await client.world_bounds("nope") is None
    await sandbox.pop().stop(grace=1.0)  # the world service
    assert await client.world_bounds("w-forged", timeout=1.0) == (3, 2)
    assert await client.world_bounds("nope", timeout=1.0) is None


async def test_cancel_then_resume_ends_with_every_record_once(nc, sandbox):
    client = WorldClient(nc)
    await client.create_world(small_spec("to-resume", size=4, rounds=10, concurrency=1))
    deadline = time.monotonic() + 30
    while (await client.get_world("to-resume")).records_published < 1:  # running, past its warm-up
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    cancelled = await client.cancel_world("to-resume")
    assert cancelled.state == world_pb2.WORLD_STATE_CANCELLED
    stopped = await client.wait_for_world("to-resume", timeout=30)
    assert stopped.state == world_pb2.WORLD_STATE_CANCELLED and stopped.records_published < 160
    assert (await client.cancel_world("to-resume")).state == world_pb2.WORLD_STATE_CANCELLED  # as it is

    resumed = await client.resume_world("to-resume")
    assert resumed.state in (world_pb2.WORLD_STATE_RUNNING, world_pb2.WORLD_STATE_COMPLETED)
    done = await client.wait_for_world("to-resume", timeout=120)
    assert done.state == world_pb2.WORLD_STATE_COMPLETED, done.error
    records = await client.read_records("to-resume", size=4, rounds=10)
    assert len({(r.round, r.agent_id) for r in records}) == len(records) == 160
    with pytest.raises(ConflictError):
        await client.resume_world("to-resume")
    with pytest.raises(NotFoundError):
        await client.resume_world("nope")
