"""The NATS data plane: connection, JetStream resources, and protobuf request/reply.

Why our own request/reply helpers rather than ``nats.micro``: nats-py runs a subscription's
callback one message at a time, while a SANDBOX round sends hundreds of LLM-bound requests at
once. ``serve_requests`` runs each request in its own task (bounded by a semaphore), answers
errors with the NATS service-error headers (``Nats-Service-Error``/``-Code``, the micro
convention, so ``nats req`` shows them), and tracks in-flight work so SIGTERM can drain it.
``request`` turns those headers back into the typed errors of ``stablealign.errors`` and
retries the failures that a replica dying mid-request produces (timeout, no responders).

Liveness: a request may carry ``Stablealign-Liveness: <seconds>``; the replica then sends small
heartbeats (``Stablealign-Progress``, no payload) to the reply inbox, four per such period, while it
works on the request (queued for a slot or running). The requester re-sends as soon as it has heard
nothing for that long — the replica died or lost NATS — instead of waiting for the whole reply
deadline, which stays the cap for slow models that do answer.

Replies go to reply inboxes only (``stablealign.reply_subjects``): a request whose reply subject is anything
else (a stream's or a bucket's subject) is neither served nor answered, only counted and logged, because
nats-server lets a responder publish to any reply subject it was handed. Work per client is bounded before
a task exists: a request over ``max_request_bytes``, or one arriving while ``max_queued`` others already wait
for a slot, is answered at once with an error (413, 503) from the subscription's callback.

Cost per request (what bounds a round on a few cores): replies and heartbeats of every request of a
connection arrive on one wildcard inbox subscription (``_ReplyInbox``), not a SUB/UNSUB pair and a
subscription object per request; a request's silence limit and cap are one loop timer, and a
replica's heartbeats are loop timers too, not a task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from stablealign import metrics, natsauth, streams
from stablealign.errors import (
    PayloadTooLargeError,
    StableAlignError,
    UnavailableError,
    ValidationError,
    error_from_code,
)
from stablealign.logs import get_logger
from stablealign.natsauth import NatsClientOptions
from stablealign.redaction import redact_text, redact_url
from stablealign.reply_subjects import is_reply_inbox
from stablealign.retry import Failure, RetryPolicy, retry_async
from stablealign.v1 import common_pb2

log = get_logger(__name__)

# Streams and buckets (UPPER_SNAKE) and the subjects they hold.
RECORDS_STREAM = "SANDBOX_RECORDS"
RECORDS_SUBJECT = "sandbox.records.{world_id}"
MEMORY_STREAM = "SANDBOX_MEMORY"
MEMORY_SUBJECT = "sandbox.memory.{world_id}.{agent_id}"
WORLDS_BUCKET = "SANDBOX_WORLDS"
JOBS_BUCKET = "TRAINER_JOBS"
JOB_LOGS_STREAM = "TRAINER_JOB_LOGS"
JOB_LOGS_SUBJECT = "trainer.jobs.{job_id}.log"

# Request/reply subjects (queue groups are named after the service).
AGENT_DRAFT = "sandbox.agent.draft"
AGENT_FEEDBACK = "sandbox.agent.feedback"
AGENT_REVISE = "sandbox.agent.revise"
OBSERVER_RATE = "sandbox.observer.rate"
WORLD_CREATE = "sandbox.world.create"
WORLD_GET = "sandbox.world.get"
WORLD_LIST = "sandbox.world.list"
WORLD_CANCEL = "sandbox.world.cancel"
WORLD_RESUME = "sandbox.world.resume"
TRAINER_SUBMIT = "trainer.jobs.submit"
TRAINER_GET = "trainer.jobs.get"
TRAINER_LIST = "trainer.jobs.list"
TRAINER_CANCEL = "trainer.jobs.cancel"

# A method added with ``batch=True`` also answers batches on "<subject>.batch" (common.RequestBatch ->
# common.ReplyBatch): several requests in one message, each answered on its own (``request_batch``).
BATCH_SUFFIX = ".batch"
MAX_BATCH_ITEMS = 64

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MSG_ID_HEADER = "Nats-Msg-Id"
# A request's silence limit in seconds; asks the replica for heartbeats (a message with PROGRESS_HEADER).
LIVENESS_HEADER = "Stablealign-Liveness"
PROGRESS_HEADER = "Stablealign-Progress"
# The default silence limit (ServiceSettings.request_liveness_seconds): a live replica sends a heartbeat
# every quarter of it, so only a dead or cut-off one stays silent that long.
LIVENESS_SECONDS = 10.0
_STATUS_HEADER = "Status"  # nats-server's status line, e.g. 503: no responders

# Dedup window of the records stream: a re-sent record is dropped within it. A day covers
# any realistic resume of a crashed world service.
DEDUP_WINDOW_SECONDS = 24 * 3600.0

M = TypeVar("M", bound=Message)


# How long a command-line client tries to reach NATS before it says so (one line, exit 1).
CLIENT_GIVE_UP_SECONDS = 5.0


async def connect(url: str, name: str, *, options: NatsClientOptions | None = None, connect_timeout: float = 5.0,
                  give_up_after: float | None = None) -> NATS:
    """Connects with unbounded reconnects so a NATS restart pauses a service instead of killing it.

    ``options``: the client's credentials and TLS material; None: ``natsauth.client_options()``, what the
    command line set for this command (services pass theirs, from their settings).
    The first connection is retried forever too (a pod may start before NATS); a command-line client
    passes ``give_up_after`` (``CLIENT_GIVE_UP_SECONDS``) to get one clear UnavailableError, naming the
    last failure, instead of waiting: its failed attempts are logged at debug level only, not as a
    warning every half second. A first connection that the server refuses — the credentials
    (``natsauth.NotAuthorizedError``) or the TLS handshake (ConfigError) — fails at once for every
    caller: trying the same credentials again cannot help. Messages name the server through
    ``redact_url``: a password in the URL never reaches a log or an error.
    """
    options = natsauth.client_options() if options is None else options
    kwargs = options.connect_kwargs(url)  # ConfigError for unusable TLS files, before any attempt
    failures: list[Exception] = []
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[Exception] = loop.create_future()
    attempt = asyncio.ensure_future(_connect(
        url, name, kwargs, connect_timeout=min(connect_timeout, give_up_after or connect_timeout),
        failures=failures, quiet=give_up_after is not None, refused=refused))
    try:
        done, _ = await asyncio.wait({attempt, refused}, timeout=give_up_after,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        attempt.cancel()
        raise
    if attempt in done:
        return attempt.result()
    attempt.cancel()
    with contextlib.suppress(BaseException):
        await attempt
    if refused.done():
        raise refused.result()
    why = f": {_describe(failures[-1])}" if failures else ""
    raise UnavailableError(f"cannot reach NATS at {redact_url(url)} within {give_up_after:g}s{why}") from None


def _describe(exc: Exception) -> str:
    text = redact_text(str(exc).strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _connect(url: str, name: str, kwargs: dict, *, connect_timeout: float, failures: list[Exception],
                   quiet: bool, refused: asyncio.Future) -> NATS:
    holder: list[NATS] = []

    async def on_error(exc: Exception) -> None:
        if not holder:  # still trying the first connection
            failures.append(exc)
            error = natsauth.refusal(exc, url)
            if error is not None and not refused.done():
                refused.set_result(error)
                return
            log.log(logging.DEBUG if quiet else logging.WARNING, "nats.connect_failed",
                    extra={"client": name, "nats": redact_url(url), "error": _describe(exc)})
            return
        if natsauth.is_permissions_violation(exc):
            # The server refused one publish or subscribe and keeps the connection: loud, or a
            # forbidden publish would only show up as a missing acknowledgement.
            log.error("nats.permission_denied", extra={"client": name, "error": _describe(exc)})
        elif natsauth.is_authorization_violation(exc):
            log.error("nats.authorization_violation", extra={"client": name, "nats": redact_url(url),
                                                             "error": _describe(exc)})
        else:
            log.warning("nats.error", extra={"client": name, "error": _describe(exc)})

    async def on_disconnect() -> None:
        # Closing or draining disconnects too, and so does giving up a first connection that never
        # came up: only the unexpected loss of an established connection is worth a warning.
        if not holder or holder[0].is_closed or holder[0].is_draining:
            return
        log.warning("nats.disconnected", extra={"client": name})

    async def on_reconnect() -> None:
        log.info("nats.reconnected", extra={"client": name})

    nc = NATS()
    try:
        await nc.connect(
            servers=[url],
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=64 * 1024 * 1024,
            **kwargs,
        )
    except BaseException:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(nc.close(), timeout=2.0)
        raise
    holder.append(nc)
    return nc


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    # Every stream bounded in bytes and age, replicated as configured (stablealign/streams.py).
    config = streams.bounded(config, streams.configured())
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with another configuration (e.g. an older version): bring it up to date.
        await js.update_stream(config)


async def _ensure_bucket(js: JetStreamContext, bucket: str) -> None:
    """Creates the state bucket with this process's limits, or brings an existing one's up to date
    (one made by an older version is unbounded and unreplicated)."""
    limits = streams.configured()
    try:
        await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            await js.create_key_value(config=streams.bucket_config(bucket, limits))
        except nats.js.errors.BadRequestError:
            pass  # another process created it in between
        return
    info = await js.stream_info(f"KV_{bucket}")
    update = streams.bucket_update(info.config, bucket, limits)
    if update is not None:
        await js.update_stream(update)


async def ensure_world_jetstream(js: JetStreamContext) -> None:
    """Creates (idempotently) what the world service writes: records, memories, the worlds bucket."""
    await _ensure_stream(js, StreamConfig(
        name=RECORDS_STREAM, subjects=["sandbox.records.>"], storage=StorageType.FILE,
        duplicate_window=DEDUP_WINDOW_SECONDS, allow_direct=True,
        description="SANDBOX interaction records, one message per world/round/agent",
    ))
    await _ensure_stream(js, StreamConfig(
        name=MEMORY_STREAM, subjects=["sandbox.memory.>"], storage=StorageType.FILE,
        duplicate_window=DEDUP_WINDOW_SECONDS, allow_direct=True,
        description="Agent memories: appends of (question, answer, embedding) batches",
    ))
    await _ensure_bucket(js, WORLDS_BUCKET)


async def ensure_trainer_jetstream(js: JetStreamContext) -> None:
    """Creates (idempotently) what the trainer service writes: job log lines and the jobs bucket."""
    await _ensure_stream(js, StreamConfig(
        name=JOB_LOGS_STREAM, subjects=["trainer.jobs.*.log"], storage=StorageType.FILE,
        allow_direct=True, description="Trainer job log lines",
    ))
    await _ensure_bucket(js, JOBS_BUCKET)


# Which service creates which streams and buckets at start. Only these two: the others' NATS users
# may not create streams (stablealign/nats_permissions.py), they look up what the owner made.
STREAM_OWNERS = {"world": ensure_world_jetstream, "trainer": ensure_trainer_jetstream}


async def ensure_jetstream_of(service: str, js: JetStreamContext) -> None:
    """Creates the streams and buckets ``service`` owns (none for agents and observers)."""
    ensure = STREAM_OWNERS.get(service)
    if ensure is not None:
        await ensure(js)


async def ensure_jetstream(js: JetStreamContext) -> None:
    """Creates every stream and bucket (tests and benchmarks on an open server)."""
    await ensure_world_jetstream(js)
    await ensure_trainer_jetstream(js)


# --- request/reply ---------------------------------------------------------------------------


class ReplicaSilentError(nats.errors.TimeoutError):
    """No heartbeat nor reply for the request's liveness period: the replica is presumed gone."""

    def __str__(self) -> str:
        return "nats: the replica stopped sending heartbeats"


