"""gRPC face of the agent service: the same handlers as on NATS (errors mapped by the interceptor)."""

from __future__ import annotations

import grpc

from services.agent.handlers import AgentHandlers
from stablealign.v1 import agent_pb2, agent_pb2_grpc

SERVICE_NAME = "stablealign.v1.AgentService"


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, handlers: AgentHandlers) -> None:
        self.handlers = handlers

    async def Draft(self, request: agent_pb2.DraftRequest,
                    context: grpc.aio.ServicerContext) -> agent_pb2.DraftResponse:
        return await self.handlers.draft(request)

    async def Feedback(self, request: agent_pb2.FeedbackRequest,
                       context: grpc.aio.ServicerContext) -> agent_pb2.FeedbackResponse:
        return await self.handlers.feedback(request)

    async def Revise(self, request: agent_pb2.ReviseRequest,
                     context: grpc.aio.ServicerContext) -> agent_pb2.ReviseResponse:
        return await self.handlers.revise(request)
