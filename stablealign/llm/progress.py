"""The deadline of one LLM call measured as time without progress, not time since it was queued.

Why: a call to a server that decodes one request at a time waits, first for a slot of the backend's
concurrency limit (``backends.limiter``), then for its own reply. Counting the wait for a slot as
a hung model fails a healthy world whose calls simply take turns. So the clock of ``within_deadline``
(``stablealign.llm.calls``) is held here, in a context variable that the backend code running inside
the call sees: waiting for a slot stops it (``waiting``), and each streamed token restarts it
(``progressed``). Code outside such a call (no clock) is unaffected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CLOCK: ContextVar[ProgressClock | None] = ContextVar("llm_progress_clock", default=None)


class ProgressClock:
    """Drives an ``asyncio.Timeout``: it expires after ``seconds`` without progress, not counting pauses."""

    def __init__(self, seconds: float, timeout: asyncio.Timeout) -> None:
        self.seconds = seconds
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.paused_seconds = 0.0  # time spent waiting for a slot, in all
        self._pauses = 0
        self._paused_at = 0.0
        self._remaining = seconds

    def progressed(self) -> None:
        """A sign of life (a streamed token): the full ``seconds`` again from now."""
        if self._pauses:
            self._remaining = self.seconds
        else:
            self._reschedule(self.loop.time() + self.seconds)

    def pause(self) -> None:
        if self._pauses == 0:
            now = self.loop.time()
            when = self.timeout.when()
            self._remaining = self.seconds if when is None else max(0.0, when - now)
            self._paused_at = now
            self._reschedule(None)
        self._pauses += 1

    def resume(self) -> None:
        self._pauses -= 1
        if self._pauses == 0:
            now = self.loop.time()
            self.paused_seconds += now - self._paused_at
            self._reschedule(now + self._remaining)

    def _reschedule(self, when: float | None) -> None:
        # A timeout that has fired (or whose block has ended) is left as it is: its cancellation goes on.
        if self.timeout.expired():
            return
        try:
            self.timeout.reschedule(when)
        except RuntimeError:  # the block has been left
            pass

    @property
    def elapsed(self) -> float:
        return self.loop.time() - self.started


@contextmanager
def clock(seconds: float, timeout: asyncio.Timeout) -> Iterator[ProgressClock]:
    """Makes a ``ProgressClock`` on ``timeout`` the current call's clock for the ``with`` block."""
    current = ProgressClock(seconds, timeout)
    token = _CLOCK.set(current)
    try:
        yield current
    finally:
        _CLOCK.reset(token)


def progressed() -> None:
    """Notes progress of the current call (a streamed token), if it runs under a progress deadline."""
    current = _CLOCK.get()
    if current is not None:
        current.progressed()


def expired() -> bool:
    """Whether the current call's deadline has passed (its cancellation is that of a call without progress)."""
    current = _CLOCK.get()
    return current is not None and current.timeout.expired()


@contextmanager
def waiting() -> Iterator[None]:
    """Time in this block (waiting for a slot) does not count against the current call's deadline."""
    current = _CLOCK.get()
    if current is None:
        yield
        return
    current.pause()
    try:
        yield
    finally:
        current.resume()
