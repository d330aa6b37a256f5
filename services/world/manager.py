"""The world service's operations (create, get, list, cancel, resume) and its leadership of worlds.

Both transports (NATS handlers in main.py, gRPC in grpc_api.py) call this one object. It keeps
the runners of the worlds this replica leads and, in the background, takes over every
unfinished world that nobody leads: its own after a restart (same instance name) and any
other replica's whose heartbeat is older than the lease.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.world.limits import BASE_BYTES, MB, estimate_world_bytes
from services.world.scheduler import WorldRunner
from services.world.settings import WorldSettings
from services.world.spec import resolve_spec
from services.world.store import ACTIVE_STATES, WorldStore
from stablealign.core.errors import ConflictError, UnavailableError
from stablealign.core.logs import get_logger
from stablealign.v1 import world_pb2

log = get_logger(__name__)

RESUMABLE_STATES = (world_pb2.WORLD_STATE_FAILED, world_pb2.WORLD_STATE_CANCELLED)
# How long ResumeWorld waits for this replica's runner of a just cancelled world to finish its in-flight work.
RESUME_WAIT_SECONDS = 10.0


class _NotResumable(Exception):
    """Raised inside a KV mutation to leave the world as it is (someone else resumed or finished it)."""


class WorldManager:
    def __init__(self, nc: NATS, js: JetStreamContext, settings: WorldSettings) -> None:
        self.nc, self.js, self.settings = nc, js, settings
        self.store = WorldStore(js)
        self.owner = settings.owner
        self.runners: dict[str, WorldRunner] = {}
        self._closed = False

    # --- operations ---------------------------------------------------------------------------

    async def create(self, spec: world_pb2.WorldSpec) -> world_pb2.World:
        """Validates and resolves the spec, stores the world PENDING and starts it; returns at once."""
        resolved = await asyncio.to_thread(resolve_spec, spec, self.settings)
        self.check_room(resolved)
        now = time.time()
        world = world_pb2.World(
            spec=resolved,
            state=world_pb2.WORLD_STATE_PENDING,
            created_at=now,
            updated_at=now,
            owner=self.owner,
        )
        await self.store.create(world)
        log.info(
            "world.created",
            extra={
                "world_id": resolved.world_id,
                "size": resolved.size,
                "rounds": resolved.rounds,
                "setting": resolved.setting,
                "agent_backend": resolved.agent_model.backend,
            },
        )
        self._start(world)
        return world

    async def get(self, world_id: str) -> world_pb2.World:
        world, _ = await self.store.get(world_id)
        return world

    async def list(self) -> list[world_pb2.World]:
        return await self.store.list()

    async def cancel(self, world_id: str) -> world_pb2.World:
        """Stops scheduling a world (in-flight interactions finish); a finished world is returned as is."""
        runner = self.runners.get(world_id)
        if runner:
            runner.cancel()

        def cancelled(world: world_pb2.World) -> None:
            if world.state in ACTIVE_STATES:
                world.state = world_pb2.WORLD_STATE_CANCELLED

        world, _ = await self.store.get(world_id)
        if world.state not in ACTIVE_STATES:
            return world
        world = await self.store.update(world_id, cancelled)
        log.info("world.cancel_requested", extra={"world_id": world_id, "local": runner is not None})
        return world

    async def resume(self, world_id: str) -> world_pb2.World:
        """Runs a FAILED or CANCELLED world again, here, from the records it has; returns it RUNNING
        (PENDING when its prior was never seeded). A world that runs already is returned as it is;
        ConflictError for a COMPLETED world, NotFoundError for an unknown one.

        The runner reads which (round, agent) pairs the records stream holds and runs only the rest;
        records and memories carry message ids, so nothing is duplicated. A runner of the world that
        another replica still winds down loses its lease at its next write and stops.
        """
        world, _ = await self.store.get(world_id)  # NotFoundError -> 404
        if world.state == world_pb2.WORLD_STATE_COMPLETED:
            raise ConflictError(f"world {world_id} is COMPLETED; only a FAILED or CANCELLED world can be resumed")
        if world.state in ACTIVE_STATES:
            return world
        previous = self.runners.get(world_id)
        if previous is not None and previous.task is not None and not previous.task.done():
            # Cancelled a moment ago: this replica's runner still finishes its in-flight interactions.
            await asyncio.wait({previous.task}, timeout=RESUME_WAIT_SECONDS)
            if not previous.task.done():
                raise ConflictError(f"world {world_id} is still finishing its in-flight interactions; try again")
        if self._closed:
            raise ConflictError(f"world service {self.owner} is shutting down; try another replica")
        self.check_room(world.spec)

        def reopen(w: world_pb2.World) -> None:
            if w.state not in RESUMABLE_STATES:
                raise _NotResumable(world_pb2.WorldState.Name(w.state))
            w.state = world_pb2.WORLD_STATE_RUNNING if w.setup_seconds > 0 else world_pb2.WORLD_STATE_PENDING
            w.error = ""
            w.waiting = ""
            w.owner = self.owner

        try:
            world = await self.store.update(world_id, reopen)
        except _NotResumable:  # resumed by another replica, or it raced to completion: report it as it is
            world, _ = await self.store.get(world_id)
            if world.state == world_pb2.WORLD_STATE_COMPLETED:
                raise ConflictError(f"world {world_id} is COMPLETED; nothing to resume") from None
            return world
        log.info(
            "world.resumed",
            extra={
                "world_id": world_id,
                "owner": self.owner,
                "completed_rounds": world.completed_rounds,
                "records_published": world.records_published,
                "state": world_pb2.WorldState.Name(world.state),
            },
        )
        self._start(world)
        return world

    # --- leadership ---------------------------------------------------------------------------

    def check_room(self, spec: world_pb2.WorldSpec) -> None:
        """UnavailableError (503) when this replica runs ``max_running_worlds`` worlds already, or when the
        memory estimates of the worlds it runs and of ``spec`` together exceed ``max_world_memory_mb`` (the
        processes' base counted once): a burst of CreateWorld calls cannot grow the pod past its limit."""
        running = [r.spec for r in self.runners.values() if r.world_id != spec.world_id]
        bound = self.settings.max_running_worlds
        if bound and len(running) >= bound:
            raise UnavailableError(f"world service {self.owner} runs {len(running)} worlds, the limit "
                                   f"max_running_worlds = {bound}; try again later")
        limit_mb = self.settings.max_world_memory_mb
        if limit_mb and running:
            # The pool term (a few MB) is left out: prior_pairs=0.
            used = sum(estimate_world_bytes(s, 0) - BASE_BYTES for s in running)
            needed = estimate_world_bytes(spec, 0)
            if used + needed > limit_mb * MB:
                raise UnavailableError(
                    f"world service {self.owner} runs {len(running)} worlds estimated at {used / MB:,.0f} MB; with "
                    f"this one ({needed / MB:,.0f} MB) that exceeds max_world_memory_mb = {limit_mb:,.0f} MB; "
                    f"try again later")

    def _start(self, world: world_pb2.World) -> WorldRunner:
        world_id = world.spec.world_id
        runner = WorldRunner(world, nc=self.nc, js=self.js, store=self.store, settings=self.settings)
        self.runners[world_id] = runner
        task = runner.start()

        def forget(_task: asyncio.Task) -> None:
            if self.runners.get(world_id) is runner:
                del self.runners[world_id]

        task.add_done_callback(forget)
        return runner

    async def resume_once(self) -> list[str]:
        """Takes over every unfinished world that is ours or orphaned; returns their ids."""
        resumed = []
        for world in await self.store.list():
            world_id = world.spec.world_id
            if self._closed or world.state not in ACTIVE_STATES or world_id in self.runners:
                continue
            try:
                self.check_room(world.spec)
            except UnavailableError:
                continue  # full here: another replica takes it over, or this one on a later pass
            acquired = await self.store.try_acquire(world_id, self.owner, self.settings.lease_seconds)
            if acquired is None or world_id in self.runners or self._closed:
                continue
            log.info(
                "world.resuming",
                extra={
                    "world_id": world_id,
                    "owner": self.owner,
                    "completed_rounds": acquired.completed_rounds,
                    "state": world_pb2.WorldState.Name(acquired.state),
                },
            )
            self._start(acquired)
            resumed.append(world_id)
        return resumed

    async def resume_forever(self) -> None:
        """Background task: resume at start, then look for orphaned worlds every resume interval."""
        while not self._closed:
            try:
                await self.resume_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS hiccup: look again next time
                log.warning("world.resume_scan_failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.settings.resume_interval)

    async def shutdown(self, grace: float) -> None:
        """Stops every runner: in-flight interactions get ``grace`` seconds, then leases are released."""
        self._closed = True
        runners = list(self.runners.values())
        if runners:
            log.info("world.shutdown", extra={"worlds": len(runners), "grace_s": grace})
            await asyncio.gather(*(r.shutdown(grace) for r in runners), return_exceptions=True)
