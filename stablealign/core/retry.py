"""The one retry helper of the project, on tenacity: NATS requests, LLM backends, interactions.

A retried operation has a ``RetryPolicy`` (how many attempts, how long one attempt may take, how
long to wait between attempts), a predicate saying which failures are worth another attempt
(anything else is final and raised as it is, at once), and two hooks for logging and Prometheus:
``on_failure`` after each retryable failure (before the wait, so before each retry, and once more
after the last attempt), and ``give_up``, which makes the error raised when the attempts are spent.
A failure may also ask for a longer wait than the backoff (``wait_at_least``: an HTTP ``Retry-After``).

``asyncio.CancelledError`` — like any ``BaseException`` that is not an ``Exception`` — is never
retried, never reported to the hooks, and propagates at once.

The first attempt runs without tenacity: nearly every operation (a NATS request, an LLM call)
succeeds at once, and building tenacity's retry state for each was a measurable cost, paid many
times per interaction (docs/benchmarks.md). Only a first attempt that fails retryably hands the remaining attempts to tenacity,
with the same waits, hooks and attempt numbers as if it had run them all.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

T = TypeVar("T")

Jitter = Literal["full", "proportional", "none"]
_JITTERS = ("full", "proportional", "none")


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts, per-attempt timeout and capped exponential backoff of a retried operation.

    The wait after the n-th failed attempt (n = 0, 1, ...) is ``min(max_delay, base_delay * 2**n)``,
    jittered: ``full`` draws it uniformly from [0, that] (AWS architecture blog, "full jitter"),
    ``proportional`` multiplies it by a uniform factor in [0.5, 1.5), ``none`` waits exactly that.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    timeout: float | None = 120.0  # per attempt, seconds; None: the operation bounds its own time
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.jitter not in _JITTERS:
            raise ValueError(f"RetryPolicy.jitter must be one of {_JITTERS}, got {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the failed attempt number ``attempt`` (counted from 0)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** min(attempt, 64)))  # no float overflow
        if self.jitter == "full":
            return random.uniform(0, ceiling)
        if self.jitter == "proportional":
            return ceiling * (0.5 + random.random())
        return ceiling


class AttemptTimeoutError(TimeoutError):
    """One attempt ran past ``RetryPolicy.timeout``; always retryable."""


@dataclass(frozen=True)
class Failure:
    """A retryable failure, as the hooks see it."""

    attempt: int  # the attempt that failed, counted from 1
    attempts: int  # the policy's attempts
    error: Exception
    delay: float | None  # seconds before the next attempt; None when this was the last one

    @property
    def final(self) -> bool:
        return self.delay is None


async def retry_async(
    operation: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retryable: Callable[[Exception], bool],
    on_failure: Callable[[Failure], None] | None = None,
    give_up: Callable[[Failure], BaseException] | None = None,
    wait_at_least: Callable[[Exception], float | None] | None = None,
) -> T:
    """``await operation(attempt)`` (attempt counted from 1) until it returns, at most ``policy.attempts`` times.

    Each attempt runs under ``policy.timeout`` (if set); running past it raises
    ``AttemptTimeoutError``, a retryable failure. An ``Exception`` for which ``retryable`` is true
    is retried after ``policy.delay``; any other is raised at once, untouched. When the last attempt
    fails retryably, ``give_up(failure)`` is raised (from the last error), or, without ``give_up``,
    the last error itself. ``wait_at_least(error)`` (if given) may return seconds that the wait after
    that failure must not be shorter than (the caller caps it); None keeps the backoff.
    """
    attempt = 0

    async def once() -> T:
        nonlocal attempt
        attempt += 1
        if policy.timeout is None:
            return await operation(attempt)
        deadline = asyncio.timeout(policy.timeout)
        try:
            async with deadline:
                return await operation(attempt)
        except TimeoutError as exc:
            if deadline.expired():
                raise AttemptTimeoutError(f"attempt {attempt} timed out after {policy.timeout:g}s") from exc
            raise

    def is_retryable(exc: BaseException) -> bool:
        return isinstance(exc, Exception) and (isinstance(exc, AttemptTimeoutError) or retryable(exc))

    def waited(index: int, error: BaseException | None) -> float:
        """The wait after failed attempt ``index`` (from 0): the backoff, or the error's floor if longer."""
        delay = policy.delay(index)
        if wait_at_least is not None and isinstance(error, Exception):
            floor = wait_at_least(error)
            if floor is not None and floor > delay:
                delay = floor
        return delay

    def give_up_with(last: Failure) -> T:
        if on_failure is not None:
            on_failure(last)
        if give_up is None:
            raise last.error
        raise give_up(last) from last.error

    # The first attempt, without tenacity (see the module docstring); a final error is raised as it is.
    try:
        return await once()
    except Exception as exc:
        if not is_retryable(exc):
            raise
        first = exc
    if policy.attempts == 1:
        return give_up_with(Failure(1, 1, first, None))
    delay = waited(0, first)
    if on_failure is not None:
        on_failure(Failure(1, policy.attempts, first, delay))
    await asyncio.sleep(delay)

    return await _later_attempts(once, policy, is_retryable=is_retryable, waited=waited,
                                 give_up_with=give_up_with, on_failure=on_failure)


async def _later_attempts(
    once: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    is_retryable: Callable[[BaseException], bool],
    waited: Callable[[int, BaseException | None], float],
    give_up_with: Callable[[Failure], T],
    on_failure: Callable[[Failure], None] | None,
) -> T:
    """Attempts 2.. of ``retry_async`` under tenacity, after a first attempt that failed retryably (and its
    wait), with the same waits, hooks and attempt numbers as if tenacity had run them all."""
    done = 1  # tenacity's own count starts again at 1: ``done`` attempts ran already

    def failure(state: RetryCallState, delay: float | None) -> Failure:
        error = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(error, Exception)  # only retryable failures get here
        return Failure(state.attempt_number + done, policy.attempts, error, delay)

    def before_sleep(state: RetryCallState) -> None:
        if on_failure is not None:
            on_failure(failure(state, state.next_action.sleep if state.next_action else 0.0))

    def exhausted(state: RetryCallState) -> T:
        return give_up_with(failure(state, None))

    def wait(state: RetryCallState) -> float:
        return waited(state.attempt_number - 1 + done,
                      state.outcome.exception() if state.outcome is not None else None)

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts - done),
        wait=wait,
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        retry_error_callback=exhausted,
        sleep=asyncio.sleep,
    )
    return await retrying(once)
