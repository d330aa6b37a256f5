"""Bounds of the JetStream streams and KV buckets: how much each may hold, how long, on how many servers.

Every stream and bucket has a ``max_bytes`` and a ``max_age``, so that a deployment that runs for
months never fills the NATS volume, and a replica count (``STABLEALIGN_STREAM_REPLICAS``: 1 on one
server, 3 on the gpu overlay's three-server cluster, where a stream survives the loss of a server).
The values are ``ServiceSettings`` fields (this module's ``StreamSettings``), the same in every
service, because the service that owns a stream (the world its streams and bucket, the trainer its
own: ``services/world/streams.py``, ``services/trainer/streams.py``) creates it at start and brings its limits up to date. What
happens at a limit is chosen per stream:

- records, agent memory, memory pools: the server refuses new messages when the stream is full
  (``discard: new``): a world then fails with a publish error instead of silently losing the oldest
  records — the training data — or memories a running world still reads. Messages older than
  ``max_age`` are removed either way: export records within that time.
- job logs: the oldest lines go first (``discard: old``).
- the worlds' and jobs' state buckets: a key not written for ``max_age`` expires (a finished world or
  job is forgotten then); a full bucket refuses new keys (NATS KV's own policy).

The table of defaults is in docs/deploy.md ("Retention"); the sum of the byte limits must stay below
the server's ``max_file_store`` (nats-server reserves each stream's ``max_bytes`` when it is created).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from pydantic import BaseModel, Field

from stablealign.nats import subjects

MiB = 1 << 20
GiB = 1 << 30
DAY_SECONDS = 86400.0


class StreamSettings(BaseModel):
    """The stream fields of every service's settings (``STABLEALIGN_STREAM_*``); one value per deployment."""

    stream_replicas: int = Field(1, ge=1, le=5, description=(
        "Servers holding each stream and bucket (JetStream replicas): 1 on one nats-server, 3 on a 3-server "
        "cluster (a stream then survives one server's loss)."))
    stream_records_max_bytes: int = Field(2 * GiB, ge=MiB, description=(
        "SANDBOX_RECORDS: most bytes of interaction records; when full, new records are refused (the world fails)."))
    stream_records_max_age_days: float = Field(90.0, gt=0, description=(
        "SANDBOX_RECORDS: records older than this are removed (export them before)."))
    stream_memory_max_bytes: int = Field(2 * GiB, ge=MiB, description=(
        "SANDBOX_MEMORY: most bytes of agent memories; when full, new memories are refused."))
    stream_memory_max_age_days: float = Field(30.0, gt=0, description=(
        "SANDBOX_MEMORY: memories older than this are removed (a world resumed later starts from its priors)."))
    stream_pools_max_bytes: int = Field(1 * GiB, ge=MiB, description=(
        "SANDBOX_MEMORY_POOLS: most bytes of shared prior pools; when full, new pools are refused."))
    stream_pools_max_age_days: float = Field(30.0, gt=0, description=(
        "SANDBOX_MEMORY_POOLS: pools older than this are removed (published again by the next world that needs one)."))
    stream_job_logs_max_bytes: int = Field(512 * MiB, ge=MiB, description=(
        "TRAINER_JOB_LOGS: most bytes of training job log lines; the oldest lines go first."))
    stream_job_logs_max_age_days: float = Field(30.0, gt=0, description=(
        "TRAINER_JOB_LOGS: log lines older than this are removed."))
    stream_state_max_bytes: int = Field(64 * MiB, ge=MiB, description=(
        "SANDBOX_WORLDS and TRAINER_JOBS buckets: most bytes of world and job state each."))
    stream_state_max_age_days: float = Field(90.0, gt=0, description=(
        "SANDBOX_WORLDS and TRAINER_JOBS buckets: a world or job not updated for this long is forgotten."))


@dataclass(frozen=True)
class StreamBounds:
    """One stream's limits, in the units JetStream takes."""

    max_bytes: int
    max_age_seconds: float
    discard: DiscardPolicy


