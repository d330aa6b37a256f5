"""Issue 19's routes on the NATS paths, tried as every role against a real nats-server with the generated
authorization block and the world service running in-process as its own restricted user.

What a user would notice: a request or a ``$SRV`` ping naming a bucket's or a stream's subject as its reply
changes nothing (the worlds and jobs buckets, the records and the job logs stay byte-identical, compared before
and after), no role that only reads may create a consumer at all (so none can have the server deliver a stream
into another), a flood of oversized or concurrent requests is answered with 413/503 instead of growing the
service, and the service keeps answering its real clients. The trainer's routes are in
``test_attacks_trainer.py``; the table of routes and outcomes is in ``docs/security-attacks.md``.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import logging

import nats.errors
import pytest

from stablealign.core.config import load_settings
from stablealign.core.errors import PayloadTooLargeError, UnavailableError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.nats.permissions import ROLES
from stablealign.serving.service import start_service
from stablealign.v1 import world_pb2
from tests.integration.test_nats_security import SecuredNats
from tests.support.attacks import (
    OTHER,
    OWNER,
    TARGETS,
    VICTIM,
    Owners,
    denials,
    refused_publish,
    replies_refused,
    send_misdirected,
)

pytestmark = pytest.mark.timeout(120)

ATTACKERS = ("cli", "agent", "observer", "trainer")
READERS = ("cli", "agent", "observer")
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture
async def target(tmp_path):
    """The secured server with every stream, the world service (one slot, one queued, small requests), a FAILED
    victim world, a COMPLETED other world, two records of the victim's and two jobs, written by their owners."""
    secured = SecuredNats(tmp_path)
    secured.server.start()
    owners = await Owners.connect(secured)
    await owners.declare()
    module = importlib.import_module("services.world.main")
    values = {**secured.settings("world"), "grpc_port": -1, "metrics_port": -1, "instance": "attacked-world",
              "max_concurrency": 1, "max_queued_requests": 1, "max_request_bytes": MAX_REQUEST_BYTES,
              "resume_interval_seconds": 3600}
    service = await start_service("world", load_settings(module.SETTINGS, values, environ={}), module.build)
    await owners.seed_worlds()
    await owners.seed_jobs()
    try:
        yield secured, service, owners
    finally:
        await owners.close()
        await service.stop(grace=1.0)
        secured.server.stop()



