"""Entry of the world service for `stable-align serve world` and in-process runs.

``build`` registers the NATS handlers (sandbox.world.create|get|list|cancel|resume, queue group
"world"), the gRPC WorldService, the background resume of unfinished worlds, and a stop hook
that lets in-flight interactions finish before releasing this replica's worlds.
"""

from __future__ import annotations

from services.world.grpc_api import SERVICE_NAME, WorldServicer
from services.world.manager import WorldManager
from services.world.settings import WorldSettings
from services.world.streams import declare_streams
from stablealign.nats import subjects
from stablealign.serving.service import ServiceContext, ServiceParts
from stablealign.v1 import world_pb2, world_pb2_grpc

SETTINGS = WorldSettings


async def build(ctx: ServiceContext) -> ServiceParts:
    settings: WorldSettings = ctx.settings
    await declare_streams(ctx.js)  # the world owns its streams and bucket: created before anything uses them
    manager = WorldManager(ctx.nc, ctx.js, settings)

    async def create(req: world_pb2.CreateWorldRequest) -> world_pb2.World:
        return await manager.create(req.spec)

    async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
        return await manager.get(req.world_id)

    async def list_worlds(req: world_pb2.ListWorldsRequest) -> world_pb2.ListWorldsResponse:
        return world_pb2.ListWorldsResponse(worlds=await manager.list())

    async def cancel(req: world_pb2.CancelWorldRequest) -> world_pb2.World:
        return await manager.cancel(req.world_id)

    await ctx.requests.add(subjects.WORLD_CREATE, world_pb2.CreateWorldRequest, create, "CreateWorld")
    await ctx.requests.add(subjects.WORLD_GET, world_pb2.GetWorldRequest, get, "GetWorld")
    await ctx.requests.add(subjects.WORLD_LIST, world_pb2.ListWorldsRequest, list_worlds, "ListWorlds")
    await ctx.requests.add(subjects.WORLD_CANCEL, world_pb2.CancelWorldRequest, cancel, "CancelWorld")

    async def resume(req: world_pb2.ResumeWorldRequest) -> world_pb2.World:
        return await manager.resume(req.world_id)

    await ctx.requests.add(subjects.WORLD_RESUME, world_pb2.ResumeWorldRequest, resume, "ResumeWorld")

    async def stop() -> None:
        await manager.shutdown(settings.shutdown_grace_seconds)

    return ServiceParts(
        grpc=[(world_pb2_grpc.add_WorldServiceServicer_to_server, WorldServicer(manager), SERVICE_NAME)],
        on_stop=[stop],
        background=[manager.resume_forever],
    )
