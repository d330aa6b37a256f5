"""The NATS request server: protobuf handlers on queue-group subjects, bounded and drained.

Why our own rather than ``nats.micro``: nats-py runs a subscription's callback one message at a time,
while a SANDBOX round sends hundreds of LLM-bound requests at once. ``RequestServer`` runs each request
in its own task (bounded by a semaphore), answers errors with the NATS service-error headers
(``Nats-Service-Error``/``-Code``, the micro convention, so ``nats req`` shows them), and tracks
in-flight work so SIGTERM can drain it. A request that asks for liveness (``Stablealign-Liveness``)
gets heartbeats while it is queued or running (``stablealign.nats.client`` explains the requester's side).

Replies go to reply inboxes only (``stablealign.nats.reply_subjects``): a request whose reply subject is
anything else is neither served nor answered, only counted and logged. Work per client is bounded before
a task exists: a request over ``max_request_bytes``, or one arriving while ``max_queued`` others already
wait for a slot, is answered at once with an error (413, 503) from the subscription's callback.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from stablealign.core import metrics
from stablealign.core.errors import PayloadTooLargeError, StableAlignError, UnavailableError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.nats.reply_subjects import is_reply_inbox
from stablealign.nats.subjects import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    LIVENESS_HEADER,
    MAX_BATCH_ITEMS,
    PROGRESS_HEADER,
    batch_subject,
)
from stablealign.v1 import common_pb2

log = get_logger(__name__)

M = TypeVar("M", bound=Message)


def _liveness(msg: Msg) -> float | None:
    """The silence limit a request asks heartbeats for (LIVENESS_HEADER), None when it asks none."""
    raw = (getattr(msg, "headers", None) or {}).get(LIVENESS_HEADER) if msg.reply else None
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


Handler = Callable[[M], Awaitable[Message]]


@dataclass
class EndpointCounters:
    """What one subject of a RequestServer has served, for the NATS service API's INFO/STATS."""

    name: str  # the method, e.g. "Draft"
    subject: str
    queue_group: str
    num_requests: int = 0
    num_errors: int = 0  # requests answered with an error reply
    last_error: str = ""  # "<code>:<message>" of the latest error reply
    processing_ns: int = 0  # receipt to reply, summed over finished requests (queueing for a slot included)
    finished: int = 0

    @property
    def average_processing_ns(self) -> int:
        return self.processing_ns // self.finished if self.finished else 0


