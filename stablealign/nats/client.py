"""The NATS client side: connect, protobuf request/reply with retries and heartbeats. JetStream reads
are ``stablealign.nats.direct`` (no consumer); ``read_subject`` and ``last_sequence`` are named here too.

JetStream: ``jetstream(nc, owner)`` opens the API of the world's or the trainer's streams with the prefix the
connection's options give it (``NatsClientOptions.jetstream_prefix``: ``$JS.API`` unless a secured server's
reader imports it under another), so every reader of those streams, direct gets included, asks the right one.

The request server is ``stablealign.nats.server``; the names of streams, subjects and headers are in
``stablealign.nats.subjects``. ``request`` turns the server's service-error headers
(``Nats-Service-Error``/``-Code``) back into the typed errors of ``stablealign.core.errors`` and
retries the failures that a replica dying mid-request produces (timeout, no responders).

Liveness: a request may carry ``Stablealign-Liveness: <seconds>``; the replica then sends small
heartbeats (``Stablealign-Progress``, no payload) to the reply inbox, four per such period, while it
works on the request (queued for a slot or running). The requester re-sends as soon as it has heard
nothing for that long — the replica died or lost NATS — instead of waiting for the whole reply
deadline, which stays the cap for slow models that do answer.

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
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stablealign.core import metrics
from stablealign.core.errors import StableAlignError, UnavailableError, error_from_code
from stablealign.core.logs import get_logger
from stablealign.core.redaction import redact_text, redact_url
from stablealign.core.retry import Failure, RetryPolicy, retry_async
from stablealign.nats import auth as natsauth
from stablealign.nats.auth import NatsClientOptions
from stablealign.nats.direct import last_sequence as last_sequence
from stablealign.nats.direct import read_subject as read_subject
from stablealign.nats.subjects import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    LIVENESS_HEADER,
    LIVENESS_SECONDS,
    MAX_BATCH_ITEMS,
    PROGRESS_HEADER,
    batch_subject,
)
from stablealign.v1 import common_pb2

log = get_logger(__name__)

M = TypeVar("M", bound=Message)

_STATUS_HEADER = "Status"  # nats-server's status line, e.g. 503: no responders



# How long a command-line client tries to reach NATS before it says so (one line, exit 1).
CLIENT_GIVE_UP_SECONDS = 5.0
# The options each connection of ``connect`` was made with (its JetStream prefixes), for ``jetstream``.
_CONNECTION_OPTIONS: weakref.WeakKeyDictionary[NATS, NatsClientOptions] = weakref.WeakKeyDictionary()


def jetstream(nc: NATS, owner: str, *, timeout: float | None = None) -> JetStreamContext:
    """The JetStream API of the streams ``owner`` ("world" or "trainer") keeps, as ``nc`` reaches it: under the
    prefix its options set for that owner (a secured server's reader: ``$JS.WORLD.API``), else ``$JS.API``.
    ``timeout``: of each API call (None: nats-py's default)."""
    prefix = _CONNECTION_OPTIONS.get(nc, NatsClientOptions()).jetstream_prefix(owner)
    return nc.jetstream(prefix=prefix) if timeout is None else nc.jetstream(prefix=prefix, timeout=timeout)


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
        nc = attempt.result()
        _CONNECTION_OPTIONS[nc] = options
        return nc
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

    Remote errors come back as the typed errors of ``stablealign.core.errors`` and are not retried
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