_RETRY_REASONS = {nats.errors.NoRespondersError: "no_responders",
                  nats.errors.ConnectionReconnectingError: "reconnecting",
                  ReplicaSilentError: "silent"}
_RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError)


async def request(
    nc: NATS,
    subject: str,
    message: Message,
    response_type: type[M],
    *,
    timeout: float = 60.0,
    attempts: int = 3,
    backoff: float = 0.2,
    liveness: float | None = LIVENESS_SECONDS,
) -> M:
    """Sends ``message`` and parses the reply as ``response_type``.

    Remote errors come back as the typed errors of ``stablealign.errors`` and are not retried
    (a bad request stays bad). A timeout or "no responders" is retried with jittered backoff:
    with a queue group the retry reaches another replica, which is what makes killing a replica
    mid-round lose nothing. Handlers must therefore be idempotent.

    ``timeout`` caps one attempt. With ``liveness`` shorter than it, the replica working on the
    request sends heartbeats, and an attempt that hears nothing for ``liveness`` seconds is sent
    again at once (reason ``silent``): a dead replica costs seconds, not the whole ``timeout``,
    while a live one that needs minutes for a slow model is left to finish. A re-send reaching the
    replica still on the request joins that work (``RequestServer``): no second LLM call.
    ``liveness=None``: a plain ``nc.request``, for responders that send no heartbeats.
    """
    payload = message.SerializeToString()

    def on_failure(failure: Failure) -> None:
        reason = _RETRY_REASONS.get(type(failure.error), "timeout")
        metrics.BUS_REQUEST_RETRIES.labels(subject, reason).inc()
        log.warning("bus.request_retry", extra={"subject": subject, "reason": reason, "attempt": failure.attempt,
                                                "timeout_s": timeout, "liveness_s": liveness})

    def send(_attempt: int) -> Awaitable[Msg]:
        if liveness is not None and 0 < liveness < timeout:
            return _request_with_heartbeats(nc, subject, payload, timeout=timeout, liveness=liveness)
        return nc.request(subject, payload, timeout=timeout)

    # No per-attempt timeout of the policy's own: the request's own timeout is the one that is retried.
    policy = RetryPolicy(attempts=attempts, base_delay=backoff, max_delay=math.inf, timeout=None,
                         jitter="proportional")
    reply = await retry_async(
        send, policy,
        retryable=lambda exc: isinstance(exc, _RETRYABLE),
        on_failure=on_failure,
        give_up=lambda failure: UnavailableError(
            f"{subject}: no reply after {failure.attempts} attempts ({type(failure.error).__name__})"),
    )
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise error_from_code(int(headers[ERROR_CODE_HEADER]), headers.get(ERROR_HEADER, "error"))
    result = response_type()
    try:
        result.ParseFromString(reply.data)
    except DecodeError as exc:
        raise UnavailableError(f"{subject}: malformed reply ({exc})") from exc
    return result


