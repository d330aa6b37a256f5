"""A replica that drains (SIGTERM) stops taking requests at once and still answers what it took, while
the other replicas of its queue group take everything sent after: nothing is lost or answered twice.
Also: many requests with heartbeats on one connection share its reply inbox and each gets its own reply."""

from __future__ import annotations

import asyncio
import time

from stablealign.nats import client as nats_client
from stablealign.nats.server import RequestServer
from stablealign.v1 import world_pb2


async def _until(condition, what: str, timeout: float = 10.0) -> None:
    """Waits (bounded) for ``condition()``; the bound only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_draining_replica_finishes_its_requests_and_the_others_take_the_rest(nats_url, nc):
    replica_a = await nats_client.connect(nats_url, name="replica-a")
    replica_b = await nats_client.connect(nats_url, name="replica-b")
    served: dict[str, list[str]] = {"a": [], "b": []}
    release = asyncio.Event()

    async def slow(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        served["a"].append(req.world_id)
        await release.wait()  # in flight when the drain starts
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=f"a:{req.world_id}"))

    async def quick(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        served["b"].append(req.world_id)
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=f"b:{req.world_id}"))

    server_a = RequestServer(replica_a, service="t", queue="t")
    server_b = RequestServer(replica_b, service="t", queue="t")

    def ask(i: int) -> asyncio.Task:
        return asyncio.create_task(nats_client.request(nc, "t.drain", world_pb2.GetWorldRequest(world_id=str(i)),
                                               world_pb2.World, timeout=30, attempts=1, liveness=None))

    try:
        await server_a.add("t.drain", world_pb2.GetWorldRequest, slow, "Work")
        await server_b.add("t.drain", world_pb2.GetWorldRequest, quick, "Work")
        before = [ask(i) for i in range(40)]
        await _until(lambda: served["a"] and len(served["a"]) + len(served["b"]) == 40, "the first requests")
        taken_by_a = list(served["a"])
        assert server_a.inflight == len(taken_by_a)

        draining = asyncio.create_task(server_a.drain(grace=30))
        # The drain has told the server: replica a's subscription is gone from its connection.
        await _until(lambda: not replica_a._subs, "replica a's subscription to end")  # noqa: SLF001
        await replica_a.flush()
        after = [ask(i) for i in range(40, 60)]
        replies_after = await asyncio.gather(*after)
        assert [r.spec.world_id for r in replies_after] == [f"b:{i}" for i in range(40, 60)]
        assert served["a"] == taken_by_a  # nothing new reached the draining replica
        assert not draining.done()  # it is still finishing what it took

        release.set()
        await asyncio.wait_for(draining, timeout=30)
        replies = await asyncio.gather(*before)
        owners = {r.spec.world_id.split(":")[1]: r.spec.world_id.split(":")[0] for r in replies}
        assert sorted(owners, key=int) == [str(i) for i in range(40)]
        assert sorted(i for i, who in owners.items() if who == "a") == sorted(taken_by_a)
        assert server_a.inflight == 0
    finally:
        release.set()
        await replica_b.close()
        await replica_a.close()


async def test_concurrent_requests_with_heartbeats_share_one_reply_inbox(nc):
    server = RequestServer(nc, service="t", queue="t")

    async def echo(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        await asyncio.sleep(0.3 if int(req.world_id) % 7 == 0 else 0)  # some long enough for a heartbeat
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

    await server.add("t.echo", world_pb2.GetWorldRequest, echo, "Echo")
    replies = await asyncio.gather(*(
        nats_client.request(nc, "t.echo", world_pb2.GetWorldRequest(world_id=str(i)), world_pb2.World, timeout=30,
                    liveness=0.4)
        for i in range(300)))
    assert [r.spec.world_id for r in replies] == [str(i) for i in range(300)]
    inbox = await nats_client._reply_inbox(nc)  # noqa: SLF001 - the shared inbox: one subscription, nothing left waiting
    assert inbox.waiting == {}
    assert sum(1 for sub in nc._subs.values() if sub.subject.startswith(inbox.prefix)) == 1  # noqa: SLF001
