"""The trainer service process: NATS handlers + gRPC servicer + the background job scheduler.

`stable-align serve trainer` runs it (``SETTINGS`` and ``build`` are what ``stablealign.service``
needs). NATS subjects (request/reply, protobuf, queue group "trainer"): ``trainer.jobs.submit``
(SubmitJobRequest -> Job), ``trainer.jobs.get``, ``trainer.jobs.list``, ``trainer.jobs.cancel``.
On SIGTERM the service drains: no new requests, local training processes are stopped and their
jobs requeued, Kubernetes jobs keep running and are re-attached by the next start.
"""

from __future__ import annotations

from services.trainer.grpc_api import SERVICE_NAME, TrainerServicer
from services.trainer.jobs import JobStore
from services.trainer.queue import Scheduler
from services.trainer.runners import Runner
from services.trainer.runners.local import LocalRunner
from services.trainer.settings import TrainerSettings
from stablealign import bus
from stablealign.errors import ValidationError
from stablealign.service import ServiceContext, ServiceParts
from stablealign.v1 import trainer_pb2, trainer_pb2_grpc

SETTINGS = TrainerSettings


def make_runners(settings: TrainerSettings) -> dict[str, Runner]:
    runners: dict[str, Runner] = {}
    for name in settings.runners:
        if name == "local":
            runners[name] = LocalRunner(settings)
        elif name == "kubernetes":
            from services.trainer.runners.kubernetes import KubernetesRunner

            runners[name] = KubernetesRunner(settings)
    return runners


async def build(ctx: ServiceContext) -> ServiceParts:
    settings: TrainerSettings = ctx.settings
    store = await JobStore.open(ctx.js)
    scheduler = Scheduler(store, make_runners(settings), settings)

    async def submit(request: trainer_pb2.SubmitJobRequest) -> trainer_pb2.Job:
        if not request.HasField("spec"):
            raise ValidationError("spec is required")
        return await scheduler.submit(request.spec)

    async def get(request: trainer_pb2.GetJobRequest) -> trainer_pb2.Job:
        return await scheduler.get(request.job_id)

    async def list_jobs(request: trainer_pb2.ListJobsRequest) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=await scheduler.list())

    async def cancel(request: trainer_pb2.CancelJobRequest) -> trainer_pb2.Job:
        return await scheduler.cancel(request.job_id)

    await ctx.requests.add(bus.TRAINER_SUBMIT, trainer_pb2.SubmitJobRequest, submit, "SubmitJob")
    await ctx.requests.add(bus.TRAINER_GET, trainer_pb2.GetJobRequest, get, "GetJob")
    await ctx.requests.add(bus.TRAINER_LIST, trainer_pb2.ListJobsRequest, list_jobs, "ListJobs")
    await ctx.requests.add(bus.TRAINER_CANCEL, trainer_pb2.CancelJobRequest, cancel, "CancelJob")
    return ServiceParts(
        grpc=[(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(scheduler), SERVICE_NAME)],
        background=[scheduler.run],
        on_stop=[scheduler.stop],
    )
