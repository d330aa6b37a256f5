"""Per-method authorization by the caller's client certificate, on a real gRPC server over real mTLS.

The server is ``rpc.start_grpc_server`` with the world's generated service and a servicer that counts what
reaches it; the callers hold certificates of one CA that differ only in their common name. Refused calls
must get PERMISSION_DENIED and never reach the servicer; health stays open to every certificate.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stablealign.serving.grpc_authz import (
    AuthorizationInterceptor,
    allowed_callers,
    authorization_interceptors,
)
from stablealign.serving.rpc import start_grpc_server
from stablealign.serving.tls import TlsMaterial
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc
from tests.support.certs import make_ca_with_clients

TABLE = {"CreateWorld": ["operator"], "GetWorld": ["operator", "viewer"], "StreamInteractions": ["operator", "viewer"]}


class CountingWorld(world_pb2_grpc.WorldServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def CreateWorld(self, request, context):  # noqa: N802 - generated name
        self.calls.append("CreateWorld")
        return world_pb2.World()

    async def GetWorld(self, request, context):  # noqa: N802
        self.calls.append("GetWorld")
        return world_pb2.World()

    async def ListWorlds(self, request, context):  # noqa: N802
        self.calls.append("ListWorlds")
        return world_pb2.ListWorldsResponse()

    async def StreamInteractions(self, request, context):  # noqa: N802
        self.calls.append("StreamInteractions")
        yield common_pb2.InteractionRecord()


def test_the_table_names_callers_per_method_and_star_for_the_rest():
    assert allowed_callers({"CreateWorld": ["operator"], "*": ["viewer"]}, "CreateWorld") == {"operator"}
    assert allowed_callers({"CreateWorld": ["operator"], "*": ["viewer"]}, "GetWorld") == {"viewer"}
    assert allowed_callers({"CreateWorld": ["operator"]}, "GetWorld") == frozenset()  # unlisted: nobody
    assert authorization_interceptors("world", {}) == []  # no table: mTLS alone, as before
    assert isinstance(authorization_interceptors("world", TABLE)[0], AuthorizationInterceptor)


@pytest.fixture
async def world_server(tmp_path):
    folder = make_ca_with_clients(tmp_path, "operator", "viewer", "stranger")
    tls = TlsMaterial(certificate=(folder / "tls.crt").read_bytes(), private_key=(folder / "tls.key").read_bytes(),
                      ca=(folder / "ca.crt").read_bytes())
    servicer = CountingWorld()
    server = await start_grpc_server(
        service="world", registrations=[(world_pb2_grpc.add_WorldServiceServicer_to_server, servicer,
                                         "stablealign.v1.WorldService")],
        host="127.0.0.1", port=0, tls=tls, interceptors=authorization_interceptors("world", TABLE))

    def channel(name: str) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(folder / "ca.crt").read_bytes(), private_key=(folder / f"{name}.key").read_bytes(),
            certificate_chain=(folder / f"{name}.crt").read_bytes())
        return grpc.aio.secure_channel(f"localhost:{server.port}", credentials)

    try:
        yield servicer, channel
    finally:
        await server.stop(0)


async def _create(channel):
    return await world_pb2_grpc.WorldServiceStub(channel).CreateWorld(world_pb2.CreateWorldRequest(), timeout=5)


async def _stream(channel):
    call = world_pb2_grpc.WorldServiceStub(channel).StreamInteractions(world_pb2.StreamInteractionsRequest(), timeout=5)
    return [item async for item in call]


async def test_each_caller_gets_exactly_the_methods_the_table_gives_it(world_server):
    servicer, channel = world_server
    async with channel("operator") as operator:
        await _create(operator)
        assert len(await _stream(operator)) == 1
    assert servicer.calls == ["CreateWorld", "StreamInteractions"]
    async with channel("viewer") as viewer:
        await world_pb2_grpc.WorldServiceStub(viewer).GetWorld(world_pb2.GetWorldRequest(), timeout=5)
        assert len(await _stream(viewer)) == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _create(viewer)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "viewer" in refused.value.details()
    assert servicer.calls == ["CreateWorld", "StreamInteractions", "GetWorld", "StreamInteractions"]
    async with channel("stranger") as stranger:
        for call in (_create, _stream,
                     lambda c: world_pb2_grpc.WorldServiceStub(c).ListWorlds(world_pb2.ListWorldsRequest(), timeout=5)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(stranger)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Health stays open to any certificate of the CA.
        reply = await health_pb2_grpc.HealthStub(stranger).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.calls == ["CreateWorld", "StreamInteractions", "GetWorld", "StreamInteractions"]  # nothing new
