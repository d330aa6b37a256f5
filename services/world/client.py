"""Talking to running world services over NATS: what `stable-align run|worlds|watch|export`, `data build
--nats`, the embedded stack's runs and the benchmarks use.

Create, get, list, cancel and resume are protobuf request/reply on ``sandbox.world.*`` (any world
replica answers; typed errors come back as ``stablealign.core.errors``). ``wait_for_world`` follows a world
by polling GetWorld until it ends, through an outage of the world service. Records are read straight
from the SANDBOX_RECORDS stream through the library's trust rule (``stablealign.sandbox.record_stream``): the
reader there knows nothing of the world service, so the bounds it checks agent ids and rounds
against (the world's size and rounds) are looked up here and handed to it.

The library may not import a service (import-linter's layers contract), which is why this client
lives beside the world service, as ``services/trainer/client.py`` does beside the trainer, and why
the record reader takes the world's bounds from its caller instead of asking the world itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS

from services.world.store import parse_world
from stablealign.core.errors import ConflictError, UnavailableError
from stablealign.core.logs import get_logger
from stablealign.core.retry import Failure, RetryPolicy, retry_async
from stablealign.nats import client as nats_client
from stablealign.nats import direct, subjects
from stablealign.nats.auth import NatsClientOptions
from stablealign.sandbox import record_stream
from stablealign.sandbox.worlds import FINAL_STATES
from stablealign.v1 import common_pb2, world_pb2

log = get_logger(__name__)

# CreateWorld seeds every agent's prior memories before it answers: a large world needs a while.
CREATE_TIMEOUT_SECONDS = 120.0
# The service may wait a few seconds for a just-cancelled runner to finish its in-flight interactions.
RESUME_TIMEOUT_SECONDS = 30.0
# How long ``wait_for_world`` keeps asking while no world service answers (a restart, a replica being
# replaced) before it gives up on the world.
WORLD_OUTAGE_SECONDS = 600.0
# How long ``world_bounds`` waits for a world service before it reads the world's bucket itself.
BOUNDS_TIMEOUT_SECONDS = 5.0
# JetStream API calls of the record readers.
RECORDS_API_TIMEOUT_SECONDS = 10.0


@contextlib.asynccontextmanager
async def connected(nats_url: str, *, name: str = "stablealign-cli", options: NatsClientOptions | None = None,
                    connect_timeout: float = nats_client.CLIENT_GIVE_UP_SECONDS) -> AsyncIterator[NATS]:
    """A connection for one command: an unreachable server is one UnavailableError within
    ``connect_timeout`` seconds, not a hang. ``options``: the client's credentials (None: the command's)."""
    nc = await nats_client.connect(nats_url, name=name, give_up_after=connect_timeout, options=options)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class WorldClient:
    """The world service's NATS API and its records stream, on an existing connection."""

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout

    # --- requests ----------------------------------------------------------------------------

    async def create_world(self, spec: world_pb2.WorldSpec,
                           timeout: float = CREATE_TIMEOUT_SECONDS) -> world_pb2.World:
        """Creates a world; safe to retry: the id is chosen here, so a request that timed out but was
        served makes the retry find the same world instead of starting a second one."""
        spec_with_id = world_pb2.WorldSpec()
        spec_with_id.CopyFrom(spec)
        if not spec_with_id.world_id:
            spec_with_id.world_id = f"w-{secrets.token_hex(6)}"
        request = world_pb2.CreateWorldRequest(spec=spec_with_id)

        async def create(attempt: int) -> world_pb2.World | None:
            try:
                return await nats_client.request(self.nc, subjects.WORLD_CREATE, request, world_pb2.World, timeout=timeout,
                                         attempts=1)
            except ConflictError:
                if attempt == 1:
                    raise  # the id was taken before we asked: a real conflict
                return None  # our own earlier attempt created it

        # Three tries, one after the other; only "unavailable" (no reply) is tried again.
        policy = RetryPolicy(attempts=3, base_delay=0.0, timeout=None, jitter="none")
        world = await retry_async(create, policy, retryable=lambda exc: isinstance(exc, UnavailableError))
        return world if world is not None else await self.get_world(spec_with_id.world_id)

    async def get_world(self, world_id: str) -> world_pb2.World:
        return await nats_client.request(self.nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id=world_id),
                                 world_pb2.World, timeout=self.timeout)

    async def list_worlds(self) -> list[world_pb2.World]:
        reply = await nats_client.request(self.nc, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(),
                                  world_pb2.ListWorldsResponse, timeout=self.timeout)
        return list(reply.worlds)

    async def cancel_world(self, world_id: str) -> world_pb2.World:
        """Stops scheduling the world (in-flight interactions finish); a finished world comes back as is."""
        return await nats_client.request(self.nc, subjects.WORLD_CANCEL, world_pb2.CancelWorldRequest(world_id=world_id),
                                 world_pb2.World, timeout=self.timeout)

    async def resume_world(self, world_id: str, timeout: float = RESUME_TIMEOUT_SECONDS) -> world_pb2.World:
        """Runs a FAILED or CANCELLED world again from the records it has (NotFoundError for an unknown
        world, ConflictError for a COMPLETED one); returns it RUNNING."""
        return await nats_client.request(self.nc, subjects.WORLD_RESUME, world_pb2.ResumeWorldRequest(world_id=world_id),
                                 world_pb2.World, timeout=timeout)

    async def wait_for_world(self, world_id: str, *, timeout: float,
                             on_progress: Callable[[world_pb2.World], None] | None = None,
                             poll_seconds: float = 0.1,
                             outage_seconds: float = WORLD_OUTAGE_SECONDS) -> world_pb2.World:
        """Polls the world until it reaches a final state; raises UnavailableError after ``timeout``.

        Every ``poll_seconds`` (a GetWorld request, one KV read at the world service): a small world is
        done in seconds, and a coarser poll added its whole period to the command's wall time.

        It follows the world, not the process it first talked to: the world's state lives in the
        SANDBOX_WORLDS bucket and a world service that starts resumes it, so while none answers
        (UnavailableError: no responders, timeouts) the poll is retried, through ``retry.py``, for up to
        ``outage_seconds`` in a row. Only a final state, ``timeout`` or such an outage ends the wait.
        """
        deadline = time.monotonic() + timeout
        while True:
            world = await self._get_through_outages(world_id, min(outage_seconds, deadline - time.monotonic()))
            if on_progress:
                on_progress(world)
            if world.state in FINAL_STATES:
                return world
            if time.monotonic() > deadline:
                raise UnavailableError(f"world {world_id} did not finish within {timeout:.0f}s "
                                       f"({world.records_published} records so far)")
            await asyncio.sleep(poll_seconds)

    async def _get_through_outages(self, world_id: str, budget: float) -> world_pb2.World:
        """``get_world``, asked again while no world service answers, for at most ``budget`` seconds."""
        give_up_at = time.monotonic() + max(budget, 0.0)
        failures: list[Failure] = []

        def on_failure(failure: Failure) -> None:
            if not failures:
                log.warning("world.unreachable", extra={"world_id": world_id, "error": str(failure.error),
                                                        "budget_s": round(budget, 1)})
            failures.append(failure)

        # Waits 0.5, 1, 2, 2... s (full jitter) between polls; the budget, not a count, ends it.
        policy = RetryPolicy(attempts=1_000_000, base_delay=0.5, max_delay=2.0, timeout=None, jitter="full")
        try:
            world = await retry_async(
                lambda _attempt: self.get_world(world_id), policy, on_failure=on_failure,
                retryable=lambda exc: isinstance(exc, UnavailableError) and time.monotonic() < give_up_at)
        except UnavailableError as exc:
            raise UnavailableError(f"world {world_id}: no world service answered for {budget:.0f}s ({exc})") from exc
        if failures:
            log.info("world.reachable_again", extra={"world_id": world_id, "polls_failed": len(failures)})
        return world

    # --- records -----------------------------------------------------------------------------

    async def world_bounds(self, world_id: str, *, timeout: float = BOUNDS_TIMEOUT_SECONDS) -> tuple[int, int] | None:
        """(size, rounds) of a world, so that a reader bounds agent ids and rounds: from a world service,
        else from the SANDBOX_WORLDS bucket that holds every world's spec (``export`` after the services
        are gone), else None (not bounded).

        A plain request, not ``nats_client.request``: no world service running is a normal case for ``export``,
        not a retry worth a warning."""
        world: world_pb2.World | None = world_pb2.World()
        payload = world_pb2.GetWorldRequest(world_id=world_id).SerializeToString()
        try:
            reply = await self.nc.request(subjects.WORLD_GET, payload, timeout=timeout)
            if subjects.ERROR_CODE_HEADER in (reply.headers or {}):
                raise LookupError(world_id)
            world.ParseFromString(reply.data)
        except (TimeoutError, LookupError, DecodeError, nats.errors.Error):
            try:
                kv = await nats_client.jetstream(self.nc, "world", timeout=timeout).key_value(subjects.WORLDS_BUCKET)
                world = parse_world(world_id, (await kv.get(world_id)).value)
            except Exception:  # noqa: BLE001 - no bucket, no key, no permission: unbounded
                return None
        if world is None or world.spec.world_id != world_id or world.spec.size <= 0 or world.spec.rounds <= 0:
            return None
        return world.spec.size, world.spec.rounds

    async def _bounds(self, world_id: str, spec: world_pb2.WorldSpec | None) -> tuple[int | None, int | None]:
        """The spec's bounds when the caller has it (``run``), else the world's (``world_bounds``)."""
        bounds = (spec.size, spec.rounds) if spec is not None else await self.world_bounds(world_id)
        return bounds if bounds else (None, None)

    def _js(self) -> Any:
        return nats_client.jetstream(self.nc, "world", timeout=RECORDS_API_TIMEOUT_SECONDS)

    async def read_records(self, world_id: str, *, size: int | None = None,
                           rounds: int | None = None) -> list[common_pb2.InteractionRecord]:
        """The world's trusted records, ordered by (round, agent) whatever the publish order; skipped
        messages are logged in one line. Holds them all: for benchmarks and tests; ``export_records``
        writes a file in bounded memory."""
        records, stats = await record_stream.read_world_records(self._js(), world_id, size=size, rounds=rounds)
        if stats.skipped_total:
            log.warning("records.skipped", extra={"world_id": world_id, "summary": stats.summary()})
        return records

    async def export_records(self, world_id: str, path: str | Path, *, spec: world_pb2.WorldSpec | None = None,
                             on_row: Callable[[dict], None] | None = None) -> record_stream.ExportResult:
        """Writes the world's trusted records to ``path`` (JSONL, (round, agent) order) as they are read.

        Agent ids and rounds are bounded by ``spec`` when the caller has it (``run``), else by the
        world's own (``world_bounds``); the result's ``stats`` say what was skipped — the caller
        prints ``stats.summary()``.
        """
        size, rounds = await self._bounds(world_id, spec)
        return await record_stream.export_world_records(self._js(), world_id, path, size=size, rounds=rounds,
                                                        on_row=on_row)

    async def read_record_rows(self, world_id: str, *, idle_timeout: float = record_stream.IDLE_TIMEOUT_SECONDS,
                               ) -> tuple[list[dict[str, Any]], record_stream.ReadStats]:
        """The world's trusted records as JSON rows in (round, agent) order (what ``data build --nats``
        mines), bounded by the world's spec where it is known, and what was skipped. ``idle_timeout``:
        how long the read may hear nothing."""
        size, rounds = await self._bounds(world_id, None)
        return await record_stream.read_world_rows(nats_client.jetstream(self.nc, "world"), world_id, size=size,
                                                   rounds=rounds, idle_timeout=idle_timeout)

    async def follow_records(self, trusted: record_stream.TrustedRecords, *, replay: bool = False,
                             poll_seconds: float = 0.25) -> AsyncIterator[common_pb2.InteractionRecord]:
        """The world's trusted records as they are published (with ``replay``, those before too), until
        the caller stops; what was skipped is counted in ``trusted.stats``. Read with batched direct gets,
        asked again every ``poll_seconds`` once caught up (no consumer: the CLI's user may not create one)."""
        js = self._js()
        start = 0 if replay else await nats_client.last_sequence(js, subjects.RECORDS_STREAM, trusted.subject)
        async with contextlib.aclosing(direct.follow(js, subjects.RECORDS_STREAM, trusted.subject, after_seq=start,
                                                     poll_seconds=poll_seconds)) as messages:
            async for msg in messages:
                if msg is None:  # caught up: nothing new yet
                    continue
                kept = trusted.admit(msg.seq, msg.data, msg.headers.get(subjects.MSG_ID_HEADER))
                if kept is not None:
                    yield kept


async def read_record_rows(nats_url: str, world_id: str, *, idle_timeout: float = record_stream.IDLE_TIMEOUT_SECONDS,
                           ) -> tuple[list[dict[str, Any]], record_stream.ReadStats]:
    """``WorldClient.read_record_rows`` on a connection of its own (``data build --nats``)."""
    async with connected(nats_url, name="stable-align-data") as nc:
        return await WorldClient(nc).read_record_rows(world_id, idle_timeout=idle_timeout)
