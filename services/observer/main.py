"""Entry point of the observer service for ``stable-align serve observer`` and ``start_service``."""

from __future__ import annotations

from services.observer.grpc_api import SERVICE_NAME, ObserverServicer
from services.observer.handlers import ObserverHandlers
from services.observer.settings import ObserverSettings
from stablealign.core.config import load_settings
from stablealign.nats import subjects
from stablealign.sandbox.worlds import WorldSpecCache
from stablealign.serving.service import ServiceContext, ServiceParts
from stablealign.v1 import observer_pb2, observer_pb2_grpc

SETTINGS = ObserverSettings


async def build(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings if isinstance(ctx.settings, ObserverSettings) else load_settings(
        ObserverSettings, dict(vars(ctx.settings)))
    handlers = ObserverHandlers(settings, WorldSpecCache(ctx.js, max_worlds=settings.max_worlds))
    await ctx.requests.add(subjects.OBSERVER_RATE, observer_pb2.RateRequest, handlers.rate, "Rate", batch=True)
    return ServiceParts(grpc=[(observer_pb2_grpc.add_ObserverServiceServicer_to_server,
                               ObserverServicer(handlers), SERVICE_NAME)])
