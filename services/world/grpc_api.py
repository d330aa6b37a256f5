"""gRPC WorldService: the same operations as the NATS subjects, plus StreamInteractions.

StreamInteractions reads ``sandbox.records.<world>`` from the SANDBOX_RECORDS stream with batched direct
gets (``stablealign.nats.direct.follow``, no consumer): with ``replay`` from the first record, else only
new ones, asked again every ``idle_poll_seconds`` once caught up. With
``until_complete`` it ends once the world is in a final state and every record the stream holds
for it has been sent; a client that cancels ends it cleanly (the consumer is removed). Only trusted
records are sent (``stablealign.sandbox.record_stream``); skipped messages are logged in one line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from services.world.manager import WorldManager
from services.world.store import FINAL_STATES
from stablealign.core.logs import get_logger
from stablealign.nats import client as nats_client
from stablealign.nats import direct, subjects
from stablealign.sandbox.record_stream import TrustedRecords
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc

SERVICE_NAME = "stablealign.v1.WorldService"
log = get_logger(__name__)


class WorldServicer(world_pb2_grpc.WorldServiceServicer):
    def __init__(self, manager: WorldManager, *, idle_poll_seconds: float = 0.5) -> None:
        self.manager = manager
        self.idle_poll_seconds = idle_poll_seconds

    async def CreateWorld(
        self, request: world_pb2.CreateWorldRequest, context: grpc.aio.ServicerContext
    ) -> world_pb2.World:
        return await self.manager.create(request.spec)

    async def GetWorld(
        self, request: world_pb2.GetWorldRequest, context: grpc.aio.ServicerContext
    ) -> world_pb2.World:
        return await self.manager.get(request.world_id)

    async def ListWorlds(
        self, request: world_pb2.ListWorldsRequest, context: grpc.aio.ServicerContext
    ) -> world_pb2.ListWorldsResponse:
        return world_pb2.ListWorldsResponse(worlds=await self.manager.list())

    async def CancelWorld(
        self, request: world_pb2.CancelWorldRequest, context: grpc.aio.ServicerContext
    ) -> world_pb2.World:
        return await self.manager.cancel(request.world_id)

    async def ResumeWorld(
        self, request: world_pb2.ResumeWorldRequest, context: grpc.aio.ServicerContext
    ) -> world_pb2.World:
        return await self.manager.resume(request.world_id)

    async def StreamInteractions(
        self, request: world_pb2.StreamInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.InteractionRecord]:
        async for record in stream_records(
            self.manager,
            request.world_id,
            replay=request.replay,
            until_complete=request.until_complete,
            idle_poll_seconds=self.idle_poll_seconds,
        ):
            yield record


async def stream_records(
    manager: WorldManager,
    world_id: str,
    *,
    replay: bool,
    until_complete: bool,
    idle_poll_seconds: float = 0.5,
) -> AsyncIterator[common_pb2.InteractionRecord]:
    """Records of a world as they are published (NotFoundError for an unknown world).

    Shared by gRPC and usable by in-process clients. Completion is checked when the stream is
    idle and after each record once the world is known to be final, so a finished world's
    replay ends right after its last record instead of after a poll interval.
    """
    world = await manager.get(world_id)  # NotFoundError -> NOT_FOUND
    js = manager.js
    subject = subjects.RECORDS_SUBJECT.format(world_id=world_id)
    # Without replay: from just after the last record now (a record published between reading that
    # sequence and the first get is still sent).
    delivered = 0 if replay else await nats_client.last_sequence(js, subjects.RECORDS_STREAM, subject)
    # The readers' rule: only records with the world's message id, once each; the rest skipped.
    trusted = TrustedRecords(world_id, size=world.spec.size or None, rounds=world.spec.rounds or None)
    final_seq: int | None = None

    async def final_sequence() -> int | None:
        """The subject's last sequence once the world is final, else None."""
        current = await manager.get(world_id)
        if current.state not in FINAL_STATES:
            return None
        return await nats_client.last_sequence(js, subjects.RECORDS_STREAM, subject)

    messages = direct.follow(js, subjects.RECORDS_STREAM, subject, after_seq=delivered, poll_seconds=idle_poll_seconds)
    try:
        if until_complete and world.state in FINAL_STATES:
            final_seq = await nats_client.last_sequence(js, subjects.RECORDS_STREAM, subject)
        while not (until_complete and final_seq is not None and delivered >= final_seq):
            msg = await anext(messages)
            if msg is None:  # caught up and waited: nothing new
                if until_complete and final_seq is None:
                    final_seq = await final_sequence()
                continue
            delivered = max(delivered, msg.seq)
            kept = trusted.admit(msg.seq, msg.data, msg.headers.get(subjects.MSG_ID_HEADER))
            if kept is not None:
                yield kept
    finally:
        if trusted.stats.skipped_total:
            log.warning("world.records_skipped", extra={"world_id": world_id, "summary": trusted.stats.summary()})
        try:
            await asyncio.shield(messages.aclose())
        except Exception:  # noqa: BLE001 - connection closing: the inbox subscription goes with it
            pass
