"""No stalls, no wasted calls (issue 9): heartbeats, LLM deadlines, and `run` following its world.

- A request whose replica dies is sent again within the liveness period (seconds), not after the
  reply deadline; a live replica's heartbeats keep a slow request waiting without a re-send.
- Two agent replicas as processes, one killed with SIGKILL while its LLM call runs: the requester
  gets the draft from the other within ~liveness + the model's latency; the LLM servers count the calls.
- A hung LLM: each step answers 503 after the deadline of time without progress, naming the step, the
  model and its endpoint; one HTTP request per step, each abandoned by its client (cancelled), none
  started again.
- `stable-align run --nats URL` survives SIGKILL of the world service and its restart: exit 0 and
  exactly size² × rounds records in records.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time

import pytest

from stablealign.core.errors import UnavailableError
from stablealign.core.metrics import counter_value
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.nats.server import RequestServer
from stablealign.serving.service import close_process_backends
from stablealign.v1 import agent_pb2, common_pb2, observer_pb2, world_pb2
from tests.integration.test_agent_service import embed, put_world
from tests.integration.test_cli_sandbox import (
    CLI,
    _env,
    _records,
    _start_services,
    _stop,
    _stream_count,
    _wait_subscribers,
)
from tests.integration.test_world_service import start
from tests.support.devservers import FakeOpenAIServer
from tests.support.endpoints import allow_endpoints
from tests.support.handlers import SlowWorldGetter
from tests.support.streams import ensure_all_streams

RETRIES = "stablealign_bus_request_retries_total"


def _world(world_id: str) -> world_pb2.World:
    return world_pb2.World(spec=world_pb2.WorldSpec(world_id=world_id))


async def test_a_dead_replicas_request_is_sent_again_within_the_liveness_period(nats_url, nc):
    replica_a = await nats_client.connect(nats_url, name="replica-a")
    replica_b = await nats_client.connect(nats_url, name="replica-b")
    calls = {"a": 0, "b": 0}
    on_it = asyncio.Event()

    async def stuck(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        calls["a"] += 1
        on_it.set()
        await asyncio.sleep(60)  # the replica "dies" before it answers
        return _world(req.world_id)

    async def quick(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        calls["b"] += 1
        await asyncio.sleep(0.3)
        return _world(req.world_id)

    server_a = RequestServer(replica_a, service="t", queue="t")
    server_b = RequestServer(replica_b, service="t", queue="t")
    try:
        await server_a.add("t.work", world_pb2.GetWorldRequest, stuck, "Work")
        silent_before = counter_value(RETRIES, subject="t.work", reason="silent")
        pending = asyncio.create_task(nats_client.request(nc, "t.work", world_pb2.GetWorldRequest(world_id="w"),
                                                  world_pb2.World, timeout=120, liveness=1.0))
        await asyncio.wait_for(on_it.wait(), timeout=10)
        # While replica a lives, its heartbeats keep the request waiting: several liveness periods, no re-send.
        await asyncio.sleep(2.5)
        assert not pending.done() and calls == {"a": 1, "b": 0}
        assert counter_value(RETRIES, subject="t.work", reason="silent") == silent_before
        await server_b.add("t.work", world_pb2.GetWorldRequest, quick, "Work")
        killed = time.monotonic()
        await replica_a.close()  # gone: no heartbeats, no subscription
        reply = await asyncio.wait_for(pending, timeout=30)
        resent_after = time.monotonic() - killed
        assert reply.spec.world_id == "w"
        assert calls == {"a": 1, "b": 1}
        assert counter_value(RETRIES, subject="t.work", reason="silent") == silent_before + 1
        # liveness (1 s) + backoff + b's 0.3 s of work, far below the 120 s reply deadline
        assert resent_after < 5.0, resent_after
    finally:
        for task in list(server_a._inflight):
            task.cancel()
        await replica_b.close()
        if not replica_a.is_closed:
            await replica_a.close()


async def test_heartbeats_keep_a_slow_request_without_resends(nc):
    server = RequestServer(nc, service="t", queue="t")
    slow = SlowWorldGetter(2.0)
    await server.add("t.slow2", world_pb2.GetWorldRequest, slow, "Slow")
    before = counter_value(RETRIES, subject="t.slow2")
    reply = await nats_client.request(nc, "t.slow2", world_pb2.GetWorldRequest(world_id="s"), world_pb2.World,
                              timeout=30, liveness=0.4)
    assert reply.spec.world_id == "s" and slow.calls == 1
    assert counter_value(RETRIES, subject="t.slow2") == before
    # A responder that sends no heartbeats is still reached without them (liveness=None: plain request).
    assert (await nats_client.request(nc, "t.slow2", world_pb2.GetWorldRequest(world_id="p"), world_pb2.World,
                              timeout=30, liveness=None)).spec.world_id == "p"


async def test_following_a_world_gives_up_after_the_outage_budget(nc):
    """No world service at all: the follower keeps asking for ``outage_seconds``, then says so."""
    from services.world.client import WorldClient

    started = time.monotonic()
    with pytest.raises(UnavailableError, match="world gone: no world service answered for 2s"):
        await WorldClient(nc).wait_for_world("gone", timeout=60, outage_seconds=2.0)
    assert 2.0 <= time.monotonic() - started < 15.0


async def _wait_replicas(nc, service: str, count: int, timeout: float = 90.0) -> None:
    """Waits (bounded) until ``count`` replicas of ``service`` answer the NATS service API's PING."""
    deadline = time.monotonic() + timeout
    while True:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        ids = set()
        try:
            await nc.publish(f"$SRV.PING.stablealign-{service}", b"", reply=inbox)
            with contextlib.suppress(Exception):
                while True:
                    ids.add(json.loads((await sub.next_msg(timeout=0.5)).data)["id"])
        finally:
            await sub.unsubscribe()
        if len(ids) >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(ids)} of {count} {service} replicas up")
        await asyncio.sleep(0.2)


