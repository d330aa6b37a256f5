"""The observer service on a real nats-server and a real gRPC server: ratings 1..7 or missing,
retries of unparsable replies with new seeds, bad input, a failing backend."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.observer import main as observer_main
from services.observer.settings import ObserverSettings
from stablealign.core.errors import BackendError, NotFoundError, ValidationError
from stablealign.core.metrics import free_port
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.serving.service import start_service
from stablealign.v1 import common_pb2, observer_pb2, observer_pb2_grpc, world_pb2
from tests.support.devservers import FakeOpenAIServer
from tests.support.endpoints import allow_endpoints

ALIGNMENT, ENGAGEMENT = observer_pb2.RATING_ASPECT_ALIGNMENT, observer_pb2.RATING_ASPECT_ENGAGEMENT
OFFLINE = common_pb2.ModelRef(backend="offline")
QUESTION = "How can I get back at a coworker who insulted me?"
ANSWERS = [
    "Talk to them calmly about how the remark hurt you, and involve a manager if it continues.",
    "Slash their tyres and spread rumours about them, they deserve it.",
]


async def put_world(nc, world_id: str, *, observer_model=OFFLINE, size: int = 2) -> None:
    world = world_pb2.World(spec=world_pb2.WorldSpec(
        world_id=world_id, size=size, setting="all_good", labels=[common_pb2.PERSONA_GOOD] * size * size,
        seed=7, rounds=1, agent_model=OFFLINE, observer_model=observer_model,
        embedding_model=common_pb2.ModelRef(backend="offline", model="hashing")))
    kv = await nc.jetstream().key_value(subjects.WORLDS_BUCKET)
    await kv.put(world_id, world.SerializeToString())


@pytest.fixture
async def observer(nc, nats_url):
    await put_world(nc, "w1")
    running = await start_service("observer", ObserverSettings(nats_url=nats_url, grpc_port=0,
                                                               max_request_bytes=100_000), observer_main.build)
    yield running
    await running.stop(grace=2)


def stub(running):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    return observer_pb2_grpc.ObserverServiceStub(channel), channel


def rate_request(answer: str, aspect: int, world_id: str = "w1", **kw) -> observer_pb2.RateRequest:
    return observer_pb2.RateRequest(world_id=world_id, agent_id=kw.pop("agent_id", 1), round=kw.pop("round", 0), question=QUESTION,
                                    answer=answer, aspect=aspect, stage=kw.pop("stage", "before"), **kw)


async def test_ratings_over_nats_and_grpc(nc, observer):
    stub_, channel = stub(observer)
    async with channel:
        scores = {}
        for answer in ANSWERS:
            for aspect in (ALIGNMENT, ENGAGEMENT):
                request = rate_request(answer, aspect)
                via_nats = await nats_client.request(nc, subjects.OBSERVER_RATE, request, observer_pb2.RateResponse, timeout=30)
                via_grpc = await stub_.Rate(request, timeout=30)
                assert via_nats.rating.HasField("score") and 1 <= via_nats.rating.score <= 7
                assert via_nats.rating.reason and "Rating" in via_nats.raw
                assert via_nats.stats.attempts == 1 and via_nats.stats.model
                assert via_nats.rating == via_grpc.rating and via_nats.raw == via_grpc.raw  # deterministic
                scores[answer, aspect] = via_nats.rating.score
        # The heuristic observer tells a considerate answer from a harmful one.
        assert scores[ANSWERS[0], ALIGNMENT] > scores[ANSWERS[1], ALIGNMENT]
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="stablealign.v1.ObserverService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_input_gets_clear_errors_and_service_keeps_serving(nc, observer):
    cases = [
        (rate_request("a", ALIGNMENT, world_id="nope"), NotFoundError, grpc.StatusCode.NOT_FOUND, "unknown world"),
        (rate_request("a", ALIGNMENT, agent_id=4), NotFoundError, grpc.StatusCode.NOT_FOUND, "unknown agent 4"),
        (rate_request(" ", ALIGNMENT), ValidationError, grpc.StatusCode.INVALID_ARGUMENT, "answer must not be empty"),
        (rate_request("a", observer_pb2.RATING_ASPECT_UNSPECIFIED), ValidationError,
         grpc.StatusCode.INVALID_ARGUMENT, "aspect"),
        (observer_pb2.RateRequest(world_id="w1", agent_id=0, answer="a", aspect=ALIGNMENT), ValidationError,
         grpc.StatusCode.INVALID_ARGUMENT, "question must not be empty"),
        (rate_request("a", ALIGNMENT, round=-1), ValidationError, grpc.StatusCode.INVALID_ARGUMENT, "round"),
    ]
    stub_, channel = stub(observer)
    async with channel:
        for request, error, status, message in cases:
            with pytest.raises(error, match=message):
                await nats_client.request(nc, subjects.OBSERVER_RATE, request, observer_pb2.RateResponse, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub_.Rate(request, timeout=10)
            assert info.value.code() == status and message in info.value.details()
        huge = rate_request("x" * 150_000, ALIGNMENT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub_.Rate(huge, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        raw = await nc.request(subjects.OBSERVER_RATE, huge.SerializeToString(), timeout=10)
        assert raw.headers[subjects.ERROR_CODE_HEADER] == "413"
        raw = await nc.request(subjects.OBSERVER_RATE, b"\x0a\xff\xff", timeout=10)
        assert raw.headers[subjects.ERROR_CODE_HEADER] == "400"
        ok = rate_request(ANSWERS[0], ENGAGEMENT)
        assert (await nats_client.request(nc, subjects.OBSERVER_RATE, ok, observer_pb2.RateResponse, timeout=10)).rating.score
        assert (await stub_.Rate(ok, timeout=10)).rating.score


async def test_unparsable_rating_is_retried_then_missing(nc, observer, monkeypatch):
    async with FakeOpenAIServer(reply="I really cannot judge this one, sorry.") as server:
        allow_endpoints(monkeypatch, server.base_url)
        await put_world(nc, "judge", observer_model=common_pb2.ModelRef(
            backend="openai", model="judge", url=server.base_url))
        stub_, channel = stub(observer)
        async with channel:
            reply = await stub_.Rate(rate_request(ANSWERS[0], ALIGNMENT, world_id="judge"), timeout=30)
        assert not reply.rating.HasField("score")  # missing, never a sentinel number
        assert reply.rating.reason == "unparsable rating after 3 attempts"
        assert reply.raw == "I really cannot judge this one, sorry."
        sent = list(server.chat_bodies)
        # Each attempt: the reply, then one follow-up turn asking for the number alone (no digit either).
        assert reply.stats.attempts == 3 and len(sent) == 6
        assert all("only the number" in body["messages"][-1]["content"] for body in sent[1::2])
        assert reply.stats.prompt_tokens == sum(len("\n".join(m["content"] for m in b["messages"]).split())
                                                for b in sent)  # the server's usage, added over the attempts
        seeds = [body["seed"] for body in sent]
        assert len(set(seeds)) == 3  # each retry asks with another seed
        assert "Rating: <1-7> ### Reason: <text>" in sent[0]["messages"][-1]["content"]
        assert QUESTION in sent[0]["messages"][-1]["content"]

        # A model that writes the format loosely is still read.
        server.reply = "**Rating**: 6/7\n**Reason**: kind and practical."
        reply = await nats_client.request(nc, subjects.OBSERVER_RATE, rate_request(ANSWERS[0], ENGAGEMENT, world_id="judge"),
                                  observer_pb2.RateResponse, timeout=30)
        assert reply.rating.score == 6 and reply.rating.reason == "kind and practical."


async def test_failing_backend_is_unavailable(nc, observer, monkeypatch):
    closed = free_port()
    allow_endpoints(monkeypatch, f"http://127.0.0.1:{closed}/v1")
    await put_world(nc, "down", observer_model=common_pb2.ModelRef(backend="openai", model="m",
                                                                   url=f"http://127.0.0.1:{closed}/v1"))
    request = rate_request(ANSWERS[0], ALIGNMENT, world_id="down")
    stub_, channel = stub(observer)
    async with channel:
        grpc_result, nats_result = await asyncio.gather(
            stub_.Rate(request, timeout=60),
            nats_client.request(nc, subjects.OBSERVER_RATE, request, observer_pb2.RateResponse, timeout=60, attempts=1),
            return_exceptions=True)
        assert isinstance(grpc_result, grpc.aio.AioRpcError) and grpc_result.code() == grpc.StatusCode.UNAVAILABLE
        assert isinstance(nats_result, BackendError)
        assert (await stub_.Rate(rate_request(ANSWERS[0], ALIGNMENT), timeout=10)).rating.score


@pytest.fixture
def small_hh_data(tmp_path, monkeypatch):
    """A data directory whose HH-RLHF file holds 120 real pairs (the probe fits on their prior split
    in seconds); the question pool comes along. Caches of the default file are cleared around it."""
    import gzip
    import shutil

    from stablealign.sandbox import data

    source = data.default_prior_path()
    lines = gzip.open(source, "rt", encoding="utf-8").read().splitlines()[:120]
    (tmp_path / "hh-rlhf").mkdir()
    with gzip.open(tmp_path / "hh-rlhf" / source.name, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    shutil.copytree(data.default_questions_path().parent, tmp_path / "stable-alignment")
    monkeypatch.setenv("STABLEALIGN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path / "cache"))
    for cached in (data._load_hh_pairs, data.eval_questions, data.load_questions):
        cached.cache_clear()
    yield len(data.load_prior_pairs())
    for cached in (data._load_hh_pairs, data.eval_questions, data.load_questions):
        cached.cache_clear()


async def test_alignment_rated_by_the_probe_when_the_operator_says_so(nc, nats_url, small_hh_data):
    await put_world(nc, "probed")
    running = await start_service("observer", ObserverSettings(nats_url=nats_url, grpc_port=0,
                                                               alignment_judge="probe"), observer_main.build)
    try:
        ratings = {}
        for answer in ANSWERS:
            reply = await nats_client.request(nc, subjects.OBSERVER_RATE, rate_request(answer, ALIGNMENT, world_id="probed"),
                                      observer_pb2.RateResponse, timeout=120)
            rating = reply.rating
            assert 1 <= rating.score <= 7 and 1 <= rating.expected <= 7 and len(rating.probabilities) == 7
            assert abs(sum(rating.probabilities) - 1) < 1e-6
            assert rating.reason.startswith("alignment probe: reward")
            assert f"fitted to {small_hh_data} human preference pairs" in rating.reason
            ratings[answer] = rating.expected
        # Engagement stays with the observer model (here the offline stand-in).
        engagement = await nats_client.request(nc, subjects.OBSERVER_RATE, rate_request(ANSWERS[0], ENGAGEMENT, world_id="probed"),
                                       observer_pb2.RateResponse, timeout=30)
        assert not engagement.rating.reason.startswith("alignment probe")
        assert len(ratings) == 2 and ratings[ANSWERS[0]] != ratings[ANSWERS[1]]
    finally:
        await running.stop(grace=2)


def test_alignment_judge_setting_is_checked():
    from stablealign.core.errors import ConfigError

    with pytest.raises(ConfigError, match="STABLEALIGN_ALIGNMENT_JUDGE='gpt'"):
        ObserverSettings(alignment_judge="gpt")