def batch_subject(subject: str) -> str:
    """The subject on which the method at ``subject`` answers batches of its requests."""
    return subject + BATCH_SUFFIX


async def request_batch(
    nc: NATS,
    subject: str,
    messages: Sequence[Message],
    response_type: type[M],
    *,
    timeout: float = 60.0,
    attempts: int = 3,
    backoff: float = 0.2,
    liveness: float | None = LIVENESS_SECONDS,
) -> list[M | StableAlignError]:
    """Sends ``messages`` (requests of the method at ``subject``) as one batch; one result per message, in order.

    One round trip and one message each way instead of one per request: what the world's fan-out waves
    (an interaction's k feedback requests, its two ratings of an answer) cost the requester, the server
    and the replica. The batch as a whole is sent, re-sent and failed like ``request`` (timeouts, no
    responders, liveness, a replica's error reply); an item's own failure comes back in its place as
    the typed error it would have raised alone, and the caller decides about it.
    """
    if not 0 < len(messages) <= MAX_BATCH_ITEMS:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_ITEMS} requests, not {len(messages)}")
    batch = common_pb2.RequestBatch(requests=[m.SerializeToString() for m in messages])
    reply = await request(nc, batch_subject(subject), batch, common_pb2.ReplyBatch, timeout=timeout,
                          attempts=attempts, backoff=backoff, liveness=liveness)
    if len(reply.replies) != len(messages):
        raise UnavailableError(f"{subject}: a batch of {len(messages)} requests got {len(reply.replies)} replies")
    results: list[M | StableAlignError] = []
    for item in reply.replies:
        if item.code and item.code != 200:
            results.append(error_from_code(item.code, item.error or "error"))
            continue
        result = response_type()
        try:
            result.ParseFromString(item.payload)
        except DecodeError as exc:
            results.append(UnavailableError(f"{subject}: malformed reply in a batch ({exc})"))
            continue
        results.append(result)
    return results


