"""The JetStream stream and bucket the trainer service owns and creates at start: job log lines and the
jobs' state. Other processes only read them; the names are in ``stablealign.nats.subjects``.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from stablealign.nats import subjects
from stablealign.nats.streams import ensure_bucket, ensure_stream


async def declare_streams(js: JetStreamContext) -> None:
    """Creates (idempotently) what the trainer service writes: job log lines and the jobs bucket."""
    await ensure_stream(js, StreamConfig(
        name=subjects.JOB_LOGS_STREAM, subjects=["trainer.jobs.*.log"], storage=StorageType.FILE,
        allow_direct=True, description="Trainer job log lines",
    ))
    await ensure_bucket(js, subjects.JOBS_BUCKET)
