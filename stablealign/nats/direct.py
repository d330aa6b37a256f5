"""Reading a stream without a consumer: batched direct gets (nats-server 2.11 and later).

Why no consumer (issue 19): a consumer is created by a request on ``$JS.API.CONSUMER.CREATE.<stream>``,
and a permission on that subject cannot see the consumer's configuration. A role allowed to create one
may give it any deliver subject — another stream's or a bucket's — and the server then publishes the
stream's messages there on the role's behalf, past its publish deny list. So the roles that only read
(cli, agent, observer: ``stablealign.nats.permissions``) get no consumer rights at all, and every reader
here asks ``<api>.DIRECT.GET.<stream>`` instead (``<api>``: the context's JetStream API prefix, ``$JS.API``
or, for a secured server's reader, the owner's account's import prefix: ``stablealign.nats.client.jetstream``):
``{"seq": n, "batch": N, "next_by_subj": subject}`` is answered by up to N messages of ``subject`` from
sequence n on, in order, to the reader's inbox, then one status-only message (204 "EOB"; 404 when there is
none). At most N messages are in the process at once, as with a pull consumer's fetch, and a read costs one
request per batch, not one per message.

Direct gets need ``allow_direct`` on the stream (the streams of ``subjects`` have it), and any replica may
answer one: a follower may lag behind the leader. ``read_batches`` knows from the leader (a
``STREAM.MSG.GET``, ``last_sequence``) where the subject ended when the read began, and asks again for a
batch that ended short of it, so a read is complete on a cluster too; ``follow`` asks again after a pause.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stablealign.core.errors import UnavailableError

DIRECT_BATCH = 256  # messages per direct get: what a reader holds at once
_STATUS = "Status"
_END_OF_BATCH = "204"
_NOT_FOUND = "404"
_SHORT_PAUSE = 0.05  # a batch that ended short of the known end: a lagging replica, asked again after this
_API_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class StoredMsg:
    """One stream message as a direct get returns it (its own headers, and the server's ``Nats-*``)."""

    seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str]


def _stored(msg: Msg) -> StoredMsg:
    headers = dict(msg.headers or {})
    return StoredMsg(int(headers.get("Nats-Sequence", 0)), headers.get("Nats-Subject", ""), msg.data or b"", headers)