async def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
def test_killing_the_agent_replica_on_a_request_resends_it_in_seconds(nats_server):
    """SIGKILL of the replica whose LLM call is running: the draft comes from the other replica
    after about liveness + the model's latency, and each replica made exactly one LLM call."""
    latency, liveness = 2.0, 2.0

    async def scenario() -> None:
        async with FakeOpenAIServer(latency_seconds=latency) as llm_a, \
                FakeOpenAIServer(latency_seconds=latency) as llm_b:
            # Each replica reaches the model through its own server: the servers tell who did the work.
            procs = [*_start_services(nats_server.url, ["agent"], OPENAI_BASE_URL=llm_a.base_url,
                                      OPENAI_API_KEY="test"),
                     *_start_services(nats_server.url, ["agent"], OPENAI_BASE_URL=llm_b.base_url,
                                      OPENAI_API_KEY="test")]
            nc = await nats_client.connect(nats_server.url, name="test-replicas")
            try:
                await ensure_all_streams(nc.jetstream())
                await put_world(nc, "replicas", agent_model=common_pb2.ModelRef(backend="openai", model="fake-gpt"))
                await _wait_replicas(nc, "agent", 2)
                question = "How do I apologise to a friend?"
                request = agent_pb2.DraftRequest(world_id="replicas", agent_id=0, round=0, question=question,
                                                 question_embedding=(await embed([question]))[0])
                pending = asyncio.create_task(nats_client.request(nc, subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse,
                                                          timeout=120, liveness=liveness))
                await _wait_until(lambda: llm_a.in_flight + llm_b.in_flight >= 1, 30, "the LLM call")
                doomed, other = (0, llm_b) if llm_a.in_flight else (1, llm_a)
                procs[doomed].kill()
                killed = time.monotonic()

                async def resent() -> float:  # when the other replica's model sees the request
                    await _wait_until(lambda: other.requests_total >= 1, 60, "the re-sent request")
                    return time.monotonic() - killed

                resend = asyncio.create_task(resent())
                reply = await asyncio.wait_for(pending, timeout=60)
                resent_after = time.monotonic() - killed
                resend_seconds = await resend
                assert resend_seconds < liveness + 3.0, resend_seconds
                assert reply.answer
                dead = llm_a if other is llm_b else llm_b
                # The dead replica's one call, then one draft's calls on the other (the fake's first
                # answers echo the prompt and are asked again: stats.attempts), none of them twice.
                assert dead.requests_by_path["/v1/chat/completions"] == 1
                assert other.requests_by_path["/v1/chat/completions"] == reply.stats.attempts
                assert other.requests_total == reply.stats.attempts
                work = reply.stats.attempts * latency
                print(f"re-send after replica death: the other replica's model called {resend_seconds:.2f}s, the "
                      f"reply {resent_after:.2f}s after SIGKILL (liveness "
                      f"{liveness:g}s, {reply.stats.attempts} model calls of {latency:g}s on the other replica)")
                assert resent_after < liveness + work + 6.0, resent_after
            finally:
                await nc.close()
                _stop(procs)

    asyncio.run(scenario())


