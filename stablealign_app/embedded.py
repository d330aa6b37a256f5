"""Client-side orchestration of a SANDBOX run: used by `stable-align run`, the pipeline and benchmarks.

Without a NATS URL it brings up an embedded stack — a nats-server child process plus the agent,
observer and world services inside this event loop — so one command runs a whole society. With
a URL it only talks to services that are already running; either way the world is created and
followed through the same NATS API, and the records are read back from the SANDBOX_RECORDS
stream, so both paths write the same ``records.jsonl``.
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS

from stablealign import bus
from stablealign.config import load_settings
from stablealign.errors import ConflictError, UnavailableError
from stablealign.natsserver import EmbeddedNatsServer
from stablealign.records import read_world_records, record_to_json, write_jsonl
from stablealign.service import RunningService, close_process_backends, start_service
from stablealign.v1 import common_pb2, world_pb2
from stablealign.worlds import FINAL_STATES

SANDBOX_SERVICES = ("agent", "observer", "world")


@dataclass
class EmbeddedStack:
    """nats-server + the SANDBOX services in this process; ``async with`` starts and stops it all."""

    services: tuple[str, ...] = SANDBOX_SERVICES
    server: EmbeddedNatsServer = field(default_factory=EmbeddedNatsServer)
    running: list[RunningService] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> EmbeddedStack:
        await asyncio.to_thread(self.server.start)
        try:
            for name in self.services:
                module = importlib.import_module(f"services.{name}.main")
                settings = load_settings(module.SETTINGS, {"nats_url": self.url, "grpc_port": -1, "metrics_port": -1,
                                                           "instance": f"embedded-{name}"})
                self.running.append(await start_service(name, settings, module.build))
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for service in reversed(self.running):
            await service.stop(grace=5.0)
        if self.running:
            await close_process_backends()
        self.running.clear()
        await asyncio.to_thread(self.server.stop)

    async def __aenter__(self) -> EmbeddedStack:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def create_world(nc: NATS, spec: world_pb2.WorldSpec, timeout: float = 120.0) -> world_pb2.World:
    """Creates a world; safe to retry: the id is chosen here, so a request that timed out but was
    served makes the retry find the same world instead of starting a second one."""
    spec_with_id = world_pb2.WorldSpec()
    spec_with_id.CopyFrom(spec)
    if not spec_with_id.world_id:
        spec_with_id.world_id = f"w-{secrets.token_hex(6)}"
    request = world_pb2.CreateWorldRequest(spec=spec_with_id)
    for attempt in range(1, 4):
        try:
            return await bus.request(nc, bus.WORLD_CREATE, request, world_pb2.World, timeout=timeout, attempts=1)
        except UnavailableError:
            if attempt == 3:
                raise
        except ConflictError:
            if attempt == 1:
                raise  # the id was taken before we asked: a real conflict
            return await get_world(nc, spec_with_id.world_id)  # our own earlier attempt created it
    raise AssertionError("unreachable")


async def get_world(nc: NATS, world_id: str, timeout: float = 10.0) -> world_pb2.World:
    return await bus.request(nc, bus.WORLD_GET, world_pb2.GetWorldRequest(world_id=world_id), world_pb2.World,
                             timeout=timeout)


async def list_worlds(nc: NATS, timeout: float = 10.0) -> list[world_pb2.World]:
    reply = await bus.request(nc, bus.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                              timeout=timeout)
    return list(reply.worlds)


async def wait_for_world(nc: NATS, world_id: str, *, timeout: float,
                         on_progress: Callable[[world_pb2.World], None] | None = None,
                         poll_seconds: float = 0.25) -> world_pb2.World:
    """Polls the world until it reaches a final state; raises UnavailableError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        world = await get_world(nc, world_id)
        if on_progress:
            on_progress(world)
        if world.state in FINAL_STATES:
            return world
        if time.monotonic() > deadline:
            raise UnavailableError(f"world {world_id} did not finish within {timeout:.0f}s "
                                   f"({world.records_published} records so far)")
        await asyncio.sleep(poll_seconds)


async def fetch_records(nc: NATS, world_id: str) -> list[common_pb2.InteractionRecord]:
    """All records of a world from the stream, ordered by (round, agent) whatever the publish order."""
    return await read_world_records(nc.jetstream(timeout=10.0), world_id)


async def export_records(nc: NATS, world_id: str, path: str | Path) -> int:
    return write_jsonl((record_to_json(r) for r in await fetch_records(nc, world_id)), path)