def _days(days: float) -> float:
    return days * DAY_SECONDS


def bounds(settings: StreamSettings) -> dict[str, StreamBounds]:
    """Limits by stream or bucket name (``stablealign.nats.subjects``)."""
    s = settings
    return {
        subjects.RECORDS_STREAM: StreamBounds(s.stream_records_max_bytes, _days(s.stream_records_max_age_days),
                                         DiscardPolicy.NEW),
        subjects.MEMORY_STREAM: StreamBounds(s.stream_memory_max_bytes, _days(s.stream_memory_max_age_days),
                                        DiscardPolicy.NEW),
        subjects.POOL_STREAM: StreamBounds(s.stream_pools_max_bytes, _days(s.stream_pools_max_age_days),
                                         DiscardPolicy.NEW),
        subjects.JOB_LOGS_STREAM: StreamBounds(s.stream_job_logs_max_bytes, _days(s.stream_job_logs_max_age_days),
                                          DiscardPolicy.OLD),
        subjects.WORLDS_BUCKET: StreamBounds(s.stream_state_max_bytes, _days(s.stream_state_max_age_days),
                                        DiscardPolicy.NEW),
        subjects.JOBS_BUCKET: StreamBounds(s.stream_state_max_bytes, _days(s.stream_state_max_age_days),
                                      DiscardPolicy.NEW),
    }


def bounded(config: StreamConfig, settings: StreamSettings) -> StreamConfig:
    """``config`` with its stream's byte and age limits, discard policy and replicas."""
    limit = bounds(settings)[config.name]
    return dataclasses.replace(config, max_bytes=limit.max_bytes, max_age=limit.max_age_seconds,
                               discard=limit.discard, num_replicas=settings.stream_replicas)


def bucket_config(bucket: str, settings: StreamSettings) -> KeyValueConfig:
    """A state bucket: one value per key (history 1), on file, bounded and replicated."""
    limit = bounds(settings)[bucket]
    return KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, max_bytes=limit.max_bytes,
                          ttl=limit.max_age_seconds, replicas=settings.stream_replicas)


def bucket_update(current: StreamConfig, bucket: str, settings: StreamSettings) -> StreamConfig | None:
    """The bucket's stream config with today's limits, or None when it has them already."""
    wanted = bucket_config(bucket, settings)
    updated = dataclasses.replace(current, max_bytes=wanted.max_bytes, max_age=wanted.ttl,
                                  num_replicas=wanted.replicas)
    same = (current.max_bytes, current.max_age, current.num_replicas) == (
        updated.max_bytes, updated.max_age, updated.num_replicas)
    return None if same else updated


# The limits of this process, set once at service start (stablealign.serving.service) and read where streams
# are created: at start (the owning service) and deep in the world's code (memory pools), paths that do not carry the
# settings. Until set: the defaults above.
_configured = StreamSettings()


def configure(settings: StreamSettings) -> None:
    """Makes ``settings``' stream fields the limits this process creates and updates streams with."""
    global _configured
    _configured = StreamSettings(**{name: getattr(settings, name) for name in StreamSettings.model_fields})


def configured() -> StreamSettings:
    return _configured


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Creates ``config``'s stream bounded in bytes and age and replicated as configured, or brings an
    existing one (e.g. made by an older version) up to date."""
    config = bounded(config, configured())
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)


async def ensure_bucket(js: JetStreamContext, bucket: str) -> None:
    """Creates the state bucket with this process's limits, or brings an existing one's up to date
    (one made by an older version is unbounded and unreplicated)."""
    limits = configured()
    try:
        await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            await js.create_key_value(config=bucket_config(bucket, limits))
        except nats.js.errors.BadRequestError:
            pass  # another process created it in between
        return
    info = await js.stream_info(subjects.kv_stream(bucket))
    update = bucket_update(info.config, bucket, limits)
    if update is not None:
        await js.update_stream(update)