async def test_a_hung_llm_is_reported_within_the_deadline_naming_step_and_model(nats_url, nc, monkeypatch):
    # Imported here first: importing openai takes over a second, with this event loop (and its
    # heartbeats) blocked meanwhile — longer than the 1 s liveness below.
    import stablealign.llm.backends.openai_backend  # noqa: F401

    deadline = 2.0
    async with FakeOpenAIServer() as llm:
        llm.hang = True
        allow_endpoints(monkeypatch, llm.base_url)
        chat = common_pb2.ModelRef(backend="openai", model="fake-gpt", url=llm.base_url)
        world = await put_world(nc, "hung", agent_model=chat)
        kv = await nc.jetstream().key_value(subjects.WORLDS_BUCKET)
        world.spec.observer_model.CopyFrom(chat)
        await kv.put("hung", world.SerializeToString())
        services = [await start("agent", nats_url, llm_deadline_seconds=deadline),
                    await start("observer", nats_url, llm_deadline_seconds=deadline)]
        try:
            question = "Should I tell my friend the truth?"
            calls = {
                "draft": (subjects.AGENT_DRAFT, agent_pb2.DraftRequest(
                    world_id="hung", agent_id=0, round=0, question=question,
                    question_embedding=(await embed([question]))[0]), agent_pb2.DraftResponse),
                "feedback": (subjects.AGENT_FEEDBACK, agent_pb2.FeedbackRequest(
                    world_id="hung", agent_id=1, author_id=0, round=0, question=question, answer="Yes."),
                    agent_pb2.FeedbackResponse),
                "revise": (subjects.AGENT_REVISE, agent_pb2.ReviseRequest(
                    world_id="hung", agent_id=0, round=0, question=question, draft_answer="Yes."),
                    agent_pb2.ReviseResponse),
                "rate alignment before": (subjects.OBSERVER_RATE, observer_pb2.RateRequest(
                    world_id="hung", agent_id=0, round=0, question=question, answer="Yes.",
                    aspect=observer_pb2.RATING_ASPECT_ALIGNMENT, stage="before"), observer_pb2.RateResponse),
            }
            retries_before = counter_value(RETRIES)

            async def ask(subject, message, response_type) -> tuple[BaseException | None, float]:
                started = time.monotonic()
                try:
                    await nats_client.request(nc, subject, message, response_type, timeout=60, liveness=1.0)
                except Exception as exc:  # noqa: BLE001 - the error is what is checked
                    return exc, time.monotonic() - started
                return None, time.monotonic() - started

            results = await asyncio.gather(*(ask(*call) for call in calls.values()))
            for step, (error, seconds) in zip(calls, results):
                assert isinstance(error, UnavailableError), (step, error)
                assert str(error).startswith(f"{step}: ") and "openai:fake-gpt" in str(error), str(error)
                assert f"made no progress for {deadline:g}s" in str(error) and llm.base_url in str(error)
                print(f"hung LLM: {step} reported after {seconds:.2f}s (deadline {deadline:g}s)")
                # The backend's adaptive limit starts at 2 calls in flight and falls to 1 once calls hang: the
                # others waited for a place (not time without progress), then hung in their turn.
                assert deadline <= seconds < len(calls) * deadline + 3.0, (step, seconds)
            # One HTTP request per step, and the bus sent none of them again.
            assert llm.requests_by_path["/v1/chat/completions"] == len(calls), dict(llm.requests_by_path)
            assert counter_value(RETRIES) == retries_before
            # Every one of them cancelled: its client went away.
            await _wait_until(lambda: llm.hung_requests_abandoned == len(calls), 10, "the calls to be cancelled")
            await asyncio.sleep(1.0)
            assert llm.requests_total == len(calls)
        finally:
            for service in services:
                await service.stop(grace=1.0)
            await close_process_backends()


