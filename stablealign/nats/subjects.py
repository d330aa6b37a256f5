"""The catalogue of NATS names the services share: streams, buckets, subjects and headers.

Why one catalogue apart from the client and the server: every process names the same streams and
subjects (the world writes records that the CLI reads, the NATS permissions table grants them per
role), while creating a stream is the job of the service that owns it (``services/world/streams.py``,
``services/trainer/streams.py``). Names only here; no connection, no I/O.
"""

from __future__ import annotations

# Streams and buckets (UPPER_SNAKE) and the subjects they hold.
RECORDS_STREAM = "SANDBOX_RECORDS"
RECORDS_SUBJECT = "sandbox.records.{world_id}"
MEMORY_STREAM = "SANDBOX_MEMORY"
MEMORY_SUBJECT = "sandbox.memory.{world_id}.{agent_id}"
WORLDS_BUCKET = "SANDBOX_WORLDS"
JOBS_BUCKET = "TRAINER_JOBS"
JOB_LOGS_STREAM = "TRAINER_JOB_LOGS"
JOB_LOGS_SUBJECT = "trainer.jobs.{job_id}.log"

# Request/reply subjects (queue groups are named after the service).
AGENT_DRAFT = "sandbox.agent.draft"
AGENT_FEEDBACK = "sandbox.agent.feedback"
AGENT_REVISE = "sandbox.agent.revise"
OBSERVER_RATE = "sandbox.observer.rate"
WORLD_CREATE = "sandbox.world.create"
WORLD_GET = "sandbox.world.get"
WORLD_LIST = "sandbox.world.list"
WORLD_CANCEL = "sandbox.world.cancel"
WORLD_RESUME = "sandbox.world.resume"
TRAINER_SUBMIT = "trainer.jobs.submit"
TRAINER_GET = "trainer.jobs.get"
TRAINER_LIST = "trainer.jobs.list"
TRAINER_CANCEL = "trainer.jobs.cancel"

# A method added with ``batch=True`` also answers batches on "<subject>.batch" (common.RequestBatch ->
# common.ReplyBatch): several requests in one message, each answered on its own (``request_batch``).
BATCH_SUFFIX = ".batch"
MAX_BATCH_ITEMS = 64

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MSG_ID_HEADER = "Nats-Msg-Id"
# A request's silence limit in seconds; asks the replica for heartbeats (a message with PROGRESS_HEADER).
LIVENESS_HEADER = "Stablealign-Liveness"
PROGRESS_HEADER = "Stablealign-Progress"
# The default silence limit (ServiceSettings.request_liveness_seconds): a live replica sends a heartbeat
# every quarter of it, so only a dead or cut-off one stays silent that long.
LIVENESS_SECONDS = 10.0

# Dedup window of the records stream: a re-sent record is dropped within it. A day covers
# any realistic resume of a crashed world service.
DEDUP_WINDOW_SECONDS = 24 * 3600.0

# Shared memory pools (stablealign.sandbox.memory): prior texts and embeddings, chunked.
POOL_STREAM = "SANDBOX_MEMORY_POOLS"
POOL_SUBJECT = "sandbox.pools.{pool_id}.{chunk}"


def kv_stream(bucket: str) -> str:
    """The stream a KV bucket is stored in (JetStream's naming): what stream info and permissions name."""
    return f"KV_{bucket}"


def kv_key_prefix(bucket: str) -> str:
    """The subject prefix of a KV bucket's keys (JetStream's naming): a put of ``key`` is a publish on
    this prefix + ``key``."""
    return f"$KV.{bucket}."


def batch_subject(subject: str) -> str:
    """The subject that answers batches of ``subject``'s requests."""
    return subject + BATCH_SUFFIX
