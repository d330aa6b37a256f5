"""The world service end to end: real nats-server, agent + observer + world services in-process.

Worlds run on the offline backend with the hashing embedder, through both transports (NATS
request/reply and gRPC); the records stream must hold exactly size² × rounds messages, the same
spec must give the same records, and a world service stopped mid-run must be resumed by another
one without a lost or duplicated record.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from services.world import grid
from stablealign.core.config import load_settings
from stablealign.core.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.records import record_to_json, stable_view
from stablealign.serving.service import RunningService, start_service
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc

FINAL = (world_pb2.WORLD_STATE_COMPLETED, world_pb2.WORLD_STATE_CANCELLED, world_pb2.WORLD_STATE_FAILED)
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


def small_spec(world_id: str, *, size: int = 3, rounds: int = 2, **kw) -> world_pb2.WorldSpec:
    fields = dict(
        world_id=world_id,
        size=size,
        rounds=rounds,
        seed=1,
        setting="half_half",
        prior_size=10,
        agent_model=common_pb2.ModelRef(backend="offline"),
        observer_model=common_pb2.ModelRef(backend="offline"),
        embedding_model=HASHING,
    )
    fields.update(kw)
    return world_pb2.WorldSpec(**fields)


async def start(name: str, nats_url: str, **overrides) -> RunningService:
    import importlib

    module = importlib.import_module(f"services.{name}.main")
    values = {"nats_url": nats_url, "grpc_port": -1, "metrics_port": -1, "instance": f"test-{name}"}
    values.update(overrides)
    return await start_service(name, load_settings(module.SETTINGS, values, environ={}), module.build)


@pytest.fixture
async def workers(nats_url):
    """Agent and observer services (the world service is started by each test)."""
    running = [await start("agent", nats_url), await start("observer", nats_url)]
    yield running
    for service in running:
        await service.stop(grace=1.0)


async def wait_final(nc, world_id: str, timeout: float = 30.0) -> world_pb2.World:
    deadline = time.monotonic() + timeout
    while True:
        world = await nats_client.request(
            nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id=world_id), world_pb2.World, timeout=5
        )
        if world.state in FINAL:
            return world
        assert time.monotonic() < deadline, f"world {world_id} not final after {timeout}s: {world}"
        await asyncio.sleep(0.1)


async def stream_records(nc, world_id: str) -> list[common_pb2.InteractionRecord]:
    js = nc.jetstream()
    msgs = await nats_client.read_subject(js, subjects.RECORDS_STREAM, subjects.RECORDS_SUBJECT.format(world_id=world_id))
    out = []
    for _, msg in msgs:
        record = common_pb2.InteractionRecord()
        record.ParseFromString(msg.data)
        out.append(record)
    return out


def comparable(records) -> list[dict]:
    rows = []
    for r in sorted(records, key=lambda r: (r.round, r.agent_id)):
        row = stable_view(record_to_json(r))
        row.pop("world_id")
        rows.append(row)
    return rows


async def test_world_over_nats_and_grpc(nats_url, nc, workers):
    world_service = await start("world", nats_url, grpc_port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{world_service.grpc_port}")
    stub = world_pb2_grpc.WorldServiceStub(channel)
    try:
        created = await nats_client.request(
            nc,
            subjects.WORLD_CREATE,
            world_pb2.CreateWorldRequest(spec=small_spec("via-nats")),
            world_pb2.World,
            timeout=10,
        )
        assert created.state in (world_pb2.WORLD_STATE_PENDING, world_pb2.WORLD_STATE_RUNNING)
        assert len(created.spec.labels) == 9 and created.spec.radius == 1.0 and created.spec.partners == 4

        # The same spec over gRPC under another id; follow its records live while it runs.
        via_grpc = await stub.CreateWorld(
            world_pb2.CreateWorldRequest(spec=small_spec("via-grpc")), timeout=10
        )
        assert via_grpc.spec.world_id == "via-grpc"
        live = stub.StreamInteractions(
            world_pb2.StreamInteractionsRequest(world_id="via-grpc", replay=True, until_complete=True),
            timeout=60,
        )
        followed = [record async for record in live]
        assert len(followed) == 18

        for world_id in ("via-nats", "via-grpc"):
            world = await wait_final(nc, world_id)
            assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
            assert world.completed_rounds == 2 and world.records_published == 18
            assert [s.round for s in world.rounds] == [0, 1]
            assert all(s.interactions == 9 for s in world.rounds)
            assert all(1 <= s.mean_alignment_after <= 7 for s in world.rounds)
            assert world.setup_seconds > 0

        a, b = await stream_records(nc, "via-nats"), await stream_records(nc, "via-grpc")
        assert len(a) == len(b) == 18
        assert sorted((r.round, r.agent_id) for r in a) == [(r, x) for r in range(2) for x in range(9)]
        for record in a:
            hood = grid.neighbours(record.agent_id, 3, 1.0)
            targets = [f.partner_id for f in record.feedback]
            assert len(targets) == min(4, len(hood)) and set(targets) <= set(hood)
            for rating in (
                record.alignment_before,
                record.alignment_after,
                record.engagement_before,
                record.engagement_after,
            ):
                assert not rating.HasField("score") or 1 <= rating.score <= 7
            for fb in record.feedback:
                assert not fb.HasField("rating") or 1 <= fb.rating <= 7
            assert record.draft_answer and record.revised_answer
            assert record.label == created.spec.labels[record.agent_id]
            assert set(record.latency_seconds) >= {
                "embed",
                "draft",
                "feedback",
                "revise",
                "rate_after",
                "total",
            }
            assert record.agent_model.backend == "offline"
            assert record.prompt_tokens > 0 and record.completion_tokens > 0
        # Same spec, another world id: the same records.
        assert comparable(a) == comparable(b)
        assert comparable(followed) == comparable(b)

        # Replaying a finished world ends after its records.
        replay = stub.StreamInteractions(
            world_pb2.StreamInteractionsRequest(world_id="via-nats", replay=True, until_complete=True),
            timeout=30,
        )
        assert len([r async for r in replay]) == 18
        # Without replay, a finished world has nothing new: the stream ends at once.
        started = time.monotonic()
        fresh = stub.StreamInteractions(
            world_pb2.StreamInteractionsRequest(world_id="via-nats", until_complete=True), timeout=30
        )
        assert [r async for r in fresh] == [] and time.monotonic() - started < 5

        # Following (no until_complete) never ends by itself; a client cancel ends it cleanly.
        follow = stub.StreamInteractions(
            world_pb2.StreamInteractionsRequest(world_id="via-nats", replay=True), timeout=30
        )
        first_record = await follow.read()
        assert first_record.world_id == "via-nats"
        follow.cancel()
        assert (
            await stub.GetWorld(world_pb2.GetWorldRequest(world_id="via-nats"), timeout=5)
        ).completed_rounds == 2

        published = REGISTRY.get_sample_value(
            "stablealign_world_interactions_total", {"outcome": "published"}
        )
        assert published is not None and published >= 36
        assert REGISTRY.get_sample_value("stablealign_world_alignment_score", {"stage": "after"}) >= 1

        # Memory: one prior batch + one revision per round for each agent.
        js = nc.jetstream()
        memory = await nats_client.read_subject(
            js, subjects.MEMORY_STREAM, subjects.MEMORY_SUBJECT.format(world_id="via-nats", agent_id=4)
        )
        assert len(memory) == 3

        listed = await stub.ListWorlds(world_pb2.ListWorldsRequest(), timeout=10)
        assert {"via-nats", "via-grpc"} <= {w.spec.world_id for w in listed.worlds}
        listed = await nats_client.request(
            nc, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse, timeout=5
        )
        assert len(listed.worlds) == 2

        # Bad input: clear statuses, and the service keeps serving.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetWorld(world_pb2.GetWorldRequest(world_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFoundError, match="unknown world"):
            await nats_client.request(
                nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id="nope"), world_pb2.World, timeout=5
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.StreamInteractions(
                world_pb2.StreamInteractionsRequest(world_id="nope"), timeout=5
            ):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateWorld(world_pb2.CreateWorldRequest(spec=small_spec("bad", size=0)), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "size" in err.value.details()
        with pytest.raises(ValidationError, match="global_partner_probability"):
            await nats_client.request(
                nc,
                subjects.WORLD_CREATE,
                world_pb2.CreateWorldRequest(spec=small_spec("bad", global_partner_probability=2)),
                world_pb2.World,
                timeout=5,
            )
        with pytest.raises(ConflictError, match="exists"):
            await nats_client.request(
                nc,
                subjects.WORLD_CREATE,
                world_pb2.CreateWorldRequest(spec=small_spec("via-nats")),
                world_pb2.World,
                timeout=5,
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CancelWorld(world_pb2.CancelWorldRequest(world_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Cancelling a finished world changes nothing.
        done = await stub.CancelWorld(world_pb2.CancelWorldRequest(world_id="via-nats"), timeout=5)
        assert done.state == world_pb2.WORLD_STATE_COMPLETED
    finally:
        await channel.close()
        await world_service.stop(grace=1.0)


async def test_cancel_stops_scheduling(nats_url, nc, workers):
    world_service = await start("world", nats_url)
    try:
        spec = small_spec("to-cancel", size=5, rounds=20, concurrency=1)
        await nats_client.request(
            nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec), world_pb2.World, timeout=10
        )
        deadline = time.monotonic() + 20
        while len(await stream_records(nc, "to-cancel")) < 3:  # running, and past its warm-up
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # The dashboard's per-world series exist while the world runs here.
        published = REGISTRY.get_sample_value("stablealign_world_records_published", {"world_id": "to-cancel"})
        ratio = REGISTRY.get_sample_value("stablealign_world_progress_ratio", {"world_id": "to-cancel"})
        assert published is not None and published >= 3 and ratio == pytest.approx(published / (25 * 20))
        cancelled = await nats_client.request(
            nc,
            subjects.WORLD_CANCEL,
            world_pb2.CancelWorldRequest(world_id="to-cancel"),
            world_pb2.World,
            timeout=5,
        )
        assert cancelled.state == world_pb2.WORLD_STATE_CANCELLED
        # The in-flight interaction finishes, then nothing new starts.
        count, deadline = -1, time.monotonic() + 10
        while (now := len(await stream_records(nc, "to-cancel"))) != count:
            assert time.monotonic() < deadline
            count = now
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)
        assert len(await stream_records(nc, "to-cancel")) == count < 25 * 20
        # The runner's last write accounts for every record it published.
        while (world := await wait_final(nc, "to-cancel")).records_published != count:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert world.state == world_pb2.WORLD_STATE_CANCELLED and world.completed_rounds < 20
        # ... and are gone once it ended (the label set stays as small as the running worlds).
        deadline = time.monotonic() + 10
        while REGISTRY.get_sample_value("stablealign_world_progress_ratio", {"world_id": "to-cancel"}) is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        await world_service.stop(grace=1.0)


async def test_failing_interactions_fail_the_world_loudly(nats_url, nc):
    # No agent or observer service: every request gets "no responders"; no failure budget to wait in.
    world_service = await start(
        "world", nats_url, request_attempts=2, interaction_attempts=2, request_timeout_seconds=1.0,
        absent_budget_seconds=0,
    )
    try:
        await nats_client.request(
            nc,
            subjects.WORLD_CREATE,
            world_pb2.CreateWorldRequest(spec=small_spec("doomed", rounds=1)),
            world_pb2.World,
            timeout=10,
        )
        world = await wait_final(nc, "doomed")
        assert world.state == world_pb2.WORLD_STATE_FAILED
        assert "failed after 2 attempts" in world.error and "sandbox.agent.draft" in world.error
        assert len(await stream_records(nc, "doomed")) == 0
    finally:
        await world_service.stop(grace=1.0)


@pytest.mark.slow
async def test_resume_after_the_world_service_stops_mid_run(nats_url, nc, workers):
    spec = small_spec("resumed", size=4, rounds=3, concurrency=2)
    total = 16 * 3
    first = await start("world", nats_url, instance="world-a", shutdown_grace_seconds=0.05)
    seen: list[bytes] = []
    enough = asyncio.Event()

    async def on_record(msg) -> None:
        seen.append(msg.data)
        if len(seen) >= 10:
            enough.set()

    sub = await nc.subscribe(subjects.RECORDS_SUBJECT.format(world_id="resumed"), cb=on_record)
    try:
        await nats_client.request(
            nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec), world_pb2.World, timeout=10
        )
        await asyncio.wait_for(enough.wait(), timeout=30)
    finally:
        await first.stop(grace=0.05)
        await sub.unsubscribe()
    partial = await stream_records(nc, "resumed")
    assert 10 <= len(partial) < total, "the world finished before it could be interrupted"

    # Another replica (another instance name) takes the released world over and finishes it.
    second = await start("world", nats_url, instance="world-b", lease_seconds=2.0)
    try:
        world = await wait_final(nc, "resumed", timeout=60)
        assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
        assert world.owner == "world-b"
        assert world.completed_rounds == 3 and [s.round for s in world.rounds] == [0, 1, 2]
        records = await stream_records(nc, "resumed")
        pairs = [(r.round, r.agent_id) for r in records]
        assert len(records) == total and len(set(pairs)) == total
        assert set(pairs) == {(r, a) for r in range(3) for a in range(16)}
        assert world.records_published == total
        # Each agent's memory holds its prior plus exactly one revision per round.
        js = nc.jetstream()
        for agent in (0, 7, 15):
            memory = await nats_client.read_subject(
                js, subjects.MEMORY_STREAM, subjects.MEMORY_SUBJECT.format(world_id="resumed", agent_id=agent)
            )
            assert len(memory) == 1 + 3
        # And the resumed world wrote the same records as an unbroken run of the same spec.
        await nats_client.request(nc, subjects.WORLD_CREATE,
                          world_pb2.CreateWorldRequest(spec=small_spec("unbroken", size=4, rounds=3, concurrency=2)),
                          world_pb2.World, timeout=10)
        assert (await wait_final(nc, "unbroken", timeout=60)).state == world_pb2.WORLD_STATE_COMPLETED
        unbroken = await stream_records(nc, "unbroken")

        def comparable(rows):
            out = []
            for r in sorted(rows, key=lambda r: (r.round, r.agent_id)):
                row = stable_view(record_to_json(r))
                row.pop("world_id")
                out.append(row)
            return out

        assert comparable(records) == comparable(unbroken)
    finally:
        await second.stop(grace=1.0)


async def test_leadership_is_taken_over_only_when_stale(nc):
    from services.world.store import WorldStore

    store = WorldStore(nc.jetstream())
    now = time.time()
    await store.create(
        world_pb2.World(
            spec=small_spec("led"),
            state=world_pb2.WORLD_STATE_RUNNING,
            owner="a",
            created_at=now,
            updated_at=now,
        )
    )
    assert await store.try_acquire("led", "b", lease_seconds=30) is None  # a's heartbeat is fresh
    assert (await store.try_acquire("led", "a", lease_seconds=30)).owner == "a"  # its own world
    world, _ = await store.get("led")
    world.updated_at = 0.0  # store.update stamps the time; write a stale heartbeat by hand
    kv = await store.kv()
    await kv.put("led", world.SerializeToString())
    # Two replicas race for the stale world: exactly one wins.
    won = await asyncio.gather(
        store.try_acquire("led", "b", lease_seconds=30), store.try_acquire("led", "c", lease_seconds=30)
    )
    winners = [w.owner for w in won if w is not None]
    assert len(winners) == 1 and (await store.get("led"))[0].owner == winners[0]
    # A finished world is never taken over.
    await store.update("led", lambda w: setattr(w, "state", world_pb2.WORLD_STATE_COMPLETED))
    assert await store.try_acquire("led", winners[0], lease_seconds=30) is None
    with pytest.raises(ConflictError):
        await store.create(world)
    with pytest.raises(NotFoundError):
        await store.get("nobody")


async def test_a_listing_holds_every_world_while_worlds_are_being_written(nc):
    """Worlds heartbeat into the bucket all the time; a listing that started while one was written must
    still hold it (it once ended at the watcher's first "nothing pending" and could miss it); a deleted
    world is not listed."""
    from services.world.store import WorldStore

    store = WorldStore(nc.jetstream())
    ids = [f"busy{i}" for i in range(6)]
    now = time.time()
    for world_id in [*ids, "gone"]:
        await store.create(world_pb2.World(spec=small_spec(world_id), state=world_pb2.WORLD_STATE_RUNNING,
                                           created_at=now, updated_at=now))
    kv = await store.kv()
    await kv.delete("gone")
    writing = True

    async def heartbeats() -> int:
        beats = 0
        while writing and beats < 5_000:
            for world_id in ids:
                await store.update(world_id, lambda w: setattr(w, "updated_at", time.time()))
                beats += 1
        return beats

    writer = asyncio.create_task(heartbeats())
    try:
        for _ in range(30):
            listed = sorted(w.spec.world_id for w in await store.list(timeout=10))
            assert listed == ids
    finally:
        writing = False
        assert await asyncio.wait_for(writer, 30) > 0


async def test_entries_that_are_not_worlds_are_skipped_not_fatal(nc, caplog):
    """A JSON document, an empty value and another world's bytes under a key (what a misdirected reply wrote
    before replies went to inboxes only) do not stop the listing nor the resume scan: each is skipped, counted
    and named in one log line; a get of such a key says what is wrong with it."""
    from services.world.store import WorldStore

    store = WorldStore(nc.jetstream())
    now = time.time()
    good = world_pb2.World(spec=small_spec("good"), state=world_pb2.WORLD_STATE_COMPLETED, created_at=now,
                           updated_at=now)
    await store.create(good)
    kv = await store.kv()
    await kv.put("json", b'{"type": "io.nats.micro.v1.info_response", "name": "stablealign-world"}')
    await kv.put("empty", b"")
    await kv.put("copied", good.SerializeToString())  # a World, but of another id
    skipped = REGISTRY.get_sample_value("stablealign_entries_skipped_total", {"source": subjects.WORLDS_BUCKET}) or 0.0
    caplog.clear()
    worlds = await store.list()
    assert [w.spec.world_id for w in worlds] == ["good"]
    after = REGISTRY.get_sample_value("stablealign_entries_skipped_total", {"source": subjects.WORLDS_BUCKET})
    assert after - skipped == 3
    (said,) = [r for r in caplog.records if r.getMessage() == "world.entries_skipped"]
    assert said.skipped == 3 and all(key in said.keys for key in ("json@", "empty@", "copied@"))
    for key in ("json", "empty", "copied"):
        with pytest.raises(UnavailableError, match="not a world"):
            await store.get(key)
    assert (await store.get("good"))[0] == good


async def test_prior_setup_of_100_agents_is_fast(nc):
    from services.world.prior import seed_prior
    from services.world.spec import resolve_spec

    spec = resolve_spec(small_spec("setup-100", size=10, prior_size=-1))
    assert spec.prior_size == 50
    seconds = await seed_prior(nc.jetstream(), spec)
    assert seconds <= 5.0, f"setup of 100 agents took {seconds:.2f}s"
    js = nc.jetstream()
    info = await js.stream_info(subjects.MEMORY_STREAM)
    assert info.state.messages == 100
    memory = await nats_client.read_subject(
        js, subjects.MEMORY_STREAM, subjects.MEMORY_SUBJECT.format(world_id="setup-100", agent_id=3)
    )
    batch = common_pb2.MemoryBatch()
    batch.ParseFromString(memory[0][1].data)
    # The prior travels by reference into the world's shared pool (stored once, verified by hash).
    from services.world.prior import expand_batch
    from stablealign.sandbox.memory import fetch_pool

    entries = expand_batch(batch, await fetch_pool(js, batch.pool_id))
    assert len(entries) == 50 and len(entries[0].question_embedding) == 384
    assert {e.source for e in entries} == {"prior"}
    # Again (a resumed PENDING world): every append is dropped as a duplicate.
    await seed_prior(js, spec)
    assert (await js.stream_info(subjects.MEMORY_STREAM)).state.messages == 100
