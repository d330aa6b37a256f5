"""Entry point of the agent service for ``stable-align serve agent`` and ``start_service``."""

from __future__ import annotations

from services.agent import metrics
from services.agent.grpc_api import SERVICE_NAME, AgentServicer
from services.agent.handlers import AgentHandlers
from services.agent.settings import AgentSettings
from stablealign import bus
from stablealign.config import load_settings
from stablealign.memory import MemoryStore
from stablealign.service import ServiceContext, ServiceParts
from stablealign.v1 import agent_pb2, agent_pb2_grpc
from stablealign.worlds import WorldSpecCache

SETTINGS = AgentSettings


async def build(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings if isinstance(ctx.settings, AgentSettings) else load_settings(
        AgentSettings, dict(vars(ctx.settings)))
    memory = MemoryStore(ctx.js, max_agents=settings.max_memory_agents,
                         on_read=lambda kind: metrics.MEMORY_READS.labels(kind).inc())
    handlers = AgentHandlers(settings, WorldSpecCache(ctx.js, max_worlds=settings.max_worlds), memory)
    await ctx.requests.add(bus.AGENT_DRAFT, agent_pb2.DraftRequest, handlers.draft, "Draft")
    await ctx.requests.add(bus.AGENT_FEEDBACK, agent_pb2.FeedbackRequest, handlers.feedback, "Feedback",
                            batch=True)
    await ctx.requests.add(bus.AGENT_REVISE, agent_pb2.ReviseRequest, handlers.revise, "Revise")
    servicer = AgentServicer(handlers)
    return ServiceParts(grpc=[(agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer, SERVICE_NAME)])
