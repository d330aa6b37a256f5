"""The trainer service process: NATS handlers + gRPC servicer + the background job scheduler.

`stable-align serve trainer` runs it (``SETTINGS`` and ``build`` are what ``stablealign.serving.service``
needs). NATS subjects (request/reply, protobuf, queue group "trainer"): ``trainer.jobs.submit``
(SubmitJobRequest -> Job), ``trainer.jobs.get``, ``trainer.jobs.list``, ``trainer.jobs.cancel``.
On SIGTERM the service drains: no new requests, local training processes are stopped and their
jobs requeued, Kubernetes jobs keep running and are re-attached by the next start.
"""

from __future__ import annotations

import functools

from services.trainer.grpc_api import SERVICE_NAME, TrainerServicer
from services.trainer.jobs import JobStore
from services.trainer.queue import Scheduler
from services.trainer.runners import Runner
from services.trainer.runners.local import LocalRunner
from services.trainer.settings import TrainerSettings
from services.trainer.streams import declare_streams
from stablealign.nats import subjects
from stablealign.serving.service import ServiceContext, ServiceParts
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
    js = ctx.jetstream("trainer")  # its own account's, when secured
    await declare_streams(js)  # the trainer owns its log stream and jobs bucket
    store = await JobStore.open(js)
    scheduler = Scheduler(store, make_runners(settings), settings)

    # NATS and gRPC share one implementation: the servicer's methods (they do not use the context).
    servicer = TrainerServicer(scheduler)
    for subject, request_type, method in (
        (subjects.TRAINER_SUBMIT, trainer_pb2.SubmitJobRequest, "SubmitJob"),
        (subjects.TRAINER_GET, trainer_pb2.GetJobRequest, "GetJob"),
        (subjects.TRAINER_LIST, trainer_pb2.ListJobsRequest, "ListJobs"),
        (subjects.TRAINER_CANCEL, trainer_pb2.CancelJobRequest, "CancelJob"),
    ):
        await ctx.requests.add(subject, request_type, functools.partial(getattr(servicer, method), context=None),
                               method)
    return ServiceParts(
        grpc=[(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME)],
        background=[scheduler.run],
        on_stop=[scheduler.stop],
    )
