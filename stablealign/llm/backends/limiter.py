"""How many calls a backend endpoint gets at once, learned from the latency it answers with.

Why: a fixed limit is wrong for every server but one. llama.cpp's server decodes one request at a
time, so a thousand calls in flight only wait in its queue, each past its timeout; a batching
server (vLLM, TGI, ``hf``) or a remote API serves many at once and would be starved by a small
fixed limit. So a remote backend's limit adapts, as adaptive concurrency limiters do (Netflix's
concurrency-limits, Envoy's adaptive concurrency): additive increase while latency stays near the
lowest seen, multiplicative decrease when it grows past ``tolerance`` times that, and on a timeout,
a 429, a 5xx or a dropped connection. A server that queues makes latency grow with every call
added; one that batches keeps it flat, and the limit grows up to the configured maximum.

Latency is compared per kind of call (``ChatRequest.task``: a draft is not a rating) and per
generated token (plus a few for the prompt), so that a long reply is not read as a slow server.
Like TCP's congestion window, the limit doubles per round trip until the first sign of queueing
(slow start), then grows by about one per round trip; it decreases at most once per round trip:
a sample from a call that started before the last decrease says nothing new. Every few dozen round
trips one call is sent alone (a probe) and its latency becomes the floor of its kind: a floor taken
while calls queued (a cold server's slow first replies) or a server that became slower for good
does not hold the limit wrong for ever.

``AdaptiveLimit`` holds the dynamics (no clock, no asyncio: fed latencies, it is deterministic);
``ConcurrencyLimiter`` admits calls in FIFO order under it, and reports the limit as the gauge
``stablealign_llm_concurrency_limit``. Time a call waits here is not time without progress
(``stablealign.llm.progress``).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stablealign.core import metrics
from stablealign.core.config import Settings, load_settings
from stablealign.llm import progress

ENV_PREFIX = "STABLEALIGN_LLM_LIMIT_"
# A call's latency is compared per (generated tokens + this): the prompt costs something too.
PROMPT_TOKEN_EQUIVALENT = 4
# A probe (one call alone, to measure the unloaded latency again) after this many limits' worth of answers:
# about every this many round trips, as Netflix's Vegas limit does.
PROBE_EVERY = 30


class LimitSettings(Settings):
    """``STABLEALIGN_LLM_LIMIT_<FIELD>``: the adaptive concurrency limit of remote backends (openai, tgi)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    adaptive: bool = Field(True, description=(
        "Learn each remote endpoint's concurrency from its latency; false: a fixed limit of "
        "STABLEALIGN_LLM_MAX_CONCURRENCY calls in flight."))
    initial: int = Field(2, ge=1, description="Calls in flight at first, before anything is learned.")
    tolerance: float = Field(1.5, gt=1.0, description=(
        "Latency per token up to this many times the lowest seen for that kind of call counts as no queueing "
        "(the limit may grow); above it the limit shrinks."))
    backoff: float = Field(0.75, gt=0.0, lt=1.0, description="Factor of a decrease of the limit.")


def limit_settings(**overrides: object) -> LimitSettings:
    return load_settings(LimitSettings, overrides, prefix=ENV_PREFIX)


