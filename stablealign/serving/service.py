"""The life of a service process: connect, serve (NATS + gRPC + /metrics), drain on SIGTERM.

Every service (agent, observer, world, trainer) is a ``build`` coroutine that registers its
NATS handlers and returns its gRPC servicers; this module owns everything around it, so a
service folder holds only its own logic. ``start_service`` is also how `stable-align run`
and the tests run several services inside one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stablealign.core.errors import ConfigError
from stablealign.core.logs import get_logger
from stablealign.core.metrics import REQUESTS_IN_FLIGHT, MetricsServer, serve_metrics
from stablealign.core.process import settle_heap, setup_process  # noqa: F401 - settle_heap re-exported (embedded stack)
from stablealign.core.redaction import redact_url
from stablealign.nats import client as nats_client
from stablealign.nats import streams
from stablealign.nats.auth import NatsClientOptions
from stablealign.nats.discovery import Discovery, start_discovery
from stablealign.nats.server import RequestServer
from stablealign.serving.grpc_authz import authorization_interceptors
from stablealign.serving.rpc import GrpcServer, HealthPortError, start_grpc_server
from stablealign.serving.settings import ServiceSettings

log = get_logger(__name__)

T = TypeVar("T")
_JS_TIMEOUT_SECONDS = 10.0  # each JetStream API call of a service


@dataclass
class ServiceContext:
    """What ``build`` gets: settings, the NATS connection, the JetStream API of the world's streams (``js``: the
    world's own, or the agents' and observers' reads of it; ``jetstream`` for the trainer's) and the NATS request
    server."""

    name: str
    settings: Any  # a ServiceSettings subclass
    nc: NATS
    js: JetStreamContext
    requests: RequestServer

    def jetstream(self, owner: str) -> JetStreamContext:
        """The JetStream API of ``owner``'s streams (world or trainer) as this service's NATS user reaches it
        (``nats_client.jetstream``)."""
        return nats_client.jetstream(self.nc, owner, timeout=_JS_TIMEOUT_SECONDS)


@dataclass
class ServiceParts:
    """What ``build`` returns: gRPC registrations and clean-up to run after draining."""

    grpc: list[tuple[Callable, Any, str]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Started after gRPC is up (e.g. the world service's resume of unfinished worlds).
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass
class RunningService:
    name: str
    context: ServiceContext
    parts: ServiceParts
    grpc: GrpcServer | None
    metrics_port: int | None
    tasks: list[asyncio.Task] = field(default_factory=list)
    stopped: bool = False
    metrics: MetricsServer | None = None
    discovery: Discovery | None = None

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port if self.grpc else None

    async def stop(self, grace: float | None = None) -> None:
        """Drains: stop taking NATS requests and gRPC calls, finish in-flight work, close."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.context.settings.shutdown_grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace  # one budget for the whole drain, so the pod's grace period holds
        log.info("service.draining", extra={"service": self.name, "inflight": self.context.requests.inflight})
        if self.discovery:  # leaving: `nats micro ls` stops listing this replica
            await self.discovery.stop()
        for task in self.tasks:  # background loops (e.g. resume scans) start nothing new from here on
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

        # Intake stops at once on both transports while the service's own work (e.g. a world's
        # scheduler) winds down: in parallel, not one full grace period after another.
        phases = [self.context.requests.drain(grace), _run_stop_hooks(self.name, self.parts.on_stop)]
        if self.grpc:
            phases.append(self.grpc.stop(grace))
        try:
            await asyncio.wait_for(asyncio.gather(*phases, return_exceptions=True),
                                   timeout=max(deadline - loop.time(), 0.1) + 1.0)
        except TimeoutError:
            log.warning("service.drain_timeout", extra={"service": self.name, "grace_s": grace})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.context.nc.drain(), timeout=max(deadline - loop.time(), 1.0))
        # A drain that could not run (NATS away: the client is still reconnecting) leaves the connection and
        # its reconnect loop alive, which would keep the process from exiting: closed here, whatever happened.
        await _close_nats(self.context.nc)
        if self.metrics:  # last: a scrape during the drain still sees it
            await asyncio.to_thread(self.metrics.stop)
        log.info("service.stopped", extra={"service": self.name})


