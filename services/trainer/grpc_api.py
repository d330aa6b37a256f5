"""gRPC face of the trainer service (``stablealign.v1.TrainerService``); the scheduler does the work.

Errors are typed (``stablealign.core.errors``) and mapped to status codes by the shared interceptor:
a bad spec is INVALID_ARGUMENT, an unknown job NOT_FOUND, cancelling an ended job
FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.trainer.queue import Scheduler
from stablealign.core.errors import ValidationError
from stablealign.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE_NAME = "stablealign.v1.TrainerService"


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def SubmitJob(self, request: trainer_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        if not request.HasField("spec"):
            raise ValidationError("spec is required")
        return await self.scheduler.submit(request.spec)

    async def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        return await self.scheduler.get(request.job_id)

    async def ListJobs(self, request: trainer_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=await self.scheduler.list())

    async def CancelJob(self, request: trainer_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        return await self.scheduler.cancel(request.job_id)

    async def StreamLogs(self, request: trainer_pb2.StreamLogsRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[trainer_pb2.LogLine]:
        async for line in self.scheduler.logs(request.job_id, request.follow):
            yield line
