"""The JetStream streams and bucket the world service owns and creates at start: records, agent
memories, the worlds' state. Other processes only read or append to them (their NATS users may not create
streams: stablealign/nats/permissions.py); the names are in ``stablealign.nats.subjects``.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from stablealign.nats import subjects
from stablealign.nats.streams import ensure_bucket, ensure_stream


async def declare_streams(js: JetStreamContext) -> None:
    """Creates (idempotently) what the world service writes: records, memories, the worlds bucket."""
    await ensure_stream(js, StreamConfig(
        name=subjects.RECORDS_STREAM, subjects=["sandbox.records.>"], storage=StorageType.FILE,
        duplicate_window=subjects.DEDUP_WINDOW_SECONDS, allow_direct=True,
        description="SANDBOX interaction records, one message per world/round/agent",
    ))
    await ensure_stream(js, StreamConfig(
        name=subjects.MEMORY_STREAM, subjects=["sandbox.memory.>"], storage=StorageType.FILE,
        duplicate_window=subjects.DEDUP_WINDOW_SECONDS, allow_direct=True,
        description="Agent memories: appends of (question, answer, embedding) batches",
    ))
    await ensure_bucket(js, subjects.WORLDS_BUCKET)
