"""Durable job state: one ``trainer_pb2.Job`` per key in the TRAINER_JOBS JetStream KV bucket.

The bucket, not the process, is the source of truth, so a restarted (or rescheduled) trainer
service still knows every job: ``recover`` re-queues the queued ones, re-attaches the Kubernetes
ones by name, and fails the local ones whose process died with the previous service.
Job log lines live in the TRAINER_JOB_LOGS stream (``trainer.jobs.<job_id>.log``), one
``LogLine`` per message, so ``StreamLogs`` replays them after a restart too.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator

import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from stablealign.core import metrics
from stablealign.core.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.v1 import trainer_pb2

log = get_logger(__name__)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
TERMINAL_STATES = frozenset({trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED,
                             trainer_pb2.JOB_STATE_CANCELLED})


def state_name(state: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``RUNNING`` (for logs, metrics and the CLI)."""
    return trainer_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def new_job_id() -> str:
    """Sortable by creation time (so listings read in order) and unique across replicas."""
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def check_job_id(job_id: str) -> str:
    """A job id is a NATS subject token and a Kubernetes label value: [A-Za-z0-9_-], alphanumeric at both ends."""
    if not JOB_ID_RE.match(job_id):
        raise ValidationError(f"job_id {job_id!r}: use 1-63 letters, digits, '-' or '_', "
                              "starting and ending with a letter or digit")
    return job_id


def is_terminal(job: trainer_pb2.Job) -> bool:
    return job.state in TERMINAL_STATES


class JobStore:
    """Reads and writes jobs in the KV bucket; writes of one job are serialised by a per-job lock."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(cls, js: JetStreamContext) -> JobStore:
        return cls(js, await js.key_value(subjects.JOBS_BUCKET))

    def lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    async def create(self, job: trainer_pb2.Job) -> trainer_pb2.Job:
        """Stores a new job; a job id that exists already is a conflict, never an overwrite."""
        try:
            await self.kv.create(job.spec.job_id, job.SerializeToString())
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(f"job {job.spec.job_id} exists already") from None
        except nats.js.errors.APIError as exc:
            if "wrong last sequence" in str(exc).lower():
                raise ConflictError(f"job {job.spec.job_id} exists already") from None
            raise UnavailableError(f"cannot store job {job.spec.job_id}: {exc}") from exc
        return job

    async def get(self, job_id: str) -> trainer_pb2.Job:
        if not JOB_ID_RE.match(job_id or ""):
            raise NotFoundError(f"unknown job {job_id!r}")
        try:
            entry = await self.kv.get(job_id)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is a subclass
            raise NotFoundError(f"unknown job {job_id!r}") from None
        job = trainer_pb2.Job()
        try:
            job.ParseFromString(entry.value or b"")
        except (DecodeError, ValueError):
            job.Clear()
        if job.spec.job_id != job_id:  # not a Job of this key: never taken for one
            metrics.ENTRIES_SKIPPED.labels(subjects.JOBS_BUCKET).inc()
            raise UnavailableError(f"job {job_id}: its stored entry is not a job (revision {entry.revision})")
        return job

    async def put(self, job: trainer_pb2.Job) -> trainer_pb2.Job:
        await self.kv.put(job.spec.job_id, job.SerializeToString())
        return job

    async def update(self, job_id: str, **fields) -> trainer_pb2.Job:
        """Reads, changes and writes one job under its lock (``metrics`` merges into the map)."""
        async with self.lock(job_id):
            job = await self.get(job_id)
            metrics = fields.pop("metrics", None)
            for key, value in fields.items():
                setattr(job, key, value)
            if metrics:
                job.metrics.update(metrics)
            return await self.put(job)

    async def list(self) -> list[trainer_pb2.Job]:
        """Every job, oldest first."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        jobs = []
        skipped: list[str] = []
        for key in keys:
            try:
                jobs.append(await self.get(key))
            except NotFoundError:
                continue  # deleted in between
            except UnavailableError:
                skipped.append(key[:80])  # not a job: listing goes on with the rest
        if skipped:
            log.warning("trainer.entries_skipped", extra={"bucket": subjects.JOBS_BUCKET, "skipped": len(skipped),
                                                          "keys": ", ".join(skipped[:10])})
        jobs.sort(key=lambda j: (j.created_at, j.spec.job_id))
        return jobs

    # --- logs ----------------------------------------------------------------------------------

    async def append_log(self, job_id: str, line: str, at: float | None = None) -> None:
        msg = trainer_pb2.LogLine(job_id=job_id, line=line, time=time.time() if at is None else at)
        await self.js.publish(subjects.JOB_LOGS_SUBJECT.format(job_id=job_id), msg.SerializeToString())

    async def last_log_time(self, job_id: str) -> float:
        """Time of the job's last stored log line (0 if none): where a re-attached log stream resumes."""
        try:
            raw = await self.js.get_last_msg(subjects.JOB_LOGS_STREAM, subjects.JOB_LOGS_SUBJECT.format(job_id=job_id))
        except nats.js.errors.NotFoundError:
            return 0.0
        line = trainer_pb2.LogLine()
        try:
            line.ParseFromString(raw.data or b"")
        except (DecodeError, ValueError):
            return 0.0  # not a log line: the re-attached stream starts from the beginning
        return line.time

    async def read_logs(self, job_id: str, after_seq: int = 0) -> list[tuple[int, trainer_pb2.LogLine]]:
        """The job's log lines with stream sequence > ``after_seq`` as they are now."""
        out = []
        for seq, msg in await nats_client.read_subject(self.js, subjects.JOB_LOGS_STREAM,
                                               subjects.JOB_LOGS_SUBJECT.format(job_id=job_id), after_seq=after_seq):
            line = trainer_pb2.LogLine()
            try:
                line.ParseFromString(msg.data)
            except (DecodeError, ValueError):
                metrics.ENTRIES_SKIPPED.labels(subjects.JOB_LOGS_STREAM).inc()
                log.warning("trainer.log_line_skipped", extra={"job_id": job_id, "seq": seq})
                continue
            out.append((seq, line))
        return out


async def follow_logs(store: JobStore, job_id: str, follow: bool,
                      poll: float = 0.5) -> AsyncIterator[trainer_pb2.LogLine]:
    """A job's log lines from the start; with ``follow``, until the job has ended.

    A job's last lines are stored before its final state, so one more read after seeing the
    final state returns everything.
    """
    await store.get(job_id)  # NotFoundError for an unknown job
    after = 0
    while True:
        job = await store.get(job_id)
        for seq, line in await store.read_logs(job_id, after_seq=after):
            after = seq
            yield line
        if not follow or is_terminal(job):
            return
        await asyncio.sleep(poll)
