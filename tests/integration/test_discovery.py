"""The NATS service API (``$SRV.PING|INFO|STATS``) on real services and a real nats-server: every
replica answers, INFO lists the NATS endpoints, STATS counts real requests, and the documents parse
with nats-py's own ``nats.micro`` models; requests are still handled concurrently."""

from __future__ import annotations

import asyncio

import pytest
from nats.micro.service import (
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    STATS_RESPONSE_TYPE,
    ServiceInfo,
    ServicePing,
    ServiceStats,
)

from services.agent import main as agent_main
from services.agent.settings import AgentSettings
from services.observer import main as observer_main
from services.observer.settings import ObserverSettings
from stablealign import __version__
from stablealign.core.errors import NotFoundError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.serving.service import ServiceContext, ServiceParts, start_service
from stablealign.serving.settings import ServiceSettings
from stablealign.v1 import agent_pb2, observer_pb2, world_pb2
from tests.integration.test_agent_service import PRIOR, put_world, seed_memory
from tests.support.replies import ask

AGENT, OBSERVER = "stablealign-agent", "stablealign-observer"


@pytest.fixture
async def services(nc, nats_url):
    await put_world(nc, "w1")
    await seed_memory(nc, "w1")
    started = []
    try:
        for instance in ("a", "b"):
            started.append(await start_service("agent", AgentSettings(nats_url=nats_url, grpc_port=-1, instance=instance,
                                                                      shutdown_grace_seconds=2.0), agent_main.build))
        started.append(await start_service("observer", ObserverSettings(nats_url=nats_url, grpc_port=-1,
                                                                        shutdown_grace_seconds=2.0),
                                           observer_main.build))
        yield started
    finally:
        for running in started:
            await running.stop(grace=2)


async def test_ping_info_stats_of_two_replicas_and_another_service(nc, services):
    agent_a, agent_b, observer = services

    pings = await ask(nc, "$SRV.PING", expect=3)
    assert sorted(p["name"] for p in pings) == [AGENT, AGENT, OBSERVER]
    assert all(p["type"] == PING_RESPONSE_TYPE and p["version"] == __version__ for p in pings)
    assert len({p["id"] for p in pings}) == 3  # one id per replica
    parsed = [ServicePing.from_dict(p) for p in pings]
    assert {p.id for p in parsed} == {agent_a.discovery.id, agent_b.discovery.id, observer.discovery.id}
    assert {p.metadata.get("instance") for p in parsed if p.name == AGENT} == {"a", "b"}

    assert len(await ask(nc, f"$SRV.PING.{AGENT}", expect=2)) == 2
    [only] = await ask(nc, f"$SRV.PING.{AGENT}.{agent_b.discovery.id}", expect=1)
    assert only["id"] == agent_b.discovery.id and only["metadata"]["instance"] == "b"

    infos = await ask(nc, f"$SRV.INFO.{AGENT}", expect=2)
    assert len(infos) == 2
    for document in infos:
        assert document["type"] == INFO_RESPONSE_TYPE
        info = ServiceInfo.from_dict(document)
        assert info.name == AGENT and info.version == __version__ and info.description
        assert [(e.name, e.subject, e.queue_group) for e in info.endpoints] == [
            ("Draft", subjects.AGENT_DRAFT, "agent"), ("Feedback", subjects.AGENT_FEEDBACK, "agent"),
            ("FeedbackBatch", subjects.batch_subject(subjects.AGENT_FEEDBACK), "agent"), ("Revise", subjects.AGENT_REVISE, "agent")]
    [observer_info] = await ask(nc, f"$SRV.INFO.{OBSERVER}", expect=1)
    assert [(e["name"], e["subject"]) for e in observer_info["endpoints"]] == [
        ("Rate", subjects.OBSERVER_RATE), ("RateBatch", subjects.batch_subject(subjects.OBSERVER_RATE))]

    # Real requests: 6 drafts, one for a world that does not exist, one malformed; one rating.
    drafts = [agent_pb2.DraftRequest(world_id="w1", agent_id=i, round=0, question=PRIOR[i % 3][0]) for i in range(6)]
    replies = await asyncio.gather(*(nats_client.request(nc, subjects.AGENT_DRAFT, r, agent_pb2.DraftResponse, timeout=30,
                                                 attempts=1) for r in drafts))
    assert all(reply.answer for reply in replies)
    with pytest.raises(NotFoundError):
        await nats_client.request(nc, subjects.AGENT_DRAFT, agent_pb2.DraftRequest(world_id="nope", agent_id=0, question="Hi?"),
                          agent_pb2.DraftResponse, timeout=30, attempts=1)
    raw = await nc.request(subjects.AGENT_DRAFT, b"\xff\xff\xff", timeout=10)
    assert raw.headers[subjects.ERROR_CODE_HEADER] == "400"
    rate = observer_pb2.RateRequest(world_id="w1", agent_id=1, round=0, question=PRIOR[0][0], answer=PRIOR[0][1],
                                    aspect=observer_pb2.RATING_ASPECT_ALIGNMENT, stage="before")
    await nats_client.request(nc, subjects.OBSERVER_RATE, rate, observer_pb2.RateResponse, timeout=30, attempts=1)

    documents = await ask(nc, f"$SRV.STATS.{AGENT}", expect=2)
    assert len(documents) == 2 and all(d["type"] == STATS_RESPONSE_TYPE for d in documents)
    stats = [ServiceStats.from_dict(d) for d in documents]  # "started" parses with nats-py's format too
    draft = [next(e for e in s.endpoints if e.name == "Draft") for s in stats]
    assert sum(e.num_requests for e in draft) == 8
    assert sum(e.num_errors for e in draft) == 2
    errors = sorted(e.last_error.split(":", 1)[0] for e in draft if e.last_error)
    assert errors and set(errors) <= {"400", "404"}
    assert all(e.subject == subjects.AGENT_DRAFT and e.queue_group == "agent" for e in draft)
    for e in draft:
        if e.num_requests:
            assert e.processing_time > 0 and 0 < e.average_processing_time <= e.processing_time
    assert all(e.num_requests == 0 for s in stats for e in s.endpoints if e.name != "Draft")
    # Field names of the spec, as the Go and CLI clients read them.
    endpoint = documents[0]["endpoints"][0]
    assert set(endpoint) >= {"name", "subject", "queue_group", "num_requests", "num_errors", "last_error",
                             "processing_time", "average_processing_time"}
    assert documents[0]["started"].endswith("Z")
    [observer_stats] = await ask(nc, f"$SRV.STATS.{OBSERVER}", expect=1)
    assert observer_stats["endpoints"][0]["num_requests"] == 1 and observer_stats["endpoints"][0]["num_errors"] == 0

    # A stopped replica leaves: only the other one answers.
    await agent_a.stop(grace=2)
    pings = await ask(nc, f"$SRV.PING.{AGENT}", expect=1)
    assert [p["id"] for p in pings] == [agent_b.discovery.id]