async def start_service(name: str, settings: ServiceSettings,
                        build: Callable[[ServiceContext], Awaitable[ServiceParts]]) -> RunningService:
    """Connects, builds the service and opens its ports; returns it serving.

    A step that fails (a busy port, ``build`` raising, a cancel) closes what the steps before it
    opened, in reverse order, before the error propagates: nothing leaks into the process or NATS.
    A port that cannot be bound raises ``ConfigError`` naming the port and the setting.
    """
    async with contextlib.AsyncExitStack() as opened:
        instance = f"-{settings.instance}" if settings.instance else ""
        nc = await nats_client.connect(settings.nats_url, name=f"stablealign-{name}{instance}",
                                       options=NatsClientOptions.from_settings(settings))
        opened.push_async_callback(_close_nats, nc)
        js = nats_client.jetstream(nc, "world", timeout=_JS_TIMEOUT_SECONDS)
        # The limits of the streams this process creates. Only the owner of a stream creates it, in its
        # ``build`` (services/world/streams.py, services/trainer/streams.py): the others' NATS users may
        # only read them (stablealign/nats/permissions.py).
        streams.configure(settings)
        requests = RequestServer(nc, service=name, queue=name, max_concurrency=settings.max_concurrency,
                                     max_request_bytes=settings.max_request_bytes,
                                     max_queued=settings.max_queued_requests)
        # Read at scrape time: the autoscaler's measure of pending work, at no cost on the request path.
        REQUESTS_IN_FLIGHT.labels(name).set_function(lambda: requests.inflight)
        opened.push_async_callback(requests.drain, 0.0)
        context = ServiceContext(name=name, settings=settings, nc=nc, js=js, requests=requests)
        parts = await build(context)
        opened.push_async_callback(_run_stop_hooks, name, parts.on_stop)
        grpc_server = None
        if settings.grpc_port >= 0:
            try:
                grpc_server = await start_grpc_server(
                    service=name, registrations=parts.grpc, host=settings.grpc_host, port=settings.grpc_port,
                    max_request_bytes=settings.max_request_bytes, max_concurrent_rpcs=settings.max_concurrency,
                    tls=settings.grpc_server_tls(), health_port=settings.grpc_health_port,
                    interceptors=authorization_interceptors(name, settings.method_callers()))
            except HealthPortError as exc:
                raise _listen_error("gRPC health", settings.grpc_host, settings.grpc_health_port, "grpc-health",
                                    exc) from None
            except OSError as exc:
                raise _listen_error("gRPC", settings.grpc_host, settings.grpc_port, "grpc", exc) from None
            opened.push_async_callback(grpc_server.stop, 0.0)
        try:
            metrics = serve_metrics(settings.metrics_port, settings.metrics_host)
        except OSError as exc:
            raise _listen_error("metrics", settings.metrics_host, settings.metrics_port, "metrics", exc) from None
        if metrics:
            opened.push_async_callback(asyncio.to_thread, metrics.stop)
        metadata = {"instance": settings.instance} if settings.instance else {}
        if grpc_server:
            metadata["grpc_port"] = str(grpc_server.port)
        if metrics:
            metadata["metrics_port"] = str(metrics.port)
        discovery = await start_discovery(nc, requests, name, description=f"stable-align {name} service",
                                          metadata=metadata)
        opened.push_async_callback(discovery.stop)
        running = RunningService(name, context, parts, grpc_server, metrics.port if metrics else None,
                                 metrics=metrics, discovery=discovery)
        running.tasks = [asyncio.create_task(job()) for job in parts.background]
        opened.pop_all()  # started: from here on ``running.stop`` closes it all
    log.info("service.ready", extra={"service": name, "grpc_port": running.grpc_port,
                                     "metrics_port": running.metrics_port, "nats": redact_url(settings.nats_url),
                                     "service_id": discovery.id})
    return running


def _listen_error(what: str, host: str, port: int, setting: str, exc: OSError) -> ConfigError:
    """One line naming the port, what it is for and how to change it, instead of a traceback."""
    variable = f"STABLEALIGN_{setting.upper().replace('-', '_')}"
    where = f"(--{setting}-port / {variable}_PORT)"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{what} port {port} on {host} is already in use {where}")
    host_flag = setting.split("-")[0]  # the health port shares the gRPC host
    hosts = f"(--{host_flag}-host, --{setting}-port / STABLEALIGN_{host_flag.upper()}_HOST, {variable}_PORT)"
    return ConfigError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc} {hosts}")


async def _close_nats(nc: NATS) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=5.0)


async def _run_stop_hooks(name: str, hooks: list[Callable[[], Awaitable[None]]]) -> None:
    for hook in hooks:
        try:
            await hook()
        except Exception:  # noqa: BLE001 - keep closing the rest
            log.exception("service.stop_hook_failed", extra={"service": name})


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """``(True, result of work)``, or ``(False, None)`` when ``stop`` is set first: ``work`` is then cancelled
    and its clean-up awaited. For a start that may wait a long time (the first NATS connection is retried
    forever) while a SIGTERM must still end the process. A failure of ``work`` is raised."""
    starting = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starting.cancel()
        raise
    finally:
        stopping.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        return False, None
    return True, starting.result()


async def serve_forever(name: str, settings: ServiceSettings,
                        build: Callable[[ServiceContext], Awaitable[ServiceParts]]) -> int:
    """Runs one service until SIGTERM/SIGINT, then drains and returns 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Starting may wait a long time (NATS not up yet): a SIGTERM meanwhile must still end the process.
    started, running = await unless_stopped(start_service(name, settings, build), stop)
    if not started:
        log.info("service.stopped_before_ready", extra={"service": name})
        return 0
    setup_process(settings, serving=True)
    await stop.wait()
    await running.stop()
    await close_process_backends()
    return 0


async def close_process_backends() -> None:
    """Closes the LLM clients' HTTP pools (bound to this loop) once no service of the process uses them.

    Not part of ``RunningService.stop``: several services may share one loop (`stable-align run`,
    tests) and the backend cache is per loop, so only the owner of the loop may close it.
    """
    from stablealign.llm.backends import close_backends  # late: backends import optional heavy modules

    await close_backends()
