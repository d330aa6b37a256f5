"""Per-method authorization of gRPC calls by the caller's client certificate (issue 19, item 4).

mTLS alone proves only that the CA signed the caller's certificate: every holder could then call every
method, so CreateWorld and SubmitJob would bypass the NATS role split (the ``cli`` NATS user may create
worlds, but a read-only tool with a certificate must not). ``GRPC_METHOD_CALLERS`` names, per method, the
certificate common names allowed to call it; anything else gets PERMISSION_DENIED before the handler runs,
counted under that code and logged with the caller's name and the method.

Why the common name: cert-manager's ``commonName`` is the one field an operator sets per client
certificate (deploy/k8s/components/grpc-tls). Health and reflection stay open to every certificate the CA
signed: they reveal only status and the API's shape, and the plaintext health port serves health anyway.
The table is read at start-up (``stablealign.serving.tls.GrpcServerTlsSettings``); an empty one keeps every method
open to every client certificate, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from stablealign.core import metrics
from stablealign.core.logs import get_logger

log = get_logger(__name__)

# Services every authenticated caller may use: status and the API's shape, no data.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
ANY_OTHER = "*"


def caller_names(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    """The common names of the caller's verified certificate; () without one (plaintext or plain TLS)."""
    auth = context.auth_context() or {}
    return tuple(value.decode("utf-8", "replace") for value in auth.get("x509_common_name", []))


def allowed_callers(table: Mapping[str, Sequence[str]], method: str) -> frozenset[str]:
    """Who may call ``method`` (its short name, e.g. ``CreateWorld``): its own entry, else ``*``'s, else nobody."""
    return frozenset(table.get(method, table.get(ANY_OTHER, ())))


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose certificate's common name the table does not list for its method."""

    def __init__(self, service: str, table: Mapping[str, Sequence[str]]) -> None:
        self.service = service
        self.table = {method: tuple(names) for method, names in table.items()}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        _, service_name, method = handler_call_details.method.split("/", 2)
        if service_name in OPEN_SERVICES:
            return handler
        allowed = allowed_callers(self.table, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary, method, allowed),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream, method, allowed),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        # No method of ours streams requests; one added later stays closed (UNIMPLEMENTED) until this guards it.
        return None

    async def _check(self, context: grpc.aio.ServicerContext, method: str, allowed: frozenset[str]) -> None:
        names = caller_names(context)
        if allowed.intersection(names):
            return
        metrics.REQUESTS.labels(self.service, method, "grpc", grpc.StatusCode.PERMISSION_DENIED.name).inc()
        log.warning("grpc.caller_refused", extra={"service": self.service, "method": method,
                                                  "caller": ",".join(names) or "(no certificate)"})
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{method}: the client certificate {names[0] if names else '(none)'!r} may not call it")

    def _guard_unary(self, behaviour: Callable[..., Any], method: str, allowed: frozenset[str]):
        async def guarded(request, context):
            await self._check(context, method, allowed)
            return await behaviour(request, context)

        return guarded

    def _guard_stream(self, behaviour: Callable[..., Any], method: str, allowed: frozenset[str]):
        async def guarded(request, context):
            await self._check(context, method, allowed)
            async for item in behaviour(request, context):
                yield item

        return guarded


def authorization_interceptors(service: str, table: Mapping[str, Sequence[str]]) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor for ``start_grpc_server`` (none when the table is empty: every client may call)."""
    return [AuthorizationInterceptor(service, table)] if table else []
