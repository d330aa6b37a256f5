"""Issue 19's routes, tried as every role against a real nats-server with the generated authorization block
and the world service running in-process as its own restricted user.

What a user would notice: a request or a ``$SRV`` ping naming a bucket's or a stream's subject as its reply
changes nothing (the world entry and the records stay byte-identical, counted before and after), a push
consumer aimed at the bucket delivers nothing into it, a durable consumer is refused, a flood of oversized or
concurrent requests is answered with 413/503 instead of growing the service, and the service keeps answering
its real clients. The table of routes and outcomes is in ``docs/security-attacks.md``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging

import nats.errors
import nats.js.errors
import pytest
from prometheus_client import REGISTRY

from stablealign.core.config import load_settings
from stablealign.core.errors import PayloadTooLargeError, UnavailableError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.nats.permissions import ROLES
from stablealign.serving.service import start_service
from stablealign.v1 import common_pb2, world_pb2
from tests.integration.test_nats_security import SecuredNats

pytestmark = pytest.mark.timeout(120)

OFFLINE = common_pb2.ModelRef(backend="offline")
VICTIM, OTHER = "victim", "other"
ATTACKERS = ("cli", "agent", "observer", "trainer")
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture
async def target(tmp_path):
    """The secured server, the world service (one slot, one queued, small requests), a FAILED victim world,
    a COMPLETED other world and two records of the victim's, written as the world user."""
    secured = SecuredNats(tmp_path)
    secured.server.start()
    module = importlib.import_module("services.world.main")
    values = {**secured.settings("world"), "grpc_port": -1, "metrics_port": -1, "instance": "attacked-world",
              "max_concurrency": 1, "max_queued_requests": 1, "max_request_bytes": MAX_REQUEST_BYTES,
              "resume_interval_seconds": 3600}
    service = await start_service("world", load_settings(module.SETTINGS, values, environ={}), module.build)
    owner = await nats_client.connect(secured.url, "owner", options=secured.options("world"), give_up_after=5.0)
    js = owner.jetstream()
    kv = await js.key_value(subjects.WORLDS_BUCKET)
    for world_id, state in ((VICTIM, world_pb2.WORLD_STATE_FAILED), (OTHER, world_pb2.WORLD_STATE_COMPLETED)):
        world = world_pb2.World(spec=world_pb2.WorldSpec(world_id=world_id, size=2, rounds=1, agent_model=OFFLINE),
                                state=state, error="boom" if state == world_pb2.WORLD_STATE_FAILED else "",
                                created_at=1.0, updated_at=1.0)
        await kv.create(world_id, world.SerializeToString())
    for agent in (0, 1):
        record = common_pb2.InteractionRecord(world_id=VICTIM, round=0, agent_id=agent, question="q", draft_answer="a")
        await js.publish(f"sandbox.records.{VICTIM}", record.SerializeToString(),
                         headers={subjects.MSG_ID_HEADER: f"{VICTIM}.0.{agent}"})
    try:
        yield secured, service, js
    finally:
        await owner.close()
        await service.stop(grace=1.0)
        secured.server.stop()


async def snapshot(js, stream: str) -> tuple[int, int, list[tuple[int, str, bytes]]]:
    """(messages, last sequence, every message's sequence, subject and bytes) of ``stream``."""
    info = await js.stream_info(stream)
    messages = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        messages.append((seq, msg.subject, msg.data))
    return info.state.messages, info.state.last_seq, messages


async def state(js) -> dict:
    return {stream: await snapshot(js, stream) for stream in (f"KV_{subjects.WORLDS_BUCKET}", subjects.RECORDS_STREAM)}


def refused(kind: str) -> float:
    return REGISTRY.get_sample_value("stablealign_replies_refused_total", {"service": "world", "kind": kind}) or 0.0


