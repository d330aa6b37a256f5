"""What the LLM-calling services (agent, observer) share around one request: input checks, the
accounting of the model calls behind one reply (retries of unparsable replies included), and the
deadline of one model call: time without progress (a hung LLM is reported in seconds, naming the
step, the model and its endpoint)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from stablealign.core.errors import ConfigError, ConflictError, UnavailableError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm import progress
from stablealign.sandbox.ratings import RATING_SCALE, check_rating_fields, parse_rating
from stablealign.v1 import common_pb2, world_pb2

log = get_logger(__name__)
T = TypeVar("T")

# Backends whose model runs in this process: a call waits its turn in the batch (local_llm_deadline_seconds).
LOCAL_CHAT_BACKENDS = frozenset({"hf"})


def llm_deadline(settings: Any, backend: Any) -> float:
    """The deadline of one call to ``backend`` (ServiceSettings.llm_deadline_seconds, or the local one)."""
    if getattr(backend, "name", "") in LOCAL_CHAT_BACKENDS:
        return float(settings.local_llm_deadline_seconds)
    return float(settings.llm_deadline_seconds)


async def within_deadline(call: Awaitable[T], *, deadline: float | None, step: str, backend: Any,
                          context: Mapping[str, Any] | None = None) -> T:
    """``await call``, until it has gone ``deadline`` seconds without progress (None: no limit).

    Time the call waits for a place under its backend's concurrency limit does not count, and each
    streamed token starts the clock again (``stablealign.llm.progress``): a call that takes its turn
    behind others at a one-request-at-a-time server is not a hung model. Past the deadline the call is
    cancelled — its HTTP request closed, the backend's retries with it — and UnavailableError (503)
    names the step, the model and its endpoint: a hung LLM is reported once, in seconds, rather than
    after every retry of every layer above has timed out.
    """
    if deadline is None:
        return await call
    timer = asyncio.timeout(deadline)
    try:
        async with timer:
            with progress.clock(deadline, timer) as clock:
                return await call
    except TimeoutError:
        if not timer.expired():
            raise  # the call's own timeout, not ours
    name, model = getattr(backend, "name", "?"), getattr(backend, "model", "") or "?"
    endpoint = getattr(backend, "endpoint", "")
    log.warning("llm.deadline_exceeded", extra={"step": step, "backend": name, "model": model,
                                                "endpoint": endpoint, "deadline_s": deadline,
                                                "elapsed_s": round(clock.elapsed, 1),
                                                "waited_s": round(clock.paused_seconds, 1), **(context or {})})
    where = f" at {endpoint}" if endpoint else ""
    waited = (f", {clock.paused_seconds:.1f}s of it waiting for a place under the backend's concurrency limit"
              if clock.paused_seconds >= 0.05 else "")
    raise UnavailableError(f"{step}: model {name}:{model}{where} made no progress for {deadline:g}s "
                           f"(llm_deadline_seconds; {clock.elapsed:.1f}s since the call began{waited}); "
                           f"the call was cancelled")


@dataclass
class CallTally:
    """Sums ``Completion`` accounting over the calls behind one reply, into a ``CallStats``."""

    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_seconds: float = 0.0
    attempts: int = 0

    def add(self, completion: Any) -> None:
        self.model = completion.model or self.model
        self.prompt_tokens += int(completion.prompt_tokens)
        self.completion_tokens += int(completion.completion_tokens)
        self.latency_seconds += float(completion.latency_seconds)
        self.attempts += int(completion.attempts)

    def stats(self) -> common_pb2.CallStats:
        return common_pb2.CallStats(model=self.model, prompt_tokens=self.prompt_tokens,
                                    completion_tokens=self.completion_tokens,
                                    latency_seconds=self.latency_seconds, attempts=self.attempts)


@dataclass(frozen=True)
class RatedReply:
    """A rating reply as the services record it: the raw text, its rating (None when missing) and
    reason, and — when the backend read token probabilities — the expected rating and P(1..7)."""

    text: str
    score: int | None
    reason: str
    expected: float | None = None
    probabilities: tuple[float, ...] = ()


async def chat_until_rated(backend: Any, tally: CallTally, attempts: int,
                           request_for: Callable[[int], Any], *, deadline: float | None = None,
                           step: str = "rate", context: Mapping[str, Any] | None = None) -> RatedReply:
    """Asks for a ``Rating: <n> ### Reason: <text>`` reply until it has a rating, at most ``attempts`` times.

    Backends that read token probabilities (``ChatBackend.rate``) always give one on the first
    attempt: the argmax of the digits' probabilities where the rating goes; their expectation is
    kept too. Others are parsed from text (``parse_rating``), and ``request_for(attempt)`` builds
    each attempt's ChatRequest with a new seed so that a retry is not the same sample. The score
    stays None when no reply could be read — the caller records it as missing, never as a number.

    A backend's distribution that breaks the rating contract (not P(1..7), not finite, not summing
    to 1: ``check_rating_fields``) is discarded with a warning and the reply's text is parsed
    instead, as for a backend without probabilities: such numbers never reach a record.

    Each call has ``deadline`` seconds (``within_deadline``: UnavailableError naming ``step``).
    """
    reply = RatedReply("", None, "")
    for attempt in range(attempts):
        rated = await within_deadline(backend.rate(request_for(attempt), scale=RATING_SCALE), deadline=deadline,
                                      step=step, backend=backend, context=context)
        tally.add(rated.completion)
        text = rated.completion.text.strip()
        parsed = parse_rating(text, RATING_SCALE)
        digits = rated.digits
        if digits is not None:
            try:
                check_rating_fields("backend rating", score=digits.score, expected=digits.expected,
                                    probabilities=digits.probabilities, scale=RATING_SCALE)
            except (ValidationError, TypeError, ValueError) as exc:
                log.warning("ratings.probabilities_rejected", extra={"backend": getattr(backend, "name", ""),
                                                                     "reason": str(exc)})
            else:
                return RatedReply(text, digits.score, parsed.reason, digits.expected, digits.probabilities)
        reply = RatedReply(text, parsed.score, parsed.reason)
        if parsed.score is not None:
            break
    return reply


def check_text(value: str, name: str, limit: int) -> str:
    """The stripped text; ValidationError when it is empty or longer than ``limit`` characters."""
    if len(value) > limit:
        raise ValidationError(f"{name} has {len(value)} characters, more than the limit of {limit}")
    text = value.strip()
    if not text:
        raise ValidationError(f"{name} must not be empty")
    return text


def check_round(round_: int) -> None:
    if round_ < 0:
        raise ValidationError(f"round must be >= 0, got {round_}")


def world_chat_backend(world: world_pb2.World, role: str, ref: common_pb2.ModelRef):
    """The chat backend a world names for ``role``; an unusable one is the world's problem (ConflictError)."""
    from stablealign.llm.backends import get_chat_backend  # late: backends pull optional heavy modules

    try:
        return get_chat_backend(ref)
    except (ConfigError, ValidationError) as exc:
        raise ConflictError(f"world {world.spec.world_id}: {role} model {ref.backend or '?'}:"
                            f"{ref.model or ''} is unusable: {exc}") from exc