# Requests whose reply subject is a bucket's or a stream's: (subject, payload, reply).
_GET = world_pb2.GetWorldRequest
MISDIRECTED = (
    (subjects.WORLD_GET, _GET(world_id="unknown").SerializeToString(), f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), f"sandbox.records.{VICTIM}"),
    (subjects.WORLD_LIST, b"", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    (subjects.WORLD_GET, b"\xff\xff", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),  # malformed: no error reply there either
    # The asker's account imports the JetStream APIs (under their prefixes): an answer is not a request through
    # that import. Nothing answers the plain $JS.API there.
    (subjects.WORLD_LIST, b"", f"$JS.WORLD.API.STREAM.PURGE.{subjects.RECORDS_STREAM}"),
    (subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), f"$JS.WORLD.API.STREAM.DELETE.KV_{subjects.WORLDS_BUCKET}"),
    (subjects.WORLD_LIST, b"", f"$JS.TRAINER.API.STREAM.PURGE.{subjects.JOB_LOGS_STREAM}"),
    (subjects.WORLD_LIST, b"", f"$JS.API.STREAM.PURGE.{subjects.RECORDS_STREAM}"),
)
DISCOVERY = (
    ("$SRV.PING", f"sandbox.records.{VICTIM}"),
    ("$SRV.INFO", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
    ("$SRV.STATS.stablealign-world", f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}"),
)


async def test_misdirected_replies_change_no_world_and_no_record(target, caplog):
    secured, _service, owners = target
    caplog.set_level(logging.WARNING)
    before = await owners.state()
    counted = replies_refused("world", "request"), replies_refused("world", "discovery")
    for role in ATTACKERS:
        nc = await nats_client.connect(secured.url, f"attacker-{role}", options=secured.options(role), give_up_after=5.0)
        await send_misdirected(nc, MISDIRECTED, DISCOVERY)
    assert await owners.state() == before
    # Only the CLI may send these at all, from the readers' account: each reached the world service with the
    # server's own reply subject, and its answer went back to the forged subject in the CLI's account, where no
    # stream listens. So the service had nothing to drop (it drops misdirected replies from its own account).
    assert replies_refused("world", "request") == counted[0]
    assert replies_refused("world", "discovery") == counted[1]
    assert not [r for r in caplog.records if r.getMessage() in ("bus.reply_refused", "discovery.reply_refused")]
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


def consumer_creates(stream: str, deliver: str, prefix: str = "$JS.API") -> list[tuple[str, bytes]]:
    """Every way to ask for a push consumer on ``stream`` delivering to ``deliver``: the unnamed create, the
    named one, the named and filtered one (its subject shows the filter, never the deliver subject) and a
    durable one. ``prefix``: the JetStream API's, as the asker's account names it."""
    config = {"deliver_subject": deliver, "deliver_policy": "all", "ack_policy": "none"}
    named = {**config, "name": "spy"}
    filtered = {**named, "filter_subject": ">"}
    durable = {**config, "durable_name": "spy"}
    api = f"{prefix}.CONSUMER"
    return [(subject, json.dumps({"stream_name": stream, "config": body}).encode()) for subject, body in (
        (f"{api}.CREATE.{stream}", config), (f"{api}.CREATE.{stream}.spy", named),
        (f"{api}.CREATE.{stream}.spy.>", filtered), (f"{api}.DURABLE.CREATE.{stream}.spy", durable))]


async def test_no_reader_may_create_a_consumer_on_any_stream(target, caplog):
    """Each role that only reads asks for push consumers on every stream, delivering into the victim's records
    and world entry, in every form of the request, under its account's import prefix of the stream's JetStream
    and as a plain $JS.API: the server refuses every one (a permissions violation; no
    answer comes), no stream gains a consumer, and nothing changes. The owners may do so only on their own
    bucket (``test_an_owner_creates_consumers_only_on_its_own_bucket``)."""
    secured, _service, owners = target
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    before, consumers = await owners.state(), await owners.consumers()
    tried: list[str] = []
    for role in READERS:
        nc = await nats_client.connect(secured.url, f"attacker-{role}", options=secured.options(role), give_up_after=5.0)
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        try:
            for stream in OWNER:
                for deliver, prefix in itertools.product(TARGETS[:2], ("$JS.API", f"$JS.{OWNER[stream].upper()}.API")):
                    for subject, payload in consumer_creates(stream, deliver, prefix):
                        await nc.publish(subject, payload, reply=inbox)
                        tried.append(subject)
            await nc.flush()
            await asyncio.sleep(0.5)
            assert answers.pending_msgs == 0, role  # JetStream never saw one: nothing to answer
        finally:
            await nc.close()
    refusals = denials(caplog)
    missing = {s for s in tried if not any(refused_publish(s) in r for r in refusals)}
    assert not missing, sorted(missing)[:5]
    assert await owners.consumers() == consumers
    assert await owners.state() == before


async def test_an_owner_creates_consumers_only_on_its_own_bucket(target, caplog):
    """The world and the trainer keep ephemeral consumers on their own bucket (nats-py lists a bucket with one);
    on every other stream the server refuses them too. A push consumer that the trainer aims from its bucket at
    the victim world's entry is accepted but delivers nothing there: JetStream delivers to subscriptions, and a
    stream's capture of a subject is not one (one second of waiting finds the worlds bucket unchanged)."""
    secured, _service, owners = target
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    before = await owners.state()
    own = {"world": f"KV_{subjects.WORLDS_BUCKET}", "trainer": f"KV_{subjects.JOBS_BUCKET}"}
    for role, bucket in own.items():
        nc = await nats_client.connect(secured.url, f"owner-{role}-spy", options=secured.options(role), give_up_after=5.0)
        try:
            for stream in OWNER:
                if stream == bucket:
                    continue
                subject, payload = consumer_creates(stream, TARGETS[0])[1]
                with pytest.raises(nats.errors.TimeoutError):  # the server drops the denied publish
                    await nc.request(subject, payload, timeout=0.3)
                assert any(refused_publish(subject) in r for r in denials(caplog)), (role, subject)
        finally:
            await nc.close()
    trainer = await nats_client.connect(secured.url, "owner-trainer-spy", options=secured.options("trainer"),
                                        give_up_after=5.0)
    try:
        subject, payload = consumer_creates(own["trainer"], TARGETS[0])[1]
        created = json.loads((await trainer.request(subject, payload, timeout=2)).data)
        assert created["config"]["deliver_subject"] == TARGETS[0]
        await asyncio.sleep(1.0)
    finally:
        await trainer.close()
    assert await owners.state() == before


async def test_jetstream_api_answers_go_to_no_stream(target, caplog):
    """The same route as a misdirected service reply, through the JetStream API that every reader may call: as the
    CLI, a message get of the other world's entry with the victim's key as its reply and the records stream's info
    with the victim's records as its reply; as an agent, a direct get of the memory stream and a message get of the other
    world's entry, both with the victim's records as their reply. The readers are in an account of their own, which
    imports the world's JetStream API under ``$JS.WORLD.API``: the server answers each one into the asker's account,
    where no stream listens, so nothing changes."""
    secured, _service, owners = target
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    before = await owners.state()
    other_entry = json.dumps({"last_by_subj": f"$KV.{subjects.WORLDS_BUCKET}.{OTHER}"}).encode()
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    agent = await nats_client.connect(secured.url, "agent", options=secured.options("agent"), give_up_after=5.0)
    try:
        await cli.publish(f"$JS.WORLD.API.STREAM.MSG.GET.KV_{subjects.WORLDS_BUCKET}", other_entry, reply=TARGETS[0])
        await cli.publish(f"$JS.WORLD.API.STREAM.INFO.{subjects.RECORDS_STREAM}", b"", reply=TARGETS[1])
        # The memory stream is empty: the direct get's answer is a "not found" status, a message all the same.
        await agent.publish(f"$JS.WORLD.API.DIRECT.GET.{subjects.MEMORY_STREAM}", json.dumps({"seq": 1}).encode(),
                            reply=TARGETS[1])
        await agent.publish(f"$JS.WORLD.API.STREAM.MSG.GET.KV_{subjects.WORLDS_BUCKET}", other_entry, reply=TARGETS[1])
        for nc in (cli, agent):
            await nc.flush()
        await asyncio.sleep(0.5)
        # The same reads with real inboxes are answered: the route is closed, not the API.
        answer = await agent.request(f"$JS.WORLD.API.DIRECT.GET.{subjects.MEMORY_STREAM}", json.dumps({"seq": 1}).encode(),
                                     timeout=2)
        assert answer.headers and answer.headers.get("Status") == "404"
        got = json.loads((await agent.request(f"$JS.WORLD.API.STREAM.MSG.GET.KV_{subjects.WORLDS_BUCKET}", other_entry,
                                              timeout=2)).data)
        assert got.get("message", {}).get("subject") == f"$KV.{subjects.WORLDS_BUCKET}.{OTHER}", got
        info = json.loads((await cli.request(f"$JS.WORLD.API.STREAM.INFO.{subjects.RECORDS_STREAM}", b"", timeout=2)).data)
        assert info["config"]["name"] == subjects.RECORDS_STREAM
    finally:
        await cli.close()
        await agent.close()
    assert await owners.state() == before
    assert denials(caplog) == []  # the server took every request: nothing was refused, nothing was written


@pytest.mark.parametrize(("role", "stream", "victim"), [
    ("trainer", subjects.JOB_LOGS_STREAM, TARGETS[1]),  # into the victim world's records
    ("world", subjects.RECORDS_STREAM, TARGETS[2]),  # over the victim job's entry
])
async def test_a_service_cannot_aim_jetstream_answers_at_the_others_streams(target, role, stream, victim):
    """An info request on a stream the service owns, with the other service's stream or bucket as its reply: the
    JetStream of the service's own account answers it there, where the other's streams are not (issue 19, note 5)."""
    secured, _service, owners = target
    before = await owners.state()
    nc = await nats_client.connect(secured.url, role, options=secured.options(role), give_up_after=5.0)
    try:
        await nc.publish(f"$JS.API.STREAM.INFO.{stream}", b"", reply=victim)
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert await owners.state() == before


async def test_a_client_cannot_name_the_servers_reply_subjects(target, caplog):
    """The responders answer ``_R_.`` replies (the server's, for a request from another account): a client that
    names one itself is refused by the server, so that reply never reaches the world service."""
    secured, _service, owners = target
    caplog.set_level(logging.WARNING)
    before = await owners.state()
    counted = replies_refused("world", "request")
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    try:
        await cli.publish(subjects.WORLD_GET, _GET(world_id=OTHER).SerializeToString(), reply="_R_.forged.x1")
        await cli.flush()
        await asyncio.sleep(0.5)
    finally:
        await cli.close()
    assert any('permissions violation for publish with reply of "_r_.forged.x1"' in r for r in denials(caplog))
    assert replies_refused("world", "request") == counted
    assert not [r for r in caplog.records if r.getMessage() == "bus.reply_refused"]
    assert await owners.state() == before


async def test_a_flood_is_answered_without_growing_the_service(target):
    """Oversized requests get 413 and a burst past one slot and one queued gets 503, all at once, from the
    subscription callback; the service never holds more than two and keeps serving; nothing is written."""
    secured, service, owners = target
    requests = service.context.requests
    before = await owners.state()
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
    assert await owners.state() == before


def test_every_attacking_role_is_a_role():
    assert set(ATTACKERS) | {"world"} == set(ROLES)

