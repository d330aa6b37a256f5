"""NATS going away mid-world: the services reconnect and the world finishes with every record once.

The nats-server is stopped and started again (same port, same JetStream store) while a world is
running; requests that fail meanwhile are retried, interactions that fail are redone (their
memory appends and records carry message ids), so the stream ends with exactly size² × rounds
records, one per (round, agent).
"""

from __future__ import annotations

import asyncio
import time

from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.serving.service import close_process_backends
from stablealign.v1 import common_pb2, world_pb2
from tests.integration.test_world_service import start, stream_records, wait_final
from tests.support.devservers import FakeOpenAIServer


async def test_world_survives_a_nats_restart(nats_server, monkeypatch):
    async with FakeOpenAIServer(latency_seconds=0.05) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        url = nats_server.url
        services = [await start("agent", url), await start("observer", url),
                    await start("world", url, request_timeout_seconds=2.0)]
        nc = await nats_client.connect(url, name="test-outage")
        try:
            chat = common_pb2.ModelRef(backend="openai", model="fake-gpt")
            spec = world_pb2.WorldSpec(world_id="outage", size=4, rounds=4, seed=2, setting="half_half",
                                       prior_size=5, agent_model=chat, observer_model=chat,
                                       embedding_model=common_pb2.ModelRef(backend="offline", model="hashing"))
            await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec), world_pb2.World,
                              timeout=30)
            deadline = time.monotonic() + 30
            while fake.requests_total < 60 and time.monotonic() < deadline:  # well into round 0
                await asyncio.sleep(0.02)
            assert fake.requests_total < 64 * 11 // 2, "the outage must hit the world mid-run"
            await asyncio.to_thread(nats_server.stop_keep_store)
            await asyncio.sleep(1.5)
            await asyncio.to_thread(nats_server.start)
            world = await wait_final(nc, "outage", timeout=120)
            assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
            records = await stream_records(nc, "outage")
            assert len(records) == 4 * 4 * 4
            assert len({(r.round, r.agent_id) for r in records}) == 64
            assert world.records_published == 64
        finally:
            await nc.close()
            for service in reversed(services):
                await service.stop(grace=2.0)
            await close_process_backends()