@pytest.mark.slow
def test_run_follows_the_world_through_a_world_service_restart(nats_server, tmp_path):
    """`run --nats` against separate services; the world service is SIGKILLed mid-world and started
    again (same instance name, so it resumes the world at once): `run` exits 0 with every record once."""
    size, rounds = 4, 3

    async def scenario() -> None:
        async with FakeOpenAIServer(latency_seconds=0.2) as llm:
            env = dict(OPENAI_BASE_URL=llm.base_url, OPENAI_API_KEY="test")
            workers = _start_services(nats_server.url, ["agent", "observer"], **env)
            world = _start_services(nats_server.url, ["world"], **env)
            replacement: list[subprocess.Popen] = []
            try:
                await _wait_subscribers(nats_server.url, [subjects.AGENT_DRAFT, subjects.OBSERVER_RATE, subjects.WORLD_GET])
                run = await asyncio.create_subprocess_exec(
                    *CLI, "run", "--size", str(size), "--rounds", str(rounds), "--backend", "openai",
                    "--model", "fake-gpt", "--embedding-model", "hashing", "--embedding-backend", "offline",
                    "--prior-size", "5", "--seed", "4", "--out", str(tmp_path), "--nats", nats_server.url,
                    "--world-id", "restarted", env=_env(**env), stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE)
                deadline = time.monotonic() + 120
                while await _stream_count(nats_server.url, "restarted") < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                published = await _stream_count(nats_server.url, "restarted")
                assert 3 <= published < size * size * rounds, "the kill must hit the world mid-run"
                world[0].kill()
                world[0].wait(timeout=30)
                await asyncio.sleep(4.0)  # no world service at all for a while: `run` must keep following
                assert run.returncode is None, "run exited while the world service was away"
                replacement.extend(_start_services(nats_server.url, ["world"], **env))
                restarted = time.monotonic()
                _, err = await asyncio.wait_for(run.communicate(), timeout=240)
                print(f"run: killed at {published} records, world service away 4 s, exit "
                      f"{run.returncode} {time.monotonic() - restarted:.1f}s after the restart")
                assert run.returncode == 0, err.decode()[-4000:]
                # It noticed the outage: polls that found no world service ("world.unreachable"), or, when the
                # kill caught a poll in flight, that poll's re-send once its deadline passed.
                said = err.decode()
                assert "world.unreachable" in said or f"subject={subjects.WORLD_GET} reason=timeout" in said, said[-2000:]
                assert await _stream_count(nats_server.url, "restarted") == size * size * rounds
            finally:
                _stop([*workers, *world, *replacement])

    asyncio.run(scenario())
    rows = _records(tmp_path / "records.jsonl")
    assert len(rows) == size * size * rounds
    assert len({(r["iteration"], r["agent_id"]) for r in rows}) == size * size * rounds
