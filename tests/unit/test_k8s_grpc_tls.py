"""The gpu overlay serves gRPC only over mutual TLS, health alone in plaintext (issue 19, item 4).

First what the render says: every service's API port has a certificate, its key and a client CA from a
cert-manager Certificate signed by the namespace's gRPC CA, every method names the client certificates that
may call it (tests/unit/test_grpc_authz.py runs that table's enforcement), and the probes use the
health-only port. Then
what a server started from exactly those variables does (the Secret's files generated here): a plaintext
client and a TLS client without a certificate get nothing from the API port; a client with a certificate of
that CA does; the plaintext port answers health and nothing else.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.certs import make_secret_layout
from tests.support.kustomize import K8S, KUBECTL, container, env_of, find, one, render_dir

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (CI installs it): cannot render")

SERVICES = ("agent", "observer", "world", "trainer")
TARGETS = {"top": K8S, "gpu": K8S / "overlays" / "gpu"}


def _secret_of(doc: dict, mount_path: str) -> str:
    pod = doc["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"]


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_service_serves_grpc_with_client_certificates_from_the_namespace_ca(target):
    docs = render_dir(TARGETS[target])
    certificates = {c["spec"]["secretName"]: c["spec"] for c in find(docs, "Certificate")}
    issuers = {i["metadata"]["name"]: i["spec"] for i in find(docs, "Issuer")}
    for name in SERVICES:
        deployment = one(docs, "Deployment", name)
        c = container(deployment, name)
        env = env_of(c)
        folder = env["STABLEALIGN_GRPC_TLS_CERT"].rsplit("/", 1)[0]
        assert env["STABLEALIGN_GRPC_TLS_KEY"] == f"{folder}/tls.key"
        assert env["STABLEALIGN_GRPC_TLS_CLIENT_CA"] == f"{folder}/ca.crt"  # mTLS: clients need a certificate
        # Probes on the plaintext health-only port, which the Service does not expose.
        health = int(env["STABLEALIGN_GRPC_HEALTH_PORT"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc-health"] == health != int(env["STABLEALIGN_GRPC_PORT"]) == ports["grpc"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == health, (name, probe)
        assert health not in {p["targetPort"] for p in one(docs, "Service", name)["spec"]["ports"]} | {"grpc-health"}
        # The Secret is a cert-manager Certificate for the Service's name, from the CA issuer.
        spec = certificates[_secret_of(deployment, folder)]
        assert name in spec["dnsNames"] and f"{name}.stablealign.svc" in spec["dnsNames"]
        assert spec["usages"] == ["digital signature", "server auth"] and not spec.get("isCA")
        assert issuers[spec["issuerRef"]["name"]] == {"ca": {"secretName": "grpc-ca"}}
    ca = certificates["grpc-ca"]
    assert ca["isCA"] is True and "selfSigned" in issuers[ca["issuerRef"]["name"]]
    # Operators' and read-only tools get client certificates from the same CA.
    for secret in ("grpc-client-operator", "grpc-client-viewer"):
        client = certificates[secret]
        assert client["usages"] == ["digital signature", "client auth"]
        assert issuers[client["issuerRef"]["name"]] == {"ca": {"secretName": "grpc-ca"}}


MUTATING = {"CreateWorld", "CancelWorld", "ResumeWorld", "SubmitJob", "CancelJob", "Draft", "Feedback", "Revise", "Rate"}


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_method_names_its_callers_and_only_the_operator_changes_anything(target):
    """Each service's table lists every method of its gRPC service (a method left out is refused to all, a
    "*" would open new methods silently) by common names of client certificates the render issues."""
    import importlib

    from stablealign.serving.tls import GrpcServerTlsSettings

    docs = render_dir(TARGETS[target])
    issued = {c["spec"]["commonName"] for c in find(docs, "Certificate")
              if "client auth" in c["spec"].get("usages", [])}
    assert issued == {"operator", "viewer"}
    for name in SERVICES:
        env = env_of(container(one(docs, "Deployment", name), name))
        table = GrpcServerTlsSettings.model_construct(
            grpc_method_callers=env["STABLEALIGN_GRPC_METHOD_CALLERS"]).method_callers()
        (service,) = importlib.import_module(f"stablealign.v1.{name}_pb2").DESCRIPTOR.services_by_name.values()
        assert set(table) == {m.name for m in service.methods}, name
        for method, callers in table.items():
            assert set(callers) <= issued, (name, method)
            assert set(callers) == ({"operator"} if method in MUTATING else {"operator", "viewer"}), (name, method)


def _health_call(channel: grpc.aio.Channel):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


@needs_kubectl
async def test_a_server_from_the_rendered_variables_refuses_clients_without_a_certificate(tmp_path):
    from stablealign.core.config import env_name
    from stablealign.serving.grpc_authz import authorization_interceptors
    from stablealign.serving.rpc import start_grpc_server
    from stablealign.serving.tls import GrpcServerTlsSettings

    world = env_of(container(one(render_dir(TARGETS["gpu"]), "Deployment", "world"), "world"))
    secret = make_secret_layout(tmp_path / "secret")  # tls.crt, tls.key, ca.crt: the Secret's keys
    fields = {}
    for field in GrpcServerTlsSettings.model_fields:
        value = world[env_name(field)]
        fields[field] = value.replace("/etc/stablealign/grpc-tls", str(secret)) if value.startswith("/") else value
    settings = GrpcServerTlsSettings(**{**fields, "grpc_health_port": 0})  # 50052 moved to a free port
    tls = settings.grpc_server_tls()
    assert tls is not None and tls.ca is not None and settings.method_callers()
    server = await start_grpc_server(service="world", registrations=[], host="127.0.0.1", port=0, tls=tls,
                                     health_port=settings.grpc_health_port,
                                     interceptors=authorization_interceptors("world", settings.method_callers()))
    ca, cert, key = ((secret / f).read_bytes() for f in ("ca.crt", "tls.crt", "tls.key"))
    api = f"localhost:{server.port}"
    try:
        async with grpc.aio.insecure_channel(api) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await _health_call(channel)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(api, grpc.ssl_channel_credentials(root_certificates=ca)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await _health_call(channel)
        assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
        with_certificate = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        async with grpc.aio.secure_channel(api, with_certificate) as channel:
            assert (await _health_call(channel)).status == health_pb2.HealthCheckResponse.SERVING
        # The plaintext port: health for the kubelet, nothing else (not even reflection).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            assert (await _health_call(channel)).status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as reflection:
                async for _ in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                         timeout=5):
                    pass
            assert reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
