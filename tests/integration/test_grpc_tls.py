"""gRPC over TLS and mTLS with certificates made in the test: real servers, real handshakes.

A TLS call works; a plaintext client, or one trusting another CA, is refused; with mTLS a client
without a certificate is refused and one with the client certificate works; probes get a plaintext
port that serves health and nothing else; a half-configured TLS fails at start in one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stablealign.core.config import load_settings
from stablealign.core.errors import ConfigError
from stablealign.serving.rpc import GrpcClientTlsSettings, client_channel, start_grpc_server
from stablealign.serving.settings import ServiceSettings
from stablealign.serving.tls import TlsMaterial
from tests.support.certs import TestCertificates, make_certificates

CHECK = health_pb2.HealthCheckRequest(service="")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def server_tls(certs: TestCertificates, *, mtls: bool = False) -> TlsMaterial:
    settings = ServiceSettings(grpc_tls_cert=str(certs.server_cert), grpc_tls_key=str(certs.server_key),
                               grpc_tls_client_ca=str(certs.ca) if mtls else "")
    material = settings.grpc_server_tls()
    assert material is not None
    return material


def client(**fields: str) -> GrpcClientTlsSettings:
    return load_settings(GrpcClientTlsSettings, fields, environ={})


async def health(channel: grpc.aio.Channel) -> int:
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=5)
        return reply.status


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(channel)
    return caught.value.code()


async def test_tls_call_works_and_plaintext_or_a_stranger_ca_is_refused(certs):
    server = await start_grpc_server(service="tls-test", registrations=[], tls=server_tls(certs))
    target = f"localhost:{server.port}"
    try:
        assert server.tls and server.health_server is None
        assert await health(client_channel(target, client(grpc_ca=str(certs.ca)))) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(client_channel(target, client())) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert await refused(client_channel(target, client(grpc_ca=str(certs.other_ca)))) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_mtls_requires_a_client_certificate_from_the_ca(certs, tmp_path):
    server = await start_grpc_server(service="mtls-test", registrations=[], tls=server_tls(certs, mtls=True),
                                     health_port=0)
    target = f"127.0.0.1:{server.port}"
    try:
        assert await refused(client_channel(target, client(grpc_ca=str(certs.ca)))) == grpc.StatusCode.UNAVAILABLE
        stranger = make_certificates(tmp_path / "stranger")  # a client certificate from another CA
        assert await refused(client_channel(target, client(
            grpc_ca=str(certs.ca), grpc_client_cert=str(stranger.client_cert),
            grpc_client_key=str(stranger.client_key)))) == grpc.StatusCode.UNAVAILABLE
        mutual = client(grpc_ca=str(certs.ca), grpc_client_cert=str(certs.client_cert),
                        grpc_client_key=str(certs.client_key))
        assert await health(client_channel(target, mutual)) == health_pb2.HealthCheckResponse.SERVING
        # The probes' port: plaintext, health only (reflection and every API are on the TLS port alone).
        probe = f"127.0.0.1:{server.health_port}"
        assert await health(client_channel(probe, client())) == health_pb2.HealthCheckResponse.SERVING
        async with client_channel(probe, client()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                    b"", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
    assert await refused(client_channel(probe, client())) == grpc.StatusCode.UNAVAILABLE  # closed with the server


async def test_a_service_serves_its_api_over_mtls(certs, nats_url):
    """The world service as deployed: NATS + gRPC with mTLS; its API answers a client with the certificate."""
    from services.world import main
    from stablealign.serving.service import start_service
    from stablealign.v1 import world_pb2, world_pb2_grpc

    settings = load_settings(main.SETTINGS, {
        "nats_url": nats_url, "grpc_port": 0, "metrics_port": -1, "grpc_tls_cert": str(certs.server_cert),
        "grpc_tls_key": str(certs.server_key), "grpc_tls_client_ca": str(certs.ca), "grpc_health_port": 0}, environ={})
    running = await start_service("world", settings, main.build)
    try:
        environ = {"STABLEALIGN_GRPC_CA": str(certs.ca), "STABLEALIGN_GRPC_CLIENT_CERT": str(certs.client_cert),
                   "STABLEALIGN_GRPC_CLIENT_KEY": str(certs.client_key)}
        tls = load_settings(GrpcClientTlsSettings, environ=environ)
        async with client_channel(f"localhost:{running.grpc_port}", tls) as channel:
            reply = await world_pb2_grpc.WorldServiceStub(channel).ListWorlds(world_pb2.ListWorldsRequest(), timeout=10)
            assert list(reply.worlds) == []
        assert await refused(client_channel(f"localhost:{running.grpc_port}", client())) == grpc.StatusCode.UNAVAILABLE
        assert await health(client_channel(f"127.0.0.1:{running.grpc.health_port}", client())) == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(grace=1.0)


def test_half_configured_tls_fails_in_one_line_naming_the_variable(certs, tmp_path):
    cases = [
        (dict(grpc_tls_cert=str(certs.server_cert)), "STABLEALIGN_GRPC_TLS_CERT is set but STABLEALIGN_GRPC_TLS_KEY is not"),
        (dict(grpc_tls_key=str(certs.server_key)), "STABLEALIGN_GRPC_TLS_KEY is set but STABLEALIGN_GRPC_TLS_CERT is not"),
        (dict(grpc_tls_client_ca=str(certs.ca)), "STABLEALIGN_GRPC_TLS_CLIENT_CA is set but"),
        (dict(grpc_tls_cert=str(tmp_path / "missing.pem"), grpc_tls_key=str(certs.server_key)),
         "STABLEALIGN_GRPC_TLS_CERT=.*missing.pem.*cannot read it"),
        (dict(grpc_tls_cert=str(certs.server_cert), grpc_tls_key=__file__), "STABLEALIGN_GRPC_TLS_KEY=.*not a PEM file"),
    ]
    for fields, match in cases:
        with pytest.raises(ConfigError, match=match) as caught:
            load_settings(ServiceSettings, fields, environ={})
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="STABLEALIGN_GRPC_CLIENT_CERT is set but STABLEALIGN_GRPC_CLIENT_KEY is not"):
        client(grpc_client_cert=str(certs.client_cert))
    with pytest.raises(ConfigError, match="STABLEALIGN_GRPC_CA=.*cannot read it"):
        load_settings(GrpcClientTlsSettings, environ={"STABLEALIGN_GRPC_CA": str(tmp_path / "nope.pem")})
    # The command line: exit 2 and one line, before anything listens.
    cli = Path(sys.executable).parent / "stable-align"
    proc = subprocess.run([str(cli), "serve", "agent", "--grpc-tls-cert", str(certs.server_cert)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "STABLEALIGN_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: STABLEALIGN_GRPC_TLS_CERT is set but STABLEALIGN_GRPC_TLS_KEY is not: TLS needs both the "
        "certificate and its private key"]