class _ReplyInbox:
    """Replies and heartbeats of every request with a silence limit on one connection, on one subscription.

    Each request gets the subject ``<prefix>.<n>`` (the prefix is a fresh ``nc.new_inbox()``, under the
    connection's per-user inbox prefix, e.g. ``_INBOX_world.<nuid>``: ``natsauth.inbox_prefix_for``) and a
    callback registered before it is published, so no reply can arrive unrouted; the wildcard routing is
    the server's. Kept on the connection object itself (``_INBOX_ATTR``) so it lives and dies with it.
    """

    def __init__(self, nc: NATS) -> None:
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, Callable[[Msg], None]] = {}
        self._numbers = itertools.count(1)

    async def open(self, nc: NATS) -> _ReplyInbox:
        await nc.subscribe(f"{self.prefix}.*", cb=self._on_message, pending_msgs_limit=1_000_000)
        return self

    def subject(self) -> str:
        return f"{self.prefix}.{next(self._numbers)}"

    async def _on_message(self, msg: Msg) -> None:
        deliver = self.waiting.get(msg.subject)
        if deliver is not None:  # else the request has ended (a late heartbeat or a reply after a re-send)
            deliver(msg)


_INBOX_ATTR = "_stablealign_reply_inbox"


async def _reply_inbox(nc: NATS) -> _ReplyInbox:
    """The connection's shared reply inbox, subscribed on first use (concurrent first uses share it)."""
    opening = getattr(nc, _INBOX_ATTR, None)
    if opening is None:
        opening = asyncio.ensure_future(_ReplyInbox(nc).open(nc))
        setattr(nc, _INBOX_ATTR, opening)
    if not opening.done():
        try:
            return await asyncio.shield(opening)
        except Exception:
            if getattr(nc, _INBOX_ATTR, None) is opening:
                setattr(nc, _INBOX_ATTR, None)  # the next request tries again
            raise
    if opening.exception() is not None:
        setattr(nc, _INBOX_ATTR, None)
        raise opening.exception()
    return opening.result()