class Gate:
    """A service whose handler waits at a gate: shows how many requests run at once."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.open = asyncio.Event()

    async def build(self, ctx: ServiceContext) -> ServiceParts:
        async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await asyncio.wait_for(self.open.wait(), timeout=10)
            finally:
                self.active -= 1
            return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

        await ctx.requests.add("gate.get", world_pb2.GetWorldRequest, get, "Get")
        return ServiceParts()


@pytest.mark.parametrize(("max_concurrency", "expected_peak"), [(256, 8), (3, 3)])
async def test_requests_still_run_concurrently_up_to_the_limit(nc, nats_url, max_concurrency, expected_peak):
    gate = Gate()
    settings = ServiceSettings(nats_url=nats_url, grpc_port=-1, metrics_port=-1, max_concurrency=max_concurrency,
                               shutdown_grace_seconds=2.0)
    running = await start_service("gate", settings, gate.build)
    try:
        pending = [asyncio.create_task(nats_client.request(nc, "gate.get", world_pb2.GetWorldRequest(world_id=f"w{i}"),
                                                   world_pb2.World, timeout=15, attempts=1)) for i in range(8)]
        for _ in range(500):  # bounded: up to 5 s for the requests to arrive
            if gate.active >= expected_peak:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room for more than the limit to start, were it not enforced
        assert gate.active == expected_peak
        [stats] = await ask(nc, "$SRV.STATS.stablealign-gate", expect=1)
        assert stats["endpoints"][0]["num_requests"] == 8  # counted on arrival, while they wait or work
        gate.open.set()
        replies = await asyncio.wait_for(asyncio.gather(*pending), timeout=15)
        assert sorted(r.spec.world_id for r in replies) == sorted(f"w{i}" for i in range(8))
        assert gate.peak == expected_peak
        [stats] = await ask(nc, "$SRV.STATS.stablealign-gate", expect=1)
        endpoint = stats["endpoints"][0]
        assert endpoint["num_requests"] == 8 and endpoint["num_errors"] == 0 and endpoint["last_error"] == ""
        assert endpoint["average_processing_time"] >= 100_000_000  # ns: each waited >= 0.1 s at the gate
    finally:
        await running.stop(grace=2)


def test_service_names_follow_the_micro_rules():
    from stablealign.nats.discovery import service_name

    assert service_name("agent") == "stablealign-agent"
    with pytest.raises(ValueError, match="invalid NATS service name"):
        service_name("bad name")
