"""gRPC bootstrap: one ``grpc.aio`` server per service with health, reflection and error mapping.

The interceptor is what keeps a bad request from ever becoming a crash or a leaked traceback:
validation errors become INVALID_ARGUMENT, missing things NOT_FOUND, and anything unexpected is
logged here and returned as a bare INTERNAL.

TLS (``stablealign.serving.tls``): with a certificate and key the port speaks only TLS, and with a client CA
only to clients holding a certificate it signed (mTLS). Probes that cannot do TLS (the kubelet's
``grpc:`` probe) get an optional second, plaintext port that serves ``grpc.health.v1`` and nothing
else. Clients open channels with ``client_channel``, which reads ``STABLEALIGN_GRPC_CA`` and
``STABLEALIGN_GRPC_CLIENT_CERT``/``_KEY``.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import Field, model_validator

from stablealign.core import metrics
from stablealign.core.config import Settings, load_settings
from stablealign.core.errors import (
    BackendError,
    ConflictError,
    LLMRequestError,
    NotFoundError,
    PayloadTooLargeError,
    StableAlignError,
    UnavailableError,
    ValidationError,
)
from stablealign.core.logs import get_logger
from stablealign.serving.tls import TlsMaterial, env_name, read_pem

log = get_logger(__name__)

STATUS_BY_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (LLMRequestError, grpc.StatusCode.FAILED_PRECONDITION),  # the LLM refused the request: retrying won't help
    (BackendError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps our typed errors to gRPC status codes and counts requests per method and code."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        # The request arrives as bytes and is decoded inside the wrapper: a deserializer that raises in
        # gRPC's core becomes UNKNOWN plus an ERROR traceback per request; here it is INVALID_ARGUMENT.
        decode = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, StableAlignError):
            log.exception("grpc.handler_failed", extra={"service": self.service, "method": method})
            detail = "internal error"
        else:
            detail = str(exc)
        metrics.REQUESTS.labels(self.service, method, "grpc", code.name).inc()
        await context.abort(code, detail)

    def _wrap_unary(self, behaviour: Callable[..., Awaitable[Any]], method: str, decode: Callable[[bytes], Any] | None):
        async def wrapped(raw, context):
            started = time.perf_counter()
            try:
                response = await behaviour(decode_request(raw, decode, method), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, exc, method)
                raise  # unreachable: abort raises
            finally:
                metrics.REQUEST_SECONDS.labels(self.service, method, "grpc").observe(time.perf_counter() - started)
            metrics.REQUESTS.labels(self.service, method, "grpc", "OK").inc()
            return response

        return wrapped

    def _wrap_stream(self, behaviour, method: str, decode: Callable[[bytes], Any] | None):
        async def wrapped(raw, context):
            try:
                async for item in behaviour(decode_request(raw, decode, method), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, exc, method)
            else:
                metrics.REQUESTS.labels(self.service, method, "grpc", "OK").inc()

        return wrapped


def decode_request(raw: Any, decode: Callable[[bytes], Any] | None, method: str) -> Any:
    """The request message from its bytes; ValidationError (-> INVALID_ARGUMENT) when they do not parse."""
    if decode is None or not isinstance(raw, bytes | bytearray):
        return raw
    try:
        return decode(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, others may raise anything
        raise ValidationError(f"malformed {method} request: {len(raw)} bytes that are not a valid message "
                              f"({type(exc).__name__})") from None


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    tls: bool = False
    # The plaintext health-only server for probes (TLS on and grpc_health_port >= 0), else None.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def stop(self, grace: float) -> None:
        # Tell load balancers first, then finish in-flight calls.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)


def server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """TLS credentials; with a CA, a client certificate signed by it is required (mTLS)."""
    assert tls.certificate is not None and tls.private_key is not None
    return grpc.ssl_server_credentials([(tls.private_key, tls.certificate)], root_certificates=tls.ca,
                                       require_client_auth=tls.ca is not None)


def _bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
        return 0


class HealthPortError(OSError):
    """The plaintext health-only port (``health_port``) could not be bound, not the API port: a busy
    probe port must name ``STABLEALIGN_GRPC_HEALTH_PORT``, not the gRPC port an operator would check."""


async def start_grpc_server(
    *,
    service: str,
    registrations: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 1 << 20,
    max_concurrent_rpcs: int | None = None,
    tls: TlsMaterial | None = None,
    health_port: int = -1,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> GrpcServer:
    """Starts a server with the given servicers plus health and reflection.

    ``registrations`` holds ``(add_XServicer_to_server, servicer, full_service_name)`` triples.
    ``tls``: serve TLS only (mTLS when it holds a CA); then ``health_port`` >= 0 also opens a plaintext
    port with the health service alone, for probes. Raises ``OSError`` (``errno`` ``EADDRINUSE`` for a
    busy port) when an address cannot be bound; ``HealthPortError`` when it is the health port's, so the
    error names the right setting.
    """
    for wanted, health_only in ((port, False), (health_port if tls else 0, True)):
        if wanted > 0:  # fail with the reason before gRPC's core logs its own multi-line complaint
            problem = bind_problem(host, wanted)
            if problem is not None:
                raise HealthPortError(problem.errno, problem.strerror) if health_only else problem
    server = grpc.aio.server(
        # ``interceptors`` first (authorization refuses before any handler or error mapping runs).
        interceptors=[*interceptors, ErrorInterceptor(service)],
        # Beyond this many calls at once new ones get RESOURCE_EXHAUSTED instead of piling up.
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    for add, servicer, full_name in registrations:
        add(servicer, server)
        names.append(full_name)
        await health.set(full_name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    bound = _bind(server, host, port, server_credentials(tls) if tls else None)
    if bound == 0:
        await server.stop(None)
        raise (bind_problem(host, port) if port else None) or OSError(
            errno.EADDRNOTAVAIL, f"cannot bind gRPC server to {host}:{port}")
    health_server, health_bound = None, None
    if tls is not None and health_port >= 0:
        # Same health servicer (so both ports report the same status, graceful shutdown included), no API.
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_bound = _bind(health_server, host, health_port, None)
        if health_bound == 0:
            await server.stop(None)
            problem = bind_problem(host, health_port) if health_port else None
            raise HealthPortError(problem.errno, problem.strerror) if problem is not None else HealthPortError(
                errno.EADDRNOTAVAIL, f"cannot bind gRPC health port to {host}:{health_port}")
        await health_server.start()
    await server.start()
    log.info("grpc.started", extra={"service": service, "port": bound, "tls": tls is not None,
                                    "mtls": bool(tls and tls.ca), "health_port": health_bound})
    return GrpcServer(server=server, port=bound, health=health, tls=tls is not None, health_server=health_server,
                      health_port=health_bound)


class GrpcClientTlsSettings(Settings):
    """A gRPC client's TLS: ``STABLEALIGN_GRPC_CA``, ``STABLEALIGN_GRPC_CLIENT_CERT``/``_KEY``."""

    grpc_ca: str = Field("", description="PEM CA bundle to trust for the server's certificate (\"\": plaintext "
                                         "unless a client certificate is set, then the system's roots).")
    grpc_client_cert: str = Field("", description="PEM client certificate (mTLS); with grpc_client_key.")
    grpc_client_key: str = Field("", description="PEM private key of grpc_client_cert.")

    @model_validator(mode="after")
    def _tls_is_complete(self) -> GrpcClientTlsSettings:
        if bool(self.grpc_client_cert) != bool(self.grpc_client_key):
            have, missing = (("grpc_client_cert", "grpc_client_key") if self.grpc_client_cert
                             else ("grpc_client_key", "grpc_client_cert"))
            raise ValueError(f"{env_name(have)} is set but {env_name(missing)} is not: a client certificate "
                             "needs its private key")
        self.material()  # every file readable and PEM, now
        return self

    def material(self) -> TlsMaterial | None:
        """What the channel's credentials take (None: plaintext)."""
        if not (self.grpc_ca or self.grpc_client_cert):
            return None
        return TlsMaterial(
            certificate=read_pem(self.grpc_client_cert, "grpc_client_cert") if self.grpc_client_cert else None,
            private_key=read_pem(self.grpc_client_key, "grpc_client_key") if self.grpc_client_key else None,
            ca=read_pem(self.grpc_ca, "grpc_ca") if self.grpc_ca else None)


def client_channel(target: str, settings: GrpcClientTlsSettings | None = None,
                   options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` (``host:port``): TLS when the settings (default: ``STABLEALIGN_GRPC_CA``,
    ``STABLEALIGN_GRPC_CLIENT_CERT``/``_KEY`` from the environment) name a CA or a client certificate,
    plaintext otherwise. ConfigError, one line, for a half-configured or unreadable setting."""
    settings = settings if settings is not None else load_settings(GrpcClientTlsSettings)
    material = settings.material()
    if material is None:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=material.ca, private_key=material.private_key,
                                               certificate_chain=material.certificate)
    return grpc.aio.secure_channel(target, credentials, options=options)


def bind_problem(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` (e.g. ``EADDRINUSE``), or None if it could now.

    Binds and closes a probe socket the way servers do (``SO_REUSEADDR``), for every address
    ``host`` resolves to.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r} ({exc.strerror})")
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            return exc
    return None