@dataclass
class RequestServer:
    """Serves protobuf request/reply handlers on NATS subjects with bounded concurrency."""

    nc: NATS
    service: str
    queue: str
    max_concurrency: int = 256
    max_request_bytes: int = 1 << 20
    # Requests taken beyond max_concurrency, waiting for a slot: past it a request is answered 503 at once.
    max_queued: int = 4096
    _semaphore: asyncio.Semaphore = field(init=False)
    _inflight: set[asyncio.Task] = field(default_factory=set, init=False)
    _subs: list = field(default_factory=list, init=False)
    # Replies being worked on, by (method, request bytes): a re-sent identical request (the requester
    # timed out while a slow model was still working) joins the work instead of starting it again.
    _working: dict[tuple[str, bytes], asyncio.Future] = field(default_factory=dict, init=False)
    # One per ``add``, in order: the endpoints and counters the NATS service API reports.
    endpoints: list[EndpointCounters] = field(default_factory=list, init=False)
    # Prometheus children by (method, code) and method: ``labels()`` takes a lock and builds a key per call.
    _counted: dict[tuple[str, str], object] = field(default_factory=dict, init=False)
    _timed: dict[str, object] = field(default_factory=dict, init=False)
    _beats: set[asyncio.Task] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self._semaphore = asyncio.Semaphore(self.max_concurrency)

    async def add(self, subject: str, request_type: type[M], handler: Handler, method: str, *,
                  batch: bool = False) -> None:
        """Serves ``handler`` on ``subject``; with ``batch`` also batches of its requests on
        ``batch_subject(subject)`` (method ``<method>Batch`` in the service API)."""
        await self._subscribe(subject, request_type, handler, method)
        if not batch:
            await self.nc.flush()  # live at the server before the service says it is ready
            return

        # The envelope is not counted in REQUESTS (its items are, under ``method``): no request counted twice.
        await self._subscribe(batch_subject(subject), common_pb2.RequestBatch,
                              self.batch_handler(method, request_type, handler), f"{method}Batch", count=False)
        # Make the subscriptions live at the server before the service says it is ready.
        await self.nc.flush()

    def batch_handler(self, method: str, request_type: type[M], handler: Handler) -> Handler:
        """The handler of ``method``'s batches: every item at once, each answered on its own (``_serve_item``)."""

        async def run_batch(batch: common_pb2.RequestBatch) -> common_pb2.ReplyBatch:
            if len(batch.requests) > MAX_BATCH_ITEMS:
                raise ValidationError(f"a batch of {len(batch.requests)} requests, more than the limit of "
                                      f"{MAX_BATCH_ITEMS}")
            return common_pb2.ReplyBatch(replies=await asyncio.gather(
                *(self._serve_item(method, request_type, handler, data) for data in batch.requests)))

        return run_batch

    async def _subscribe(self, subject: str, request_type: type[M], handler: Handler, method: str, *,
                         count: bool = True) -> None:
        counters = EndpointCounters(name=method, subject=subject, queue_group=self.queue)
        self.endpoints.append(counters)

        async def on_message(msg: Msg) -> None:
            counters.num_requests += 1
            if msg.reply and not is_reply_inbox(msg.reply):
                self._refuse(msg, method)
                return
            if len(msg.data) > self.max_request_bytes or len(self._inflight) >= self.max_concurrency + self.max_queued:
                await self._shed(msg, method, counters, count)
                return
            task = asyncio.create_task(self._handle(msg, request_type, handler, method, counters, count))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        self._subs.append(await self.nc.subscribe(subject, queue=self.queue, cb=on_message,
                                                  pending_msgs_limit=1_000_000))

    def _refuse(self, msg: Msg, method: str) -> None:
        """Drops a request whose reply subject is no inbox: no work, no reply, no heartbeat; counted, one log line."""
        metrics.REPLIES_REFUSED.labels(self.service, "request").inc()
        log.warning("bus.reply_refused", extra={"service": self.service, "method": method,
                                                "reply": msg.reply[:200], "bytes": len(msg.data)})

    async def _shed(self, msg: Msg, method: str, counters: EndpointCounters, count: bool) -> None:
        """Answers a request over the size or queue limit with an error, from the callback: no task for it."""
        started = time.perf_counter()
        if len(msg.data) > self.max_request_bytes:
            reason, error = "too_large", PayloadTooLargeError(
                f"request of {len(msg.data)} bytes exceeds the limit of {self.max_request_bytes}")
        else:
            reason, error = "busy", UnavailableError(
                f"{self.service} is busy: {len(self._inflight)} requests in flight (max_concurrency "
                f"{self.max_concurrency} + max_queued {self.max_queued}); try again later")
        metrics.REQUESTS_SHED.labels(self.service, method, reason).inc()
        code, text = str(error.code), str(error)
        await self._send_error(msg, method, counters, code, text)
        if count:
            self._count(method, code, started)

    async def _send_error(self, msg: Msg, method: str, counters: EndpointCounters | None, code: str,
                          text: str) -> None:
        """Counts the error on the endpoint and answers it, if the request asked for an answer."""
        if counters is not None:
            counters.num_errors += 1
            counters.last_error = f"{code}:{text}"
        if msg.reply:
            try:
                await self.nc.publish(msg.reply, b"", headers={ERROR_HEADER: text, ERROR_CODE_HEADER: code})
            except Exception:  # noqa: BLE001 - the requester is gone or NATS is down
                log.warning("nats.reply_failed", extra={"service": self.service, "method": method})

    async def _serve_item(self, method: str, request_type: type[M], handler: Handler,
                          data: bytes) -> common_pb2.BatchReply:
        """One item of a batch: its reply, or the error it would have been answered with alone."""
        started = time.perf_counter()
        code = "200"
        try:
            request_msg = request_type()
            try:
                request_msg.ParseFromString(data)
            except DecodeError as exc:
                raise ValidationError(f"malformed {request_type.DESCRIPTOR.name}: {exc}") from exc
            reply = await self._run_once(method, data, handler, request_msg)
            return common_pb2.BatchReply(payload=reply.SerializeToString())
        except asyncio.CancelledError:
            code = "499"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the item's error
            code, text = self._error_reply(exc, method)
            return common_pb2.BatchReply(code=int(code), error=text)
        finally:
            self._count(method, code, started)

    async def _handle(self, msg: Msg, request_type: type[M], handler: Handler, method: str,
                      counters: EndpointCounters | None = None, count: bool = True) -> None:
        started = time.perf_counter()
        started_ns = time.perf_counter_ns()
        liveness = _liveness(msg)
        # Heartbeats from receipt (a request waiting for a slot is alive too) until this task ends.
        heartbeat = self._heartbeats(msg.reply, liveness) if liveness else None
        try:
            await self._serve(msg, request_type, handler, method, counters, started, started_ns, count)
        finally:
            if heartbeat is not None:
                heartbeat[0].cancel()

    def _heartbeats(self, inbox: str, liveness: float) -> list[asyncio.TimerHandle]:
        """Tells the requester, four times per ``liveness`` period, that this replica is on its request.

        A loop timer, re-armed at each beat (most requests end before the first); cancel ``[0]`` to stop.
        """
        loop = asyncio.get_running_loop()
        every = min(max(liveness / 4, 0.05), 30.0)

        def beat() -> None:
            task = loop.create_task(self._beat(inbox))
            self._beats.add(task)
            task.add_done_callback(self._beats.discard)
            handle[0] = loop.call_later(every, beat)

        handle = [loop.call_later(every, beat)]
        return handle

    async def _beat(self, inbox: str) -> None:
        try:
            await self.nc.publish(inbox, b"", headers={PROGRESS_HEADER: "1"})
        except Exception:  # noqa: BLE001 - NATS is away: the requester's silence limit decides
            pass

    async def _serve(self, msg: Msg, request_type: type[M], handler: Handler, method: str,
                     counters: EndpointCounters | None, started: float, started_ns: int, count: bool = True) -> None:
        code = "200"
        async with self._semaphore:
            try:
                request_msg = request_type()
                try:
                    request_msg.ParseFromString(msg.data)
                except DecodeError as exc:
                    raise ValidationError(f"malformed {request_type.DESCRIPTOR.name}: {exc}") from exc
                reply = await self._run_once(method, msg.data, handler, request_msg)
                if msg.reply:
                    await msg.respond(reply.SerializeToString())
            except asyncio.CancelledError:
                code = "499"
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
                code, text = self._error_reply(exc, method)
                await self._send_error(msg, method, counters, code, text)
            finally:
                if counters is not None:
                    counters.processing_ns += time.perf_counter_ns() - started_ns
                    counters.finished += 1
                if count:
                    self._count(method, code, started)

    def _error_reply(self, exc: Exception, method: str) -> tuple[str, str]:
        """(code, text) of the error reply for ``exc``: its own for ours; 500 and a logged traceback else."""
        if isinstance(exc, StableAlignError):
            return str(exc.code), str(exc)
        log.exception("nats.handler_failed", extra={"service": self.service, "method": method})
        return "500", "internal error"

    def _count(self, method: str, code: str, started: float) -> None:
        counted = self._counted.get((method, code))
        if counted is None:
            counted = self._counted[(method, code)] = metrics.REQUESTS.labels(self.service, method, "nats", code)
        counted.inc()
        timed = self._timed.get(method)
        if timed is None:
            timed = self._timed[method] = metrics.REQUEST_SECONDS.labels(self.service, method, "nats")
        timed.observe(time.perf_counter() - started)

    async def _run_once(self, method: str, data: bytes, handler: Handler, request_msg: Message) -> Message:
        """Runs ``handler``, or joins the run of an identical request already in flight here.

        Handlers are idempotent (the same request gives the same reply), so sharing one run is
        exact; it turns a requester's re-send into a wait instead of a second LLM call.
        """
        key = (method, data)
        running = self._working.get(key)
        if running is not None:
            metrics.REQUESTS_JOINED.labels(self.service, method).inc()
            return await asyncio.shield(running)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._working[key] = future
        try:
            reply = await handler(request_msg)
        except BaseException as exc:
            if not future.done():
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
                    future.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        else:
            future.set_result(reply)
            return reply
        finally:
            self._working.pop(key, None)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def drain(self, grace: float) -> None:
        """Stops taking requests, finishes what it took, then waits up to ``grace`` seconds for in-flight ones.

        ``Subscription.drain`` (not ``unsubscribe``): the server stops routing this replica's queue-group
        share to it at once — requests not yet delivered go to the other replicas — while messages
        already delivered to this process still reach the handler instead of being dropped unanswered
        (their requesters would wait out the silence limit and re-send).
        """
        subs, self._subs = self._subs, []
        results = await asyncio.gather(*(sub.drain() for sub in subs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancelled: propagate; an Exception means already closed
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)


# --- JetStream reads ---------------------------------------------------------------------------
