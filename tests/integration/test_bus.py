"""The NATS bus helpers against a real nats-server: typed error replies, retries, dedup."""

from __future__ import annotations

import asyncio

import pytest

from stablealign.core.errors import NotFoundError, UnavailableError, ValidationError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.nats.server import RequestServer
from stablealign.v1 import common_pb2, world_pb2
from tests.support.handlers import SlowWorldGetter


async def test_request_reply_and_typed_errors(nc):
    server = RequestServer(nc, service="t", queue="t", max_request_bytes=1000)

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        if req.world_id == "missing":
            raise NotFoundError("unknown world missing")
        if not req.world_id:
            raise ValidationError("world_id is required")
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.get", world_pb2.GetWorldRequest, get, "Get")
    reply = await nats_client.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="w1"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "w1"
    with pytest.raises(NotFoundError, match="unknown world"):
        await nats_client.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="missing"), world_pb2.World, timeout=2)
    with pytest.raises(ValidationError, match="required"):
        await nats_client.request(nc, "t.get", world_pb2.GetWorldRequest(), world_pb2.World, timeout=2)
    # A malformed payload and an oversized one get clear error replies; the server keeps serving.
    raw = await nc.request("t.get", b"\xff\xff\xff", timeout=2)
    assert raw.headers[subjects.ERROR_CODE_HEADER] == "400"
    raw = await nc.request("t.get", b"x" * 5000, timeout=2)
    assert raw.headers[subjects.ERROR_CODE_HEADER] == "413"
    reply = await nats_client.request(nc, "t.get", world_pb2.GetWorldRequest(world_id="w2"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "w2"


async def test_no_responders_is_retried_then_unavailable(nc):
    with pytest.raises(UnavailableError, match="no reply after 2 attempts"):
        await nats_client.request(nc, "nobody.home", world_pb2.GetWorldRequest(), world_pb2.World,
                          timeout=0.5, attempts=2, backoff=0.01)


async def test_records_stream_drops_duplicates(nc):
    js = nc.jetstream()
    subject = subjects.RECORDS_SUBJECT.format(world_id="w")
    payload = common_pb2.InteractionRecord(world_id="w", agent_id=1).SerializeToString()
    first = await js.publish(subject, payload, headers={subjects.MSG_ID_HEADER: "w.0.1"})
    again = await js.publish(subject, payload, headers={subjects.MSG_ID_HEADER: "w.0.1"})
    assert not first.duplicate and again.duplicate
    msgs = await nats_client.read_subject(js, subjects.RECORDS_STREAM, subject)
    assert len(msgs) == 1
    assert await nats_client.read_subject(js, subjects.RECORDS_STREAM, subject, after_seq=msgs[-1][0]) == []


async def test_drain_finishes_inflight(nc):
    server = RequestServer(nc, service="t", queue="t")
    started = asyncio.Event()

    async def slow(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        started.set()
        await asyncio.sleep(0.3)
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.slow", world_pb2.GetWorldRequest, slow, "Slow")
    pending = asyncio.create_task(nats_client.request(nc, "t.slow", world_pb2.GetWorldRequest(world_id="x"),
                                              world_pb2.World, timeout=3, attempts=1))
    await asyncio.wait_for(started.wait(), 3)
    await server.drain(grace=3)
    assert (await pending).spec.world_id == "x"


async def test_resent_request_joins_the_work_in_flight(nc):
    """A requester that times out and sends the same request again while the replica is still on it
    gets the one reply of the one run — the slow work (an LLM call) is not started a second time."""
    server = RequestServer(nc, service="t", queue="t")
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
    pending = asyncio.create_task(nats_client.request(nc, "t.slow", request, world_pb2.World, timeout=0.3, attempts=5,
                                              backoff=0.01))
    await asyncio.sleep(0.8)
    release.set()
    reply = await asyncio.wait_for(pending, timeout=10)
    assert reply.spec.world_id == "w1"
    assert calls == 1
    # A different request is its own work.
    release.clear()
    release.set()
    await nats_client.request(nc, "t.slow", world_pb2.GetWorldRequest(world_id="w2"), world_pb2.World, timeout=2)
    assert calls == 2


async def test_joined_request_gets_the_same_error(nc):
    server = RequestServer(nc, service="t", queue="t")
    calls = 0

    async def failing(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        raise NotFoundError(f"unknown world {req.world_id}")

    await server.add("t.fail", world_pb2.GetWorldRequest, failing, "Fail")
    request = world_pb2.GetWorldRequest(world_id="gone")
    results = await asyncio.gather(
        nats_client.request(nc, "t.fail", request, world_pb2.World, timeout=3),
        nats_client.request(nc, "t.fail", request, world_pb2.World, timeout=3),
        return_exceptions=True)
    assert all(isinstance(r, NotFoundError) for r in results)
    assert calls == 1


async def test_a_batch_is_answered_item_by_item(nc):
    """One message carries several requests; each item gets its own reply or its own typed error, the
    others are unaffected, and the items are counted under the method (the envelope is not)."""
    from stablealign.core import metrics

    server = RequestServer(nc, service="tb", queue="tb")
    running = 0
    most = 0

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        if req.world_id == "missing":
            raise NotFoundError("unknown world missing")
        if req.world_id == "boom":
            raise RuntimeError("a bug")
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("tb.get", world_pb2.GetWorldRequest, get, "Get", batch=True)
    asks = [world_pb2.GetWorldRequest(world_id=w) for w in ("a", "missing", "b", "boom")]
    before = metrics.counter_value("stablealign_requests_total", service="tb")
    results = await nats_client.request_batch(nc, "tb.get", asks, world_pb2.World, timeout=5)
    assert [r.spec.world_id for r in (results[0], results[2])] == ["a", "b"]
    assert isinstance(results[1], NotFoundError) and "unknown world missing" in str(results[1])
    assert results[3].code == 500 and "internal error" in str(results[3])  # no traceback to the requester
    assert most == 4  # the items ran at once, not one after another
    assert metrics.counter_value("stablealign_requests_total", service="tb") - before == 4
    assert metrics.counter_value("stablealign_requests_total", service="tb", method="GetBatch") == 0
    assert [e.name for e in server.endpoints] == ["Get", "GetBatch"]
    # The single-request subject still answers.
    reply = await nats_client.request(nc, "tb.get", world_pb2.GetWorldRequest(world_id="c"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "c"


async def test_bad_batches_get_clear_answers(nc):
    server = RequestServer(nc, service="tc", queue="tc")

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("tc.get", world_pb2.GetWorldRequest, get, "Get", batch=True)
    # A malformed envelope: 400 for the whole batch, as for a malformed single request.
    raw = await nc.request(subjects.batch_subject("tc.get"), b"\xff\xff\xff", timeout=2)
    assert raw.headers[subjects.ERROR_CODE_HEADER] == "400"
    # A malformed item: 400 for that item only.
    envelope = common_pb2.RequestBatch(requests=[b"\xff\xff", world_pb2.GetWorldRequest(world_id="ok").SerializeToString()])
    raw = await nc.request(subjects.batch_subject("tc.get"), envelope.SerializeToString(), timeout=2)
    replies = common_pb2.ReplyBatch.FromString(raw.data).replies
    assert replies[0].code == 400 and "malformed GetWorldRequest" in replies[0].error
    assert replies[1].code == 0 and world_pb2.World.FromString(replies[1].payload).spec.world_id == "ok"
    # More items than the limit: refused as a whole, clearly; and the client refuses to send one.
    too_many = common_pb2.RequestBatch(requests=[b""] * (subjects.MAX_BATCH_ITEMS + 1))
    raw = await nc.request(subjects.batch_subject("tc.get"), too_many.SerializeToString(), timeout=2)
    assert raw.headers[subjects.ERROR_CODE_HEADER] == "400" and "limit" in raw.headers[subjects.ERROR_HEADER]
    with pytest.raises(ValueError, match="1..64"):
        await nats_client.request_batch(nc, "tc.get", [world_pb2.GetWorldRequest()] * 65, world_pb2.World)
    # A method added without batch=True has no batch subject: nobody answers there.
    await server.add("tc.plain", world_pb2.GetWorldRequest, get, "Plain")
    with pytest.raises(UnavailableError):
        await nats_client.request_batch(nc, "tc.plain", [world_pb2.GetWorldRequest()], world_pb2.World, timeout=0.5,
                                attempts=1)


async def test_a_resent_batch_joins_the_items_in_flight(nc):
    """A batch re-sent while its items are still being worked on (the requester timed out) runs no item twice."""
    server = RequestServer(nc, service="td", queue="td")
    get = SlowWorldGetter(0.6)
    await server.add("td.get", world_pb2.GetWorldRequest, get, "Get", batch=True)
    asks = [world_pb2.GetWorldRequest(world_id=w) for w in ("x", "y")]
    results = await nats_client.request_batch(nc, "td.get", asks, world_pb2.World, timeout=0.3, attempts=4, backoff=0.01,
                                      liveness=None)
    assert [r.spec.world_id for r in results] == ["x", "y"]
    assert get.calls == 2


async def test_a_reply_subject_that_is_no_inbox_gets_nothing(nc, caplog):
    """A request naming a stream's or a bucket's subject as its reply is neither served nor answered there:
    no reply, no error reply, no heartbeat reaches that subject; the drop is counted and logged once."""
    from stablealign.core import metrics

    server = RequestServer(nc, service="t-refuse", queue="t")
    served: list[str] = []

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        served.append(req.world_id)
        await asyncio.sleep(0.3)  # long enough for heartbeats at a 0.2 s liveness
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.refuse", world_pb2.GetWorldRequest, get, "Get")
    landed: list[str] = []

    async def collect(msg) -> None:
        landed.append(msg.subject)

    sub = await nc.subscribe("sandbox.records.>", cb=collect)
    sub_kv = await nc.subscribe("$KV.>", cb=collect)
    refused = metrics.REPLIES_REFUSED.labels("t-refuse", "request")
    before = refused._value.get()
    payload = world_pb2.GetWorldRequest(world_id="w1").SerializeToString()
    for reply in ("sandbox.records.x", "$KV.SANDBOX_WORLDS.victim", "_INBOX", "_INBOXES.x", "_INBOX_.x"):
        await nc.publish("t.refuse", payload, reply=reply, headers={subjects.LIVENESS_HEADER: "0.2"})
    await nc.publish("t.refuse", b"\xff", reply="sandbox.records.y")  # malformed too: no error reply there
    await nc.flush()
    await asyncio.sleep(0.6)
    assert landed == [] and served == []
    assert refused._value.get() - before == 6
    said = [r for r in caplog.records if r.getMessage() == "bus.reply_refused"]
    assert {r.reply for r in said} >= {"sandbox.records.x", "$KV.SANDBOX_WORLDS.victim"}
    # An inbox still gets its reply.
    reply = await nats_client.request(nc, "t.refuse", world_pb2.GetWorldRequest(world_id="w2"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "w2" and served == ["w2"]
    await sub.unsubscribe()
    await sub_kv.unsubscribe()


async def test_a_burst_past_the_queue_is_answered_busy_at_once(nc):
    """With one slot and one queued, a burst of eight gets six 503 replies before any work; the two taken are
    served, the replica keeps serving, and it never held more than two requests."""
    server = RequestServer(nc, service="t-busy", queue="t", max_concurrency=1, max_queued=1)
    release = asyncio.Event()
    peak = [0]

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        peak[0] = max(peak[0], server.inflight)
        await release.wait()
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.busy", world_pb2.GetWorldRequest, get, "Get")
    calls = [asyncio.ensure_future(nats_client.request(nc, "t.busy", world_pb2.GetWorldRequest(world_id=f"w{i}"),
                                               world_pb2.World, timeout=5, attempts=1, liveness=None))
             for i in range(8)]
    done, _ = await asyncio.wait(calls, timeout=2.0, return_when=asyncio.ALL_COMPLETED)
    busy = [c for c in done if isinstance(c.exception(), UnavailableError)]
    assert len(busy) == 6 and all("busy" in str(c.exception()) for c in busy)
    assert server.inflight == 2
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, world_pb2.World) for r in results) == 2
    assert peak[0] <= 2
    reply = await nats_client.request(nc, "t.busy", world_pb2.GetWorldRequest(world_id="after"), world_pb2.World, timeout=2)
    assert reply.spec.world_id == "after"
