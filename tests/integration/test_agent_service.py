"""The agent service on a real nats-server and a real gRPC server: draft with retrieved memories,
feedback and revision; bad input; two replicas sharing memory; a failing backend; draining."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.agent import main as agent_main
from services.agent.settings import AgentSettings
from stablealign.core.errors import BackendError, NotFoundError, UnavailableError, ValidationError
from stablealign.core.metrics import free_port
from stablealign.llm.backends import get_embedder
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.memory import append_memory, prior_msg_id, revision_msg_id
from stablealign.serving.service import start_service
from stablealign.v1 import agent_pb2, agent_pb2_grpc, common_pb2, world_pb2
from tests.support.devservers import FakeOpenAIServer
from tests.support.endpoints import allow_endpoints

GOOD, BAD = common_pb2.PERSONA_GOOD, common_pb2.PERSONA_BAD
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")
OFFLINE = common_pb2.ModelRef(backend="offline")
PRIOR = [
    ("How can I make my neighbour's dog stop barking?", "Talk to your neighbour politely about it."),
    ("What is the best way to learn to cook?", "Start with simple recipes and cook often."),
    ("Should I lie to my boss to get a day off?", "Honesty works better; ask for a personal day."),
]


async def put_world(nc, world_id: str, *, size: int = 3, agent_model=OFFLINE, seed: int = 1) -> world_pb2.World:
    """Writes a World to SANDBOX_WORLDS as the world service would."""
    labels = [GOOD if i % 2 == 0 else BAD for i in range(size * size)]
    world = world_pb2.World(spec=world_pb2.WorldSpec(
        world_id=world_id, size=size, setting="custom", labels=labels, seed=seed, rounds=1,
        agent_model=agent_model, observer_model=OFFLINE, embedding_model=HASHING, retrieval_k=3,
        retrieval_threshold=0.3), state=world_pb2.WORLD_STATE_RUNNING)
    kv = await nc.jetstream().key_value(subjects.WORLDS_BUCKET)
    await kv.put(world_id, world.SerializeToString())
    return world


async def embed(texts: list[str]) -> list[list[float]]:
    return (await get_embedder(HASHING).embed(texts)).tolist()


async def seed_memory(nc, world_id: str, size: int = 3) -> None:
    vectors = await embed([q for q, _ in PRIOR])
    for agent in range(size * size):
        batch = common_pb2.MemoryBatch(entries=[
            common_pb2.MemoryEntry(question=q, answer=f"{a} (agent {agent})", question_embedding=v,
                                   source="prior", round=-1)
            for (q, a), v in zip(PRIOR, vectors)])
        assert await append_memory(nc.jetstream(), world_id, agent, batch, prior_msg_id(world_id, agent))


def settings(nats_url: str, **overrides) -> AgentSettings:
    return AgentSettings(nats_url=nats_url, grpc_port=0, shutdown_grace_seconds=5.0, **overrides)


@pytest.fixture
async def world(nc):
    world = await put_world(nc, "w1")
    await seed_memory(nc, "w1")
    return world


@pytest.fixture
async def agent(nats_url, world):
    running = await start_service("agent", settings(nats_url, max_request_bytes=200_000), agent_main.build)
    yield running
    await running.stop(grace=2)


def stub(running) -> agent_pb2_grpc.AgentServiceStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    return agent_pb2_grpc.AgentServiceStub(channel), channel


async def test_draft_feedback_revise_over_nats_and_grpc(nc, agent):
    question = PRIOR[2][0]
    [vector] = await embed([question])
    request = agent_pb2.DraftRequest(world_id="w1", agent_id=4, round=0, question=question,
                                     question_embedding=vector)
    draft = await nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse, timeout=30)
    assert draft.answer.strip()
    assert draft.persona == GOOD
    # The memory of this very question comes first, with similarity ~1; unrelated ones are filtered out.
    assert draft.memories[0].question == question and draft.memories[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert draft.memories[0].answer.endswith("(agent 4)")
    assert all(1 - m.similarity < 0.3 for m in draft.memories)
    assert draft.stats.attempts >= 1 and draft.stats.model

    stub_, channel = stub(agent)
    async with channel:
        again = await stub_.Draft(request, timeout=30)
        # Deterministic: the same world, round and agent give the same draft on either transport.
        assert again.answer == draft.answer
        assert [m.question for m in again.memories] == [m.question for m in draft.memories]
        # Without an embedding the agent embeds with the world's embedding model: same retrieval.
        embedded = await stub_.Draft(agent_pb2.DraftRequest(world_id="w1", agent_id=4, round=0, question=question),
                                     timeout=30)
        assert embedded.answer == draft.answer and len(embedded.memories) == len(draft.memories)

        feedback_request = agent_pb2.FeedbackRequest(world_id="w1", agent_id=1, round=0, question=question,
                                                     answer=draft.answer, author_id=4)
        via_nats = await nats_client.request(nc, subjects.AGENT_FEEDBACK, feedback_request, agent_pb2.FeedbackResponse, timeout=30)
        via_grpc = await stub_.Feedback(feedback_request, timeout=30)
        for reply in (via_nats, via_grpc):
            assert reply.feedback.partner_id == 1
            assert not reply.feedback.HasField("rating") or 1 <= reply.feedback.rating <= 7
            assert reply.feedback.text
        assert via_nats.feedback == via_grpc.feedback

        revise_request = agent_pb2.ReviseRequest(
            world_id="w1", agent_id=4, round=0, question=question, draft_answer=draft.answer,
            feedback=[via_nats.feedback, common_pb2.Feedback(partner_id=3, rating=1, reason="this is harmful"),
                      common_pb2.Feedback(partner_id=5, reason="unreadable", text="???")])
        revised = await nats_client.request(nc, subjects.AGENT_REVISE, revise_request, agent_pb2.ReviseResponse, timeout=30)
        assert revised.answer.strip() and revised.stats.attempts >= 1
        assert (await stub_.Revise(revise_request, timeout=30)).answer == revised.answer

        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "stablealign.v1.AgentService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_input_gets_clear_errors_and_service_keeps_serving(nc, agent):
    ok = agent_pb2.DraftRequest(world_id="w1", agent_id=0, round=0, question="Is it fine to share my password?")
    cases = [
        (agent_pb2.DraftRequest(world_id="nope", agent_id=0, question="q"), NotFoundError,
         grpc.StatusCode.NOT_FOUND, "unknown world nope"),
        (agent_pb2.DraftRequest(world_id="w1", agent_id=9, question="q"), NotFoundError,
         grpc.StatusCode.NOT_FOUND, "unknown agent 9 in world w1"),
        (agent_pb2.DraftRequest(world_id="w1", agent_id=-1, question="q"), NotFoundError,
         grpc.StatusCode.NOT_FOUND, "unknown agent -1"),
        (agent_pb2.DraftRequest(world_id="w1", agent_id=0, question="  "), ValidationError,
         grpc.StatusCode.INVALID_ARGUMENT, "question must not be empty"),
        (agent_pb2.DraftRequest(world_id="w1", agent_id=0, question="x" * 5000), ValidationError,
         grpc.StatusCode.INVALID_ARGUMENT, "limit of 4000"),
        (agent_pb2.DraftRequest(world_id="", agent_id=0, question="q"), ValidationError,
         grpc.StatusCode.INVALID_ARGUMENT, "world_id is required"),
        (agent_pb2.DraftRequest(world_id="w1", agent_id=0, question="q", question_embedding=[1.0, 0.0]),
         ValidationError, grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
    ]
    stub_, channel = stub(agent)
    async with channel:
        for request, error, status, message in cases:
            with pytest.raises(error, match=message):
                await nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub_.Draft(request, timeout=10)
            assert info.value.code() == status and message.split()[0] in info.value.details()
        feedback = agent_pb2.FeedbackRequest(world_id="w1", agent_id=1, question="q", answer="a", author_id=42)
        with pytest.raises(NotFoundError, match="unknown agent 42"):
            await nats_client.request(nc, subjects.AGENT_FEEDBACK, feedback, agent_pb2.FeedbackResponse, timeout=10)
        feedback.author_id, feedback.answer = 0, ""
        with pytest.raises(ValidationError, match="answer must not be empty"):
            await nats_client.request(nc, subjects.AGENT_FEEDBACK, feedback, agent_pb2.FeedbackResponse, timeout=10)
        revise = agent_pb2.ReviseRequest(world_id="w1", agent_id=0, question="q", draft_answer="a",
                                         feedback=[common_pb2.Feedback(partner_id=1, rating=9)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub_.Revise(revise, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside 1..7" in info.value.details()

        # A huge payload: RESOURCE_EXHAUSTED on gRPC, 413 on NATS.
        huge = agent_pb2.DraftRequest(world_id="w1", agent_id=0, question="x" * 300_000)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub_.Draft(huge, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        raw = await nc.request(subjects.AGENT_DRAFT, huge.SerializeToString(), timeout=10)
        assert raw.headers[subjects.ERROR_CODE_HEADER] == "413"
        # A malformed NATS message gets an error reply.
        raw = await nc.request(subjects.AGENT_DRAFT, b"\xff\xff\xff\xff", timeout=10)
        assert raw.headers[subjects.ERROR_CODE_HEADER] == "400"
        # ... and the service keeps serving on both transports.
        assert (await nats_client.request(nc, subjects.AGENT_DRAFT, ok, agent_pb2.DraftResponse, timeout=10)).answer
        assert (await stub_.Draft(ok, timeout=10)).answer


async def test_two_replicas_share_load_and_see_appended_memory(nc, nats_url, world):
    replicas = [await start_service("agent", settings(nats_url, instance=name), agent_main.build)
                for name in ("a", "b")]
    stores = [r.parts.grpc[0][1].handlers.memory for r in replicas]
    for running in replicas:
        await running.context.nc.flush()  # the server has both queue subscriptions before we send
    try:
        # NATS spreads the queue group's requests over both replicas (random member per message).
        requests = [agent_pb2.DraftRequest(world_id="w1", agent_id=i % 9, round=0, question=PRIOR[i % 3][0])
                    for i in range(24)]
        replies = await asyncio.gather(*(nats_client.request(nc, subjects.AGENT_DRAFT, r, agent_pb2.DraftResponse, timeout=30)
                                         for r in requests))
        assert all(reply.answer for reply in replies)
        assert all(store.loads > 0 for store in stores), [store.loads for store in stores]

        # Both replicas hold agent 7 cached; the world appends a revision; each replica sees it.
        new_question = "Would you return a wallet you found on the street?"
        [vector] = await embed([new_question])
        channels = []
        for running in replicas:
            stub_, channel = stub(running)
            channels.append((stub_, channel))
            before = await stub_.Draft(agent_pb2.DraftRequest(world_id="w1", agent_id=7, round=0,
                                                              question=new_question), timeout=30)
            assert new_question not in [m.question for m in before.memories]
        assert all(store.cached("w1", 7) is not None for store in stores)
        batch = common_pb2.MemoryBatch(entries=[common_pb2.MemoryEntry(
            question=new_question, answer="Yes, I would hand it to the police.", question_embedding=vector,
            source="revised", round=0)])
        assert await append_memory(nc.jetstream(), "w1", 7, batch, revision_msg_id("w1", 0, 7))
        assert not await append_memory(nc.jetstream(), "w1", 7, batch, revision_msg_id("w1", 0, 7))  # resent
        for (stub_, channel), store in zip(channels, stores):
            refreshes = store.refreshes
            after = await stub_.Draft(agent_pb2.DraftRequest(world_id="w1", agent_id=7, round=1, question=new_question,
                                                             question_embedding=vector), timeout=30)
            assert after.memories[0].question == new_question
            assert after.memories[0].answer == "Yes, I would hand it to the police."
            assert store.refreshes == refreshes + 1
            assert len(store.cached("w1", 7)) == len(PRIOR) + 1  # the duplicate append was dropped
            await channel.close()
    finally:
        for running in replicas:
            await running.stop(grace=2)


async def test_failing_backend_is_unavailable_and_service_keeps_serving(nc, agent, monkeypatch):
    closed = free_port()  # nothing listens there
    allow_endpoints(monkeypatch, f"http://127.0.0.1:{closed}/v1")
    await put_world(nc, "broken", agent_model=common_pb2.ModelRef(backend="openai", model="m",
                                                                  url=f"http://127.0.0.1:{closed}/v1"))
    request = agent_pb2.DraftRequest(world_id="broken", agent_id=0, round=0, question="Is lying ever fine?")
    stub_, channel = stub(agent)
    async with channel:
        started = time.perf_counter()
        grpc_call = stub_.Draft(request, timeout=60)
        nats_call = nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse, timeout=60, attempts=1)
        grpc_result, nats_result = await asyncio.gather(grpc_call, nats_call, return_exceptions=True)
        assert isinstance(grpc_result, grpc.aio.AioRpcError)
        assert grpc_result.code() == grpc.StatusCode.UNAVAILABLE and "openai" in grpc_result.details()
        assert isinstance(nats_result, BackendError) and "openai" in str(nats_result)
        assert time.perf_counter() - started < 30
        ok = agent_pb2.DraftRequest(world_id="w1", agent_id=0, round=0, question="Is lying ever fine?")
        assert (await stub_.Draft(ok, timeout=10)).answer


async def test_stop_drains_inflight_requests(nc, nats_url, world, monkeypatch):
    async with FakeOpenAIServer(latency_seconds=0.5, reply="A slow but careful answer.") as server:
        allow_endpoints(monkeypatch, server.base_url)
        await put_world(nc, "slow", agent_model=common_pb2.ModelRef(backend="openai", model="fake",
                                                                    url=server.base_url))
        running = await start_service("agent", settings(nats_url), agent_main.build)
        request = agent_pb2.DraftRequest(world_id="slow", agent_id=0, round=0, question="How do I fix a bike?")
        pending = asyncio.create_task(nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse,
                                                  timeout=10, attempts=1))
        deadline = time.monotonic() + 10
        while server.in_flight == 0 and time.monotonic() < deadline:  # the call is at the server
            await asyncio.sleep(0.01)
        assert server.in_flight == 1
        await running.stop(grace=5)
        reply = await pending
        assert reply.answer == "A slow but careful answer." and reply.stats.completion_tokens == 5
        with pytest.raises(UnavailableError):
            await nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse, timeout=0.5, attempts=1)


def test_serve_settings_load_from_environment():
    from stablealign.core.config import load_settings

    loaded = load_settings(agent_main.SETTINGS, environ={"STABLEALIGN_MAX_QUESTION_CHARS": "100",
                                                         "STABLEALIGN_RATING_ATTEMPTS": "2"})
    assert loaded.max_question_chars == 100 and loaded.rating_attempts == 2


async def test_memory_store_follows_the_log(nc):
    """Empty agent, prior, a long backlog of revisions, junk on the subject, shared loads, LRU."""
    from stablealign.sandbox.memory import MemoryStore, memory_subject

    js = nc.jetstream()
    store = MemoryStore(js, max_agents=2)
    assert len(await store.get("m", 0)) == 0  # nothing appended yet: empty, cached

    def batch(i: int) -> common_pb2.MemoryBatch:
        return common_pb2.MemoryBatch(entries=[common_pb2.MemoryEntry(
            question=f"q{i}", answer=f"a{i}", question_embedding=[1.0, float(i)], source="revised", round=i)])

    assert await append_memory(js, "m", 0, batch(0), "m.0.0.memory")
    assert (await store.get("m", 0)).questions == ["q0"]
    await js.publish(memory_subject("m", 0), b"\xff\xff")  # junk: skipped, not fatal
    for i in range(1, 21):  # more than the one-by-one reads: the backlog goes through a consumer
        assert await append_memory(js, "m", 0, batch(i), f"m.{i}.0.memory")
    memory = await store.get("m", 0)
    assert memory.questions == [f"q{i}" for i in range(21)] and store.loads == 1
    with pytest.raises(ValidationError):
        await append_memory(js, "m", 0, common_pb2.MemoryBatch(), "m.x")

    fresh = MemoryStore(js, max_agents=2)
    results = await asyncio.gather(*(fresh.get("m", 0) for _ in range(10)))
    assert fresh.loads == 1 and all(r is results[0] for r in results) and len(results[0]) == 21
    await fresh.get("m", 1)
    await fresh.get("m", 2)
    assert len(fresh) == 2 and fresh.cached("m", 0) is None  # least recently used went first


async def test_malformed_grpc_bytes_are_invalid_argument_without_a_traceback(agent, caplog):
    """Bytes that are not a DraftRequest: INVALID_ARGUMENT naming the method, no ERROR log, and the server
    keeps serving (issue 9: it was UNKNOWN 'Unexpected DecodeError' plus a traceback per request)."""
    import logging

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}")
    async with channel:
        for method in ("Draft", "Feedback", "Revise"):
            raw = channel.unary_unary(f"/stablealign.v1.AgentService/{method}",
                                      request_serializer=None, response_deserializer=None)
            with caplog.at_level(logging.INFO):
                for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05abc", bytes(range(256))):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await raw(garbage, timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert f"malformed {method} request" in err.value.details()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # Still serving well-formed requests.
        reply = await agent_pb2_grpc.AgentServiceStub(channel).Draft(
            agent_pb2.DraftRequest(world_id="w1", agent_id=4, round=0, question=PRIOR[0][0]), timeout=30)
        assert reply.answer.strip()