# Requests whose reply subject is a bucket's or a stream's: (subject, payload, reply).
_GET = world_pb2.GetWorldRequest
MISDIRECTED = (
    (subjects.WORLD_GET, _GET(world_id="unknown").SerializeToString(), f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), f"sandbox.records.{VICTIM}"),
    (subjects.WORLD_LIST, b"", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, b"\xff\xff", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),  # malformed: no error reply there either
)
DISCOVERY = (
    ("$SRV.PING", f"sandbox.records.{VICTIM}"),
    ("$SRV.INFO", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    ("$SRV.STATS.stablealign-world", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
)


async def test_misdirected_replies_change_no_world_and_no_record(target, caplog):
    secured, _service, js = target
    caplog.set_level(logging.WARNING)
    before = await state(js)
    counted = refused("request"), refused("discovery")
    for role in ATTACKERS:
        nc = await nats_client.connect(secured.url, f"attacker-{role}", options=secured.options(role), give_up_after=5.0)
        try:
            for subject, payload, reply in MISDIRECTED:
                await nc.publish(subject, payload, reply=reply, headers={subjects.LIVENESS_HEADER: "0.2"})
            for subject, reply in DISCOVERY:
                await nc.publish(subject, b"", reply=reply)
            await nc.flush()
        finally:
            await asyncio.sleep(0.6)  # past a few heartbeat periods of the 0.2 s liveness asked for
            await nc.close()
    assert await state(js) == before
    # Only the CLI may send these at all; the world service dropped each one of its, counted and said.
    assert refused("request") - counted[0] == len(MISDIRECTED)
    assert refused("discovery") - counted[1] == len(DISCOVERY)
    said = [r for r in caplog.records if r.getMessage() in ("bus.reply_refused", "discovery.reply_refused")]
    assert len(said) == len(MISDIRECTED) + len(DISCOVERY)
    assert all(r.reply.startswith(("$KV.", "sandbox.records.")) for r in said)
    # The other roles' sends were refused by the server itself.
    denied = " ".join(r.__dict__.get("error", "") for r in caplog.records if r.getMessage() == "nats.permission_denied")
    for subject in (subjects.WORLD_GET, "$SRV.PING"):
        assert f'permissions violation for publish to "{subject}"'.lower() in denied.lower(), denied
    # The victim still reads FAILED with its error, and the CLI's real requests are answered.
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    try:
        world = await nats_client.request(cli, subjects.WORLD_GET, _GET(world_id=VICTIM), world_pb2.World, timeout=5)
        assert world.state == world_pb2.WORLD_STATE_FAILED and world.error == "boom"
        listed = await nats_client.request(cli, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                                   timeout=5)
        assert sorted(w.spec.world_id for w in listed.worlds) == [OTHER, VICTIM]
        ping = await cli.request("$SRV.PING.stablealign-world", b"", timeout=2)
        assert json.loads(ping.data)["name"] == "stablealign-world"
    finally:
        await cli.close()


async def test_consumers_cannot_write_through_a_deliver_subject(target):
    """A reader may create ephemeral consumers; one aimed at the bucket delivers nothing into it (JetStream
    delivers to subscribers' interest, and a stream is none), one aimed at its own stream is refused (a
    cycle), and durable consumers are denied to every role but none needs them."""
    secured, _service, js = target
    before = await state(js)
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    try:
        aimed = {"deliver_subject": f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}", "deliver_policy": "all",
                 "ack_policy": "none"}
        created = await cli.request(f"$JS.API.CONSUMER.CREATE.{subjects.RECORDS_STREAM}",
                                    json.dumps({"stream_name": subjects.RECORDS_STREAM, "config": aimed}).encode(),
                                    timeout=2)
        assert "error" not in json.loads(created.data)  # accepted: the subject cannot tell a push consumer
        to_records = {"deliver_subject": f"sandbox.records.{VICTIM}", "deliver_policy": "all", "ack_policy": "none"}
        for role in ("cli", "agent", "observer"):  # the readers of world specs
            nc = cli if role == "cli" else await nats_client.connect(secured.url, role, options=secured.options(role),
                                                             give_up_after=5.0)
            created = await nc.request(f"$JS.API.CONSUMER.CREATE.KV_{subjects.WORLDS_BUCKET}",
                                       json.dumps({"stream_name": f"KV_{subjects.WORLDS_BUCKET}",
                                                   "config": to_records}).encode(), timeout=2)
            assert "error" not in json.loads(created.data), role
            if nc is not cli:
                await nc.close()
        cycle = {**to_records, "name": "spy", "filter_subject": f"sandbox.records.{VICTIM}"}
        refused_cycle = await cli.request(
            f"$JS.API.CONSUMER.CREATE.{subjects.RECORDS_STREAM}.spy.sandbox.records.{VICTIM}",
            json.dumps({"stream_name": subjects.RECORDS_STREAM, "config": cycle}).encode(), timeout=2)
        assert "forms a cycle" in json.loads(refused_cycle.data)["error"]["description"]
        # The filtered-create form (what a pull reader with a name uses) takes a deliver subject too: allowing
        # only that form would not keep push consumers from a reader, so the permissions do not pretend to.
        filtered = {"name": "spy2", "filter_subject": f"sandbox.records.{VICTIM}", "deliver_policy": "all",
                    "ack_policy": "none", "deliver_subject": "_INBOX_world.spy"}
        created = await cli.request(
            f"$JS.API.CONSUMER.CREATE.{subjects.RECORDS_STREAM}.spy2.sandbox.records.{VICTIM}",
            json.dumps({"stream_name": subjects.RECORDS_STREAM, "config": filtered}).encode(), timeout=2)
        assert json.loads(created.data)["config"]["deliver_subject"] == "_INBOX_world.spy"
        for role in ATTACKERS:
            nc = cli if role == "cli" else await nats_client.connect(secured.url, role, options=secured.options(role),
                                                             give_up_after=5.0)
            durable = {"durable_name": "spy", **aimed}
            with pytest.raises(nats.errors.TimeoutError):  # the server drops the denied publish
                await nc.request(f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.RECORDS_STREAM}.spy",
                                 json.dumps({"stream_name": subjects.RECORDS_STREAM, "config": durable}).encode(),
                                 timeout=0.5)
            if nc is not cli:
                await nc.close()
        await asyncio.sleep(1.0)
        assert await state(js) == before
    finally:
        await cli.close()


