"""A world survives its dependencies, and a FAILED or CANCELLED world can be resumed.

Real nats-server, agent/observer/world services in this process (``start_service``), records
counted in SANDBOX_RECORDS:

- the only observer replica stops mid-world and starts again seconds later: the world waits
  (within its absent budget, visible in ``World.waiting``) and completes with size² × rounds records;
- an OpenAI-protocol server failing 60 % of calls with 500/429 for the whole world: it completes;
- a world failed by a tiny budget (observer gone), or cancelled, resumes over NATS, gRPC and
  `stable-align worlds resume`, and ends with exactly size² × rounds records, none duplicated;
  a COMPLETED world cannot be resumed (409 / FAILED_PRECONDITION), an unknown one is 404.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time

import grpc
import pytest

from stablealign.core.errors import ConflictError, NotFoundError
from stablealign.llm.backends.base import RetryPolicy
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc
from tests.integration.test_world_service import small_spec, start, stream_records, wait_final
from tests.support.devservers import FakeOpenAIServer
from tests.support.endpoints import allow_endpoints

pytestmark = pytest.mark.timeout(180)

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]


async def create(nc, spec: world_pb2.WorldSpec) -> world_pb2.World:
    return await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec), world_pb2.World,
                             timeout=10)


async def get(nc, world_id: str) -> world_pb2.World:
    return await nats_client.request(nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id=world_id), world_pb2.World,
                             timeout=5)


async def resume(nc, world_id: str) -> world_pb2.World:
    return await nats_client.request(nc, subjects.WORLD_RESUME, world_pb2.ResumeWorldRequest(world_id=world_id),
                             world_pb2.World, timeout=30)


async def wait_records(nc, world_id: str, at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await stream_records(nc, world_id)) < at_least:
        assert time.monotonic() < deadline, f"{world_id}: fewer than {at_least} records after {timeout}s"
        await asyncio.sleep(0.02)


async def assert_exact(nc, world_id: str, size: int, rounds: int) -> None:
    """size² × rounds records, each (round, agent) once; each agent's memory: prior + one revision per round."""
    records = await stream_records(nc, world_id)
    pairs = [(r.round, r.agent_id) for r in records]
    assert len(records) == size * size * rounds, len(records)
    assert set(pairs) == {(r, a) for r in range(rounds) for a in range(size * size)}
    js = nc.jetstream()
    for agent in (0, size * size - 1):
        memory = await nats_client.read_subject(js, subjects.MEMORY_STREAM,
                                        subjects.MEMORY_SUBJECT.format(world_id=world_id, agent_id=agent))
        assert len(memory) == 1 + rounds


async def stop_when(nc, world_id: str, records: int, service) -> int:
    """Stops ``service`` once the world has ``records`` records; returns how many it had then."""
    await wait_records(nc, world_id, records)
    await service.stop(grace=1.0)
    return len(await stream_records(nc, world_id))


async def test_a_world_waits_for_its_only_observer_to_come_back(nats_url, nc):
    from prometheus_client import REGISTRY

    def waits() -> float:
        # Whichever rating step the interactions in flight had reached when the observer went away.
        return sum(REGISTRY.get_sample_value("stablealign_world_failure_waits_total",
                                             {"step": step, "kind": "absent"}) or 0.0
                   for step in ("rate_before", "rate_after"))

    before = waits()
    agent = await start("agent", nats_url)
    observer = await start("observer", nats_url)
    world_service = await start("world", nats_url, absent_budget_seconds=60.0, progress_seconds=0.2)
    try:
        await create(nc, small_spec("observer-restart", size=4, rounds=2, concurrency=2))
        at_stop = await stop_when(nc, "observer-restart", 3, observer)
        assert at_stop < 32, "the world finished before its observer could be stopped"
        # Gone for a few seconds: the world keeps RUNNING and says what it waits for (a request the
        # stopping replica dropped is noticed after subjects.LIVENESS_SECONDS of silence).
        deadline = time.monotonic() + subjects.LIVENESS_SECONDS + 20
        while "sandbox.observer.rate" not in (world := await get(nc, "observer-restart")).waiting:
            assert time.monotonic() < deadline, world
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)
        world = await get(nc, "observer-restart")
        assert world.state == world_pb2.WORLD_STATE_RUNNING, world.error
        assert "absent" in world.waiting and world.error == ""
        assert len(await stream_records(nc, "observer-restart")) <= at_stop + 2  # nothing rated meanwhile
        observer = await start("observer", nats_url)  # back, 3+ s later
        world = await wait_final(nc, "observer-restart", timeout=60)
        assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
        assert world.records_published == 32 and world.completed_rounds == 2
        assert world.waiting == "" and world.interaction_retries > 0
        await assert_exact(nc, "observer-restart", 4, 2)
        assert waits() > before
    finally:
        for service in (world_service, observer, agent):
            await service.stop(grace=1.0)