async def last_sequence(js: JetStreamContext, stream: str, subject: str) -> int:
    """Stream sequence of the last message on ``subject`` (0 if none), from the stream's leader."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msg.seq or 0)


def _connection(js: JetStreamContext) -> tuple[NATS, str, float]:
    # nats-py keeps a context's connection, API prefix and timeout private; there is no public accessor.
    return js._nc, js._prefix, float(js._timeout or _API_TIMEOUT)


class DirectReader:
    """Batched direct gets of one stream: one inbox subscription for the reader's life, one request per batch.

    Each batch gets its own reply subject (``<inbox>.<n>``), so a late answer to a batch that timed out is
    dropped rather than taken for the next one's."""

    def __init__(self, js: JetStreamContext, stream: str, *, batch: int = DIRECT_BATCH,
                 timeout: float | None = None) -> None:
        if batch < 1:
            raise ValueError(f"a direct get batch holds at least one message, not {batch}")
        self.nc, prefix, default_timeout = _connection(js)
        self.stream = stream
        self.batch = batch
        self.timeout = default_timeout if timeout is None else timeout
        self._subject = f"{prefix}.DIRECT.GET.{stream}"
        self._inbox = self.nc.new_inbox()
        self._numbers = itertools.count(1)
        self._waiting: dict[str, tuple[list[StoredMsg], asyncio.Future[str]]] = {}
        self._sub = None

    async def __aenter__(self) -> DirectReader:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is closing: the subscription goes with it
                pass

    async def _on_message(self, msg: Msg) -> None:
        waiting = self._waiting.get(msg.subject)
        if waiting is None:
            return  # the batch has ended (timed out): a late answer
        got, done = waiting
        status = (msg.headers or {}).get(_STATUS)
        if status and not msg.data:
            if not done.done():
                done.set_result(f"{status} {(msg.headers or {}).get('Description', '')}".strip())
            return
        got.append(_stored(msg))

    async def get_batch(self, subject: str, start_seq: int) -> list[StoredMsg]:
        """Up to ``batch`` messages on ``subject`` (wildcards allowed) with sequence >= ``start_seq``, in
        stream order; [] when there is none. UnavailableError when the stream does not answer in time."""
        if self._sub is None:
            raise RuntimeError("DirectReader is used inside `async with`")
        reply = f"{self._inbox}.{next(self._numbers)}"
        got: list[StoredMsg] = []
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[reply] = (got, done)
        request = {"seq": max(1, start_seq), "batch": self.batch, "next_by_subj": subject}
        try:
            await self.nc.publish(self._subject, json.dumps(request).encode(), reply=reply)
            status = await asyncio.wait_for(done, self.timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            raise UnavailableError(f"{self.stream} did not answer a direct get of {subject} within "
                                   f"{self.timeout:g}s") from None
        finally:
            self._waiting.pop(reply, None)
        code = status.split(" ", 1)[0]
        if code not in (_END_OF_BATCH, _NOT_FOUND):  # 503: no stream or no direct gets; 400/408/413: refused
            raise UnavailableError(f"direct get of {subject} from {self.stream} refused: {status}")
        return got


async def read_batches(js: JetStreamContext, stream: str, subject: str, *, after_seq: int = 0,
                       up_to: int | None = None, batch: int = DIRECT_BATCH, idle_timeout: float = 30.0,
                       ) -> AsyncIterator[list[StoredMsg]]:
    """The messages of ``subject`` with ``after_seq`` < sequence <= ``up_to``, a batch at a time, in order.

    ``up_to`` defaults to the subject's last sequence when the read begins, so the read is bounded while
    others keep publishing. A batch that ends short of ``up_to`` (a lagging replica answered) is asked
    again; nothing new for ``idle_timeout`` seconds is an UnavailableError naming where the read stopped.
    """
    end = await last_sequence(js, stream, subject) if up_to is None else up_to
    seq = after_seq
    async with DirectReader(js, stream, batch=batch) as reader:
        progress_at = time.monotonic()
        while seq < end:
            raw = await reader.get_batch(subject, seq + 1)
            got = [m for m in raw if seq < m.seq <= end]
            if got:
                seq = got[-1].seq
                progress_at = time.monotonic()
                yield got
                continue
            if (raw and raw[0].seq > end) or (not raw and await last_sequence(js, stream, subject) <= seq):
                return  # the rest up to the end was removed meanwhile (age or size limits): nothing is left
            if time.monotonic() - progress_at > idle_timeout:
                raise UnavailableError(f"timed out reading {subject} from {stream}: nothing for "
                                       f"{idle_timeout:.0f}s after sequence {seq} of {end}")
            await asyncio.sleep(_SHORT_PAUSE)


async def read_subject(js: JetStreamContext, stream: str, subject: str, *, after_seq: int = 0,
                       timeout: float = 10.0) -> list[tuple[int, StoredMsg]]:
    """The messages of ``subject`` with stream sequence > ``after_seq``, in order, up to the subject's last
    sequence when the read began (bounded even while others keep publishing). Holds them all: for short
    subjects (one agent's memory, one job's log)."""
    out: list[tuple[int, StoredMsg]] = []
    async for got in read_batches(js, stream, subject, after_seq=after_seq, idle_timeout=timeout):
        out.extend((m.seq, m) for m in got)
    return out


async def follow(js: JetStreamContext, stream: str, subject: str, *, after_seq: int = 0, poll_seconds: float = 0.5,
                 batch: int = DIRECT_BATCH, outage_seconds: float = 60.0) -> AsyncIterator[StoredMsg | None]:
    """The messages of ``subject`` after ``after_seq`` as they are stored, until the caller stops.

    Yields None each time it has caught up and waited ``poll_seconds`` with nothing new, so that a caller can
    check whether to stop (a world's final state) without a clock of its own. A stream that does not answer
    (a NATS restart) is asked again every ``poll_seconds``; after ``outage_seconds`` of nothing but failures
    the UnavailableError is the caller's.
    """
    seq = after_seq
    async with DirectReader(js, stream, batch=batch) as reader:
        failing_since: float | None = None
        while True:
            try:
                got = [m for m in await reader.get_batch(subject, seq + 1) if m.seq > seq]
            except UnavailableError:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > outage_seconds:
                    raise
                got = []
            else:
                failing_since = None
            for msg in got:
                seq = msg.seq
                yield msg
            if len(got) < batch:  # caught up (or a lagging replica): ask again after a pause
                await asyncio.sleep(poll_seconds)
                yield None