async def test_a_flood_is_answered_without_growing_the_service(target):
    """Oversized requests get 413 and a burst past one slot and one queued gets 503, all at once, from the
    subscription callback; the service never holds more than two and keeps serving; nothing is written."""
    secured, service, js = target
    requests = service.context.requests
    before = await state(js)
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    try:
        big = world_pb2.CreateWorldRequest(spec=world_pb2.WorldSpec(world_id="big", size=2, rounds=1,
                                                                    setting="x" * (2 * MAX_REQUEST_BYTES)))
        oversized = await asyncio.gather(*(
            nats_client.request(cli, subjects.WORLD_CREATE, big, world_pb2.World, timeout=5, attempts=1) for _ in range(20)
        ), return_exceptions=True)
        assert all(isinstance(r, PayloadTooLargeError) for r in oversized), oversized
        peak = [0]

        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], requests.inflight)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        burst = await asyncio.gather(*(
            nats_client.request(cli, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse, timeout=5,
                        attempts=1) for _ in range(200)
        ), return_exceptions=True)
        watcher.cancel()
        answered = [r for r in burst if isinstance(r, world_pb2.ListWorldsResponse)]
        busy = [r for r in burst if isinstance(r, UnavailableError) and "busy" in str(r)]
        assert len(answered) + len(busy) == len(burst) and answered, burst[:3]
        assert peak[0] <= 2
        world = await nats_client.request(cli, subjects.WORLD_GET, _GET(world_id=VICTIM), world_pb2.World, timeout=5)
        assert world.state == world_pb2.WORLD_STATE_FAILED
    finally:
        await cli.close()
    assert await state(js) == before


def test_every_attacking_role_is_a_role():
    assert set(ATTACKERS) | {"world"} == set(ROLES)