async def test_a_world_completes_while_its_llm_fails_60_percent_of_calls(nats_url, nc, monkeypatch):
    # The backend's own retries as deployed (5 attempts: 7.8 % of calls still fail, and so about half of
    # the interaction tries), with waits of milliseconds instead of seconds to keep the test short.
    from stablealign.llm.backends import openai_backend

    fast = functools.partial(RetryPolicy, attempts=5, base_delay=0.01, max_delay=0.05)
    monkeypatch.setattr(openai_backend, "RetryPolicy", fast)
    async with FakeOpenAIServer(error_rate=0.6, error_statuses=(500, 429), error_seed=7) as llm:
        allow_endpoints(monkeypatch, llm.base_url)
        model = common_pb2.ModelRef(backend="openai", model="fake-gpt", url=llm.base_url)
        agent = await start("agent", nats_url)
        observer = await start("observer", nats_url)
        world_service = await start("world", nats_url, error_budget_consecutive=50, failure_backoff_max_seconds=0.5)
        try:
            spec = small_spec("flaky-llm", size=3, rounds=2, agent_model=model, observer_model=model)
            await create(nc, spec)
            world = await wait_final(nc, "flaky-llm", timeout=150)
            assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
            await assert_exact(nc, "flaky-llm", 3, 2)
            assert world.interaction_retries > 0  # some interactions failed after the backend's retries
        finally:
            for service in (world_service, observer, agent):
                await service.stop(grace=1.0)
            from stablealign.llm.backends import close_backends

            await close_backends()  # the services in this loop shared one openai client
    statuses = [status for _, _, status in llm.request_log]
    failed = sum(s != 200 for s in statuses)
    assert {500, 429} <= set(statuses) and 0.45 <= failed / len(statuses) <= 0.75, (failed, len(statuses))


async def test_a_failed_world_resumes_over_nats_and_grpc(nats_url, nc):
    agent = await start("agent", nats_url)
    observer = await start("observer", nats_url)
    # A tiny budget: the observer's absence fails the world within a second or so.
    world_service = await start("world", nats_url, grpc_port=0, absent_budget_seconds=0.5, interaction_attempts=1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{world_service.grpc_port}")
    stub = world_pb2_grpc.WorldServiceStub(channel)
    try:
        await create(nc, small_spec("fails-then-resumes", size=3, rounds=2, concurrency=1))
        at_stop = await stop_when(nc, "fails-then-resumes", 3, observer)
        world = await wait_final(nc, "fails-then-resumes", timeout=30)
        assert world.state == world_pb2.WORLD_STATE_FAILED
        assert "sandbox.observer.rate" in world.error and "absent budget 0.5s" in world.error, world.error
        assert at_stop <= len(await stream_records(nc, "fails-then-resumes")) < 18

        observer = await start("observer", nats_url)
        resumed = await resume(nc, "fails-then-resumes")
        assert resumed.state == world_pb2.WORLD_STATE_RUNNING and resumed.error == ""
        again = await stub.ResumeWorld(world_pb2.ResumeWorldRequest(world_id="fails-then-resumes"), timeout=10)
        assert again.state in (world_pb2.WORLD_STATE_RUNNING, world_pb2.WORLD_STATE_COMPLETED)  # as it is
        world = await wait_final(nc, "fails-then-resumes", timeout=60)
        assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
        assert world.records_published == 18 and [s.round for s in world.rounds] == [0, 1]
        await assert_exact(nc, "fails-then-resumes", 3, 2)

        # A COMPLETED world cannot be resumed; an unknown one does not exist.
        with pytest.raises(ConflictError, match="COMPLETED"):
            await resume(nc, "fails-then-resumes")
        with pytest.raises(NotFoundError):
            await resume(nc, "nobody-here")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ResumeWorld(world_pb2.ResumeWorldRequest(world_id="fails-then-resumes"), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ResumeWorld(world_pb2.ResumeWorldRequest(world_id="nobody-here"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        for service in (world_service, observer, agent):
            await service.stop(grace=1.0)


async def cli(*args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """`stable-align ARGS` in a child process; the services keep running in this event loop meanwhile."""
    env = {**os.environ, "STABLEALIGN_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def test_a_cancelled_world_resumes_from_the_command_line(nats_url, nc):
    agent = await start("agent", nats_url)
    observer = await start("observer", nats_url)
    world_service = await start("world", nats_url)
    try:
        await create(nc, small_spec("cancel-then-resume", size=3, rounds=2, concurrency=1))
        for at_least in (3, 6):
            await wait_records(nc, "cancel-then-resume", at_least)
            cancelled = await nats_client.request(nc, subjects.WORLD_CANCEL,
                                          world_pb2.CancelWorldRequest(world_id="cancel-then-resume"),
                                          world_pb2.World, timeout=5)
            assert cancelled.state == world_pb2.WORLD_STATE_CANCELLED
            if at_least == 3:
                # Over NATS at once: the service lets the cancelled runner finish its in-flight interaction first.
                resumed = await resume(nc, "cancel-then-resume")
                assert resumed.state == world_pb2.WORLD_STATE_RUNNING
        # Then from the command line, following it to the end.
        code, out, err = await cli("worlds", "resume", "cancel-then-resume", "--nats", nats_url, "--wait",
                                   "--timeout", "60")
        assert code == 0, f"exit {code}\n{out}\n{err}"
        assert "cancel-then-resume: RUNNING" in out and "cancel-then-resume: COMPLETED (18 records)" in out, out
        world = await get(nc, "cancel-then-resume")
        assert world.state == world_pb2.WORLD_STATE_COMPLETED and world.records_published == 18
        await assert_exact(nc, "cancel-then-resume", 3, 2)
        # Again: the world is COMPLETED now, a one-line error and exit 1.
        code, out, err = await cli("worlds", "resume", "cancel-then-resume", "--nats", nats_url)
        assert code == 1 and err.strip().splitlines()[-1].startswith("error: ") and "COMPLETED" in err, err
    finally:
        for service in (world_service, observer, agent):
            await service.stop(grace=1.0)
