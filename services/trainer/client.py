"""Talking to a running trainer service over NATS (what `stable-align jobs` and `train --submit` use).

Submit, get, list and cancel are protobuf request/reply on ``trainer.jobs.*`` (any trainer
replica answers; typed errors come back as ``stablealign.core.errors``). Logs are read straight from the
TRAINER_JOB_LOGS stream and the job's state from the TRAINER_JOBS bucket, so following a job's
log needs no open call on the service.

A submission without a job id gets one here, before the request is sent: a retried request
(the reply was lost) then finds its own job instead of creating a second one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from services.trainer.jobs import JobStore, follow_logs, new_job_id
from stablealign.core.errors import UnavailableError
from stablealign.core.redaction import redact_url
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.v1 import trainer_pb2


@contextlib.asynccontextmanager
async def connected(nats_url: str, name: str = "stablealign-trainer-client",
                    connect_timeout: float = nats_client.CLIENT_GIVE_UP_SECONDS) -> AsyncIterator[NATS]:
    """A connection for one command; an unreachable server is one UnavailableError within
    ``connect_timeout`` seconds (no warning per attempt), not a hang."""
    try:
        nc = await nats_client.connect(nats_url, name=name, give_up_after=connect_timeout)
    except OSError as exc:
        raise UnavailableError(f"cannot reach NATS at {redact_url(nats_url)} ({type(exc).__name__})") from None
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class TrainerClient:
    """The trainer's NATS API on an existing connection."""

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout

    async def submit_job(self, spec: trainer_pb2.JobSpec) -> trainer_pb2.Job:
        spec = trainer_pb2.JobSpec.FromString(spec.SerializeToString())
        spec.job_id = spec.job_id or new_job_id()
        return await nats_client.request(self.nc, subjects.TRAINER_SUBMIT, trainer_pb2.SubmitJobRequest(spec=spec),
                                 trainer_pb2.Job, timeout=self.timeout)

    async def get_job(self, job_id: str) -> trainer_pb2.Job:
        return await nats_client.request(self.nc, subjects.TRAINER_GET, trainer_pb2.GetJobRequest(job_id=job_id),
                                 trainer_pb2.Job, timeout=self.timeout)

    async def list_jobs(self) -> list[trainer_pb2.Job]:
        reply = await nats_client.request(self.nc, subjects.TRAINER_LIST, trainer_pb2.ListJobsRequest(),
                                  trainer_pb2.ListJobsResponse, timeout=self.timeout)
        return list(reply.jobs)

    async def cancel_job(self, job_id: str, timeout: float = 60.0) -> trainer_pb2.Job:
        """Waits (up to ``timeout``) for the job to stop; a local job gets SIGTERM, then SIGKILL."""
        return await nats_client.request(self.nc, subjects.TRAINER_CANCEL, trainer_pb2.CancelJobRequest(job_id=job_id),
                                 trainer_pb2.Job, timeout=timeout, attempts=1)

    async def logs(self, job_id: str, follow: bool = True, poll: float = 0.5) -> AsyncIterator[trainer_pb2.LogLine]:
        """The job's log lines from the start; with ``follow`` until the job ends."""
        store = await JobStore.open(nats_client.jetstream(self.nc, "trainer", timeout=self.timeout))
        async for line in follow_logs(store, job_id, follow, poll):
            yield line


async def submit_job(nats_url: str, spec: trainer_pb2.JobSpec, timeout: float = 10) -> trainer_pb2.Job:
    """Sends ``spec`` to a running trainer service; returns the queued job (typed errors on a bad spec)."""
    async with connected(nats_url) as nc:
        return await TrainerClient(nc, timeout).submit_job(spec)


async def get_job(nats_url: str, job_id: str, timeout: float = 10) -> trainer_pb2.Job:
    async with connected(nats_url) as nc:
        return await TrainerClient(nc, timeout).get_job(job_id)


async def list_jobs(nats_url: str, timeout: float = 10) -> list[trainer_pb2.Job]:
    async with connected(nats_url) as nc:
        return await TrainerClient(nc, timeout).list_jobs()


async def cancel_job(nats_url: str, job_id: str, timeout: float = 60) -> trainer_pb2.Job:
    async with connected(nats_url) as nc:
        return await TrainerClient(nc).cancel_job(job_id, timeout)
