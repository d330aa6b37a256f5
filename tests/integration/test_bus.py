"""The NATS bus helpers against a real nats-server: typed error replies, retries, dedup."""

from __future__ import annotations

import asyncio

import pytest

from stablealign import bus
from stablealign.errors import NotFoundError, UnavailableError, ValidationError
from stablealign.v1 import common_pb2, world_pb2


async def test_request_reply_and_typed_errors(nc):
    server = bus.RequestServer(nc, service="t", queue="t", max_request_bytes=1000)

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        if req.world_id == "missing":
            raise NotFoundError("unknown world missing")
        if not req.world_id:
            raise ValidationError("world_id is required")
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.get", world_pb2.GetWorldRequest, get, "Get")
    reply = await bus.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="w1"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "w1"
    with pytest.raises(NotFoundError, match="unknown world"):
        await bus.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="missing"), world_pb2.World, timeout=2)
    with pytest.raises(ValidationError, match="required"):
        await bus.request(nc, "t.get", world_pb2.GetWorldRequest(), world_pb2.World, timeout=2)
    # A malformed payload and an oversized one get clear error replies; the server keeps serving.
    raw = await nc.request("t.get", b"\xff\xff\xff", timeout=2)
    assert raw.headers[bus.ERROR_CODE_HEADER] == "400"
    raw = await nc.request("t.get", b"x" * 5000, timeout=2)
    assert raw.headers[bus.ERROR_CODE_HEADER] == "413"
    reply = await bus.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="w2"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "w2"


async def test_no_responders_is_retried_then_unavailable(nc):
    with pytest.raises(UnavailableError, match="no reply after 2 attempts"):
        await bus.request(nc, "nobody.home", world_pb2.GetWorldRequest(), world_pb2.World,
                          timeout=0.5, attempts=2, backoff=0.01)


async def test_records_stream_drops_duplicates(nc):
    js = nc.jetstream()
    subject = bus.RECORDS_SUBJECT.format(world_id="w")
    payload = common_pb2.InteractionRecord(world_id="w", agent_id=1).SerializeToString()
    first = await js.publish(subject, payload, headers={bus.MSG_ID_HEADER: "w.0.1"})
    again = await js.publish(subject, payload, headers={bus.MSG_ID_HEADER: "w.0.1"})
    assert not first.duplicate and again.duplicate
    msgs = await bus.read_subject(js, bus.RECORDS_STREAM, subject)
    assert len(msgs) == 1
    assert await bus.read_subject(js, bus.RECORDS_STREAM, subject, after_seq=msgs[-1][0]) == []


async def test_drain_finishes_inflight(nc):
    server = bus.RequestServer(nc, service="t", queue="t")
    started = asyncio.Event()

    async def slow(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        started.set()
        await asyncio.sleep(0.3)
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.slow", world_pb2.GetWorldRequest, slow, "Slow")
    pending = asyncio.create_task(bus.request(nc, "t.slow", world_pb2.GetWorldRequest(world_id="x"),
                                              world_pb2.World, timeout=3, attempts=1))
    await asyncio.wait_for(started.wait(), 3)
    await server.drain(grace=3)
    assert (await pending).spec.world_id == "x"


async def test_resent_request_joins_the_work_in_flight(nc):
    """A requester that times out and sends the same request again while the replica is still on it
    gets the one reply of the one run — the slow work (an LLM call) is not started a second time."""
    server = bus.RequestServer(nc, service="t", queue="t")
    calls = 0
    release = asyncio.Event()

    async def slow(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        nonlocal calls
        calls += 1
        await asyncio.wait_for(release.wait(), timeout=10)
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.slow", world_pb2.GetWorldRequest, slow, "Slow")
    request = world_pb2.GetWorldRequest(world_id="w1")
    # First attempt times out after 0.3 s; the re-send arrives while the first run still works.
    pending = asyncio.create_task(bus.request(nc, "t.slow", request, world_pb2.World, timeout=0.3, attempts=5,
                                              backoff=0.01))
    await asyncio.sleep(0.8)
    release.set()
    reply = await asyncio.wait_for(pending, timeout=10)
    assert reply.spec.world_id == "w1"
    assert calls == 1
    # A different request is its own work.
    release.clear()
    release.set()
    await bus.request(nc, "t.slow", world_pb2.GetWorldRequest(world_id="w2"), world_pb2.World, timeout=2)
    assert calls == 2


async def test_joined_request_gets_the_same_error(nc):
    server = bus.RequestServer(nc, service="t", queue="t")
    calls = 0

    async def failing(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        raise NotFoundError(f"unknown world {req.world_id}")

    await server.add("t.fail", world_pb2.GetWorldRequest, failing, "Fail")
    request = world_pb2.GetWorldRequest(world_id="gone")
    results = await asyncio.gather(
        bus.request(nc, "t.fail", request, world_pb2.World, timeout=3),
        bus.request(nc, "t.fail", request, world_pb2.World, timeout=3),
        return_exceptions=True)
    assert all(isinstance(r, NotFoundError) for r in results)
    assert calls == 1