class AdaptiveLimit:
    """AIMD on latency: the number of calls allowed in flight, from samples of finished calls."""

    def __init__(self, max_limit: int, *, initial: int = 4, min_limit: int = 1, tolerance: float = 1.5,
                 backoff: float = 0.75) -> None:
        if max_limit < 1 or not 1 <= min_limit <= max_limit:
            raise ValueError(f"limits must satisfy 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.tolerance = tolerance
        self.backoff = backoff
        self.limit = float(min(max(initial, min_limit), max_limit))
        self.epoch = 0  # decreases (and probes) so far: a call remembers the epoch it started in
        self.slow_start = True
        self.floors: dict[str, float] = {}  # the lowest latency per token seen, per kind of call
        self.probing = False
        self._until_probe = PROBE_EVERY * self.limit

    @property
    def allowed(self) -> int:
        """Calls that may be in flight now."""
        if self.probing:
            return self.min_limit
        return max(self.min_limit, min(self.max_limit, math.floor(self.limit + 1e-9)))

    def success(self, latency: float, *, tokens: int = 0, kind: str = "", epoch: int | None = None,
                in_flight: int | None = None) -> None:
        """A call that started in ``epoch`` with ``in_flight`` calls out (itself included) answered after
        ``latency`` seconds with ``tokens`` generated tokens."""
        if not math.isfinite(latency) or latency < 0:
            return
        cost = latency / (max(0, tokens) + PROMPT_TOKEN_EQUIVALENT)
        if self.probing:
            if epoch == self.epoch and in_flight is not None and in_flight <= self.min_limit:
                self.floors[kind] = cost  # sent alone: the unloaded latency, measured afresh (lower or higher)
                self.probing = False
                self._until_probe = PROBE_EVERY * self.limit
            return  # the other answers of a probe come from calls queued before it: they say nothing new
        floor = self.floors.get(kind)
        if floor is None or cost < floor:
            self.floors[kind] = floor = cost
        elif in_flight is not None and in_flight <= 1:
            # Alone (nothing of ours queued beside it): a measure of the server unloaded, so a floor from a
            # lucky moment, or a server that became slower for good, does not hold the limit down for ever.
            self.floors[kind] = floor = floor + 0.1 * (cost - floor)
        if cost > self.tolerance * max(floor, 1e-9):
            self._decrease(epoch)
        elif in_flight is None or in_flight >= self.allowed / 2:  # only a limit in use is worth raising
            self.limit = min(float(self.max_limit), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))
        self._until_probe -= 1
        if self._until_probe <= 0 and self.allowed > self.min_limit:
            # Every so often, one call alone: a floor taken while calls queued (the first replies of a cold server
            # came slowly, and all since waited behind others) would otherwise hold the limit too high for ever.
            self.probing = True
            self.epoch += 1

    def dropped(self, *, epoch: int | None = None) -> None:
        """A call that started in ``epoch`` failed in a way that says the server is overloaded (a timeout,
        429, 5xx, a dropped connection)."""
        self._decrease(epoch)

    def _decrease(self, epoch: int | None) -> None:
        if epoch is not None and epoch != self.epoch:
            return  # it started before the last decrease: that decrease already answered it
        self.slow_start = False
        self.limit = max(float(self.min_limit), self.limit * self.backoff)
        self.epoch += 1


@dataclass
class Slot:
    """One admitted call: when it started and under which epoch of the limit."""

    epoch: int
    in_flight: int
    started: float
    done: bool = False


class ConcurrencyLimiter:
    """Admits calls to one endpoint, first come first served, while fewer than the limit are in flight.

    ``limit`` is an ``AdaptiveLimit`` (remote backends) or None: a fixed ``max_limit``.
    """

    def __init__(self, max_limit: int, *, limit: AdaptiveLimit | None = None, backend: str = "",
                 endpoint: str = "") -> None:
        self.max_limit = max_limit
        self.adaptive = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._gauge = metrics.LLM_CONCURRENCY_LIMIT.labels(backend or "?", endpoint or "-")
        self._gauge.set(self.allowed)

    @property
    def allowed(self) -> int:
        return self.adaptive.allowed if self.adaptive is not None else self.max_limit

    async def acquire(self) -> Slot:
        """Waits (off the current call's progress deadline) for a place, then takes it."""
        if self.in_flight >= self.allowed or self._waiters:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with progress.waiting():
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():  # given a place just as it was cancelled
                        self.in_flight -= 1
                        self._wake()
                    else:
                        self._waiters.remove(waiter)
                    raise
        else:
            self.in_flight += 1
        loop_time = asyncio.get_running_loop().time()
        return Slot(self.adaptive.epoch if self.adaptive else 0, self.in_flight, loop_time)

    def release(self, slot: Slot, *, tokens: int | None = None, kind: str = "", overloaded: bool = False) -> None:
        """Gives the place back. ``tokens``: the call answered (a latency sample); ``overloaded``: it failed
        for want of capacity (timeout, 429, 5xx, dropped connection); neither: no sample (a bad request, a
        cancelled call)."""
        if slot.done:
            return
        slot.done = True
        self.in_flight -= 1
        if self.adaptive is not None:
            if overloaded:
                self.adaptive.dropped(epoch=slot.epoch)
            elif tokens is not None:
                latency = asyncio.get_running_loop().time() - slot.started
                self.adaptive.success(latency, tokens=tokens, kind=kind, epoch=slot.epoch, in_flight=slot.in_flight)
            self._gauge.set(self.allowed)
        self._wake()

    def _wake(self) -> None:
        """Hands free places to the waiters, oldest first (a place is taken for the waiter at once)."""
        while self._waiters and self.in_flight < self.allowed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
