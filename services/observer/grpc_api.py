"""gRPC face of the observer service: the same handler as on NATS (errors mapped by the interceptor)."""

from __future__ import annotations

import grpc

from services.observer.handlers import ObserverHandlers
from stablealign.v1 import observer_pb2, observer_pb2_grpc

SERVICE_NAME = "stablealign.v1.ObserverService"


class ObserverServicer(observer_pb2_grpc.ObserverServiceServicer):
    def __init__(self, handlers: ObserverHandlers) -> None:
        self.handlers = handlers

    async def Rate(self, request: observer_pb2.RateRequest,
                   context: grpc.aio.ServicerContext) -> observer_pb2.RateResponse:
        return await self.handlers.rate(request)