async def _request_with_heartbeats(nc: NATS, subject: str, payload: bytes, *, timeout: float,
                                   liveness: float) -> Msg:
    """One attempt: heartbeats keep it waiting (up to ``timeout``), the reply ends it.

    ReplicaSilentError after ``liveness`` seconds without a message; nats' TimeoutError at ``timeout``;
    NoRespondersError when nobody serves ``subject``. The reply arrives on the connection's shared
    inbox (``_ReplyInbox``); one loop timer checks the silence limit and the cap.
    """
    inbox = await _reply_inbox(nc)
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[Msg] = loop.create_future()
    now = loop.time()
    cap = now + timeout
    heard = [now]  # when the replica was last heard from

    def check() -> None:
        if reply.done():
            return
        at = loop.time()
        if at >= cap:
            reply.set_exception(nats.errors.TimeoutError())
        elif at >= heard[0] + liveness:
            reply.set_exception(ReplicaSilentError())
        else:
            timer[0] = loop.call_at(min(cap, heard[0] + liveness), check)

    def deliver(msg: Msg) -> None:
        headers = msg.headers or {}
        if PROGRESS_HEADER in headers:
            heard[0] = loop.time()  # the replica is alive and on it
        elif not reply.done():
            if headers.get(_STATUS_HEADER) == "503" and not msg.data and ERROR_CODE_HEADER not in headers:
                reply.set_exception(nats.errors.NoRespondersError())
            else:
                reply.set_result(msg)

    reply_subject = inbox.subject()
    inbox.waiting[reply_subject] = deliver
    timer = [loop.call_at(min(cap, now + liveness), check)]
    try:
        await nc.publish(subject, payload, reply=reply_subject, headers={LIVENESS_HEADER: f"{liveness:g}"})
        return await reply
    finally:
        inbox.waiting.pop(reply_subject, None)
        timer[0].cancel()


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


async def last_sequence(js: JetStreamContext, stream: str, subject: str) -> int:
    """Stream sequence of the last message on ``subject`` (0 if none)."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msg.seq or 0)


async def read_subject(js: JetStreamContext, stream: str, subject: str, *, after_seq: int = 0,
                       timeout: float = 10.0) -> list[tuple[int, Msg]]:
    """Reads the messages of ``subject`` with stream sequence > ``after_seq``, in order.

    Uses an ephemeral ordered consumer and stops at the subject's last sequence as it was when
    the read began, so the read is bounded even while others keep publishing.
    """
    last = await last_sequence(js, stream, subject)
    if last <= after_seq:
        return []
    sub = await js.subscribe(
        subject, stream=stream, ordered_consumer=True,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after_seq else DeliverPolicy.ALL,
        config=None if not after_seq else _start_config(after_seq + 1),
    )
    out: list[tuple[int, Msg]] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(f"timed out reading {subject} from {stream}")
            msg = await sub.next_msg(timeout=remaining)
            seq = msg.metadata.sequence.stream
            out.append((seq, msg))
            if seq >= last:
                return out
    except nats.errors.TimeoutError as exc:
        raise UnavailableError(f"timed out reading {subject} from {stream}") from exc
    finally:
        await sub.unsubscribe()


def _start_config(start_seq: int):
    from nats.js.api import ConsumerConfig

    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
