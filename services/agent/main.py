"""Entry point of the agent service for ``stable-align serve agent`` and ``start_service``."""

from __future__ import annotations

from services.agent import metrics
from services.agent.grpc_api import SERVICE_NAME, AgentServicer
from services.agent.handlers import AgentHandlers
from services.agent.settings import AgentSettings
from stablealign.core.config import load_settings
from stablealign.nats import subjects
from stablealign.sandbox.memory import MemoryStore
from stablealign.sandbox.worlds import WorldSpecCache
from stablealign.serving.service import ServiceContext, ServiceParts
from stablealign.v1 import agent_pb2, agent_pb2_grpc

SETTINGS = AgentSettings


async def build(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings if isinstance(ctx.settings, AgentSettings) else load_settings(
        AgentSettings, dict(vars(ctx.settings)))
    memory = MemoryStore(ctx.js, max_agents=settings.max_memory_agents,
                         on_read=lambda kind: metrics.MEMORY_READS.labels(kind).inc())
    handlers = AgentHandlers(settings, WorldSpecCache(ctx.js, max_worlds=settings.max_worlds), memory)
    await ctx.requests.add(subjects.AGENT_DRAFT, agent_pb2.DraftRequest, handlers.draft, "Draft")
    await ctx.requests.add(subjects.AGENT_FEEDBACK, agent_pb2.FeedbackRequest, handlers.feedback, "Feedback",
                            batch=True)
    await ctx.requests.add(subjects.AGENT_REVISE, agent_pb2.ReviseRequest, handlers.revise, "Revise")
    servicer = AgentServicer(handlers)
    return ServiceParts(grpc=[(agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer, SERVICE_NAME)])
