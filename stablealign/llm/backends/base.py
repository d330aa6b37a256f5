"""One async interface for every LLM backend: chat completions and embeddings.

Concrete backends implement ``_chat_once`` (one attempt, no retries); the base class adds what
every backend needs and that the original script lacked: a per-backend concurrency limit (for a
remote server, learned from its latency: ``limiter.py``; a place is taken per attempt, and waiting
for one is not time without progress for the step's deadline, ``stablealign.llm.progress``),
retries with exponential backoff and full jitter on 429/5xx/timeouts (``stablealign.core.retry``; a
server's ``Retry-After`` makes the wait at least that long, up to ``max_retry_after``), and
token/latency accounting into Prometheus.

``ChatRequest.task`` and ``hints`` carry the structured context of a SANDBOX step (persona,
memories, ratings...). Real models ignore them — they read the prompt — but the offline
backend answers from them deterministically, so that the whole system runs with no key,
no GPU and no network.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stablealign.core import metrics
from stablealign.core.errors import BackendError, LLMRequestError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.core.redaction import redact_text, redact_url
from stablealign.core.retry import AttemptTimeoutError, Failure, RetryPolicy, retry_async
from stablealign.llm import progress
from stablealign.llm.backends.limiter import AdaptiveLimit, ConcurrencyLimiter, limit_settings

log = get_logger(__name__)

# Tasks of the SANDBOX (the hint an offline backend answers from).
TASK_CHAT = "chat"
TASK_DRAFT = "draft"
TASK_FEEDBACK = "feedback"
TASK_REVISE = "revise"
TASK_RATE_ALIGNMENT = "rate_alignment"
TASK_RATE_ENGAGEMENT = "rate_engagement"


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: Sequence[ChatMessage]
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None
    task: str = TASK_CHAT
    hints: Mapping[str, Any] = field(default_factory=dict)
    # A rating read from token probabilities needs no generated reason when only the number is used
    # (the judge's agreement with human preference): backends that read probabilities then skip it.
    rating_reason: bool = True


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_seconds: float = 0.0
    attempts: int = 1


@dataclass(frozen=True)
class DigitDistribution:
    """A 1..scale rating read from a model's next-token probabilities over the digits 1..scale.

    Small models often cannot keep to ``Rating: <n> ### Reason: <text>`` in free text, but the
    probability they give each digit right after ``Rating:`` is always there: the argmax is the
    rating, the expectation a finer figure kept beside it.
    """

    probabilities: tuple[float, ...]  # P(1..scale), renormalised over the digits

    @property
    def score(self) -> int:
        return max(range(len(self.probabilities)), key=lambda i: self.probabilities[i]) + 1

    @property
    def expected(self) -> float:
        return float(sum((i + 1) * p for i, p in enumerate(self.probabilities)))

    @classmethod
    def from_logprobs(cls, logprobs: Mapping[int, float], scale: int) -> DigitDistribution | None:
        """From log-probabilities of some digits (missing digits: probability 0); None if none is there."""
        import math

        weights = [math.exp(logprobs[d]) if d in logprobs and math.isfinite(logprobs[d]) else 0.0
                   for d in range(1, scale + 1)]
        total = sum(weights)
        if total <= 0:
            return None
        return cls(tuple(w / total for w in weights))


@dataclass(frozen=True)
class RatedCompletion:
    """A rating reply: its text ("Rating: <n> ### Reason: <text>") and, where the backend can read
    token probabilities, the distribution over the digits at the rating's position."""

    completion: Completion
    digits: DigitDistribution | None = None


class RetryableBackendError(Exception):
    """A failure worth retrying: HTTP 429, 5xx, a timeout or a dropped connection.

    ``retry_after``: seconds the server asked to wait (its ``Retry-After`` header), else None; the next
    attempt waits at least that long (capped by ``ChatBackend.max_retry_after``).
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# 4xx statuses worth another attempt: a request timeout, a conflict, a rate limit. Any other 4xx is the
# request's own fault (LLMRequestError): final at every layer.
RETRYABLE_4XX = frozenset({408, 409, 429})


def refused(backend: str, base_url: str | None, status: int, message: str) -> LLMRequestError:
    """The final error of an HTTP 4xx from an LLM server; 401/403 said as what they are: a refused key.

    The URL is redacted (``stablealign.core.redaction``) and the server's message scrubbed of key-shaped text:
    an error travels to the world's record, NATS headers and logs.
    """
    where = f"the {backend} endpoint at {redact_url(base_url or '?').rstrip('/')}"
    detail = redact_text(message)[:300]
    if status in (401, 403):
        return LLMRequestError(f"{where} refused the API key ({status}): {detail}", status=status)
    return LLMRequestError(f"{where} refused the request (HTTP {status}, not retried): {detail}", status=status)


# The longest server-directed wait (Retry-After) a backend honours before its next attempt, seconds.
MAX_RETRY_AFTER_SECONDS = 60.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds ("1", "1.5") or an HTTP date
    ("Wed, 21 Oct 2015 07:28:00 GMT", relative to ``now``); None when absent or unreadable.
    A date in the past is 0."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is always GMT
            import datetime

            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds == float("inf"):  # NaN or infinite: unusable
        return None
    return max(0.0, seconds)


def make_limiter(backend: str, endpoint: str, max_concurrency: int, *, adaptive: bool) -> ConcurrencyLimiter:
    """The limit of calls in flight to one endpoint: learned from its latency for a remote server
    (``adaptive``, unless ``STABLEALIGN_LLM_LIMIT_ADAPTIVE=false``), else ``max_concurrency``."""
    limit = None
    if adaptive:
        settings = limit_settings()
        if settings.adaptive:
            limit = AdaptiveLimit(max_concurrency, initial=settings.initial, tolerance=settings.tolerance,
                                  backoff=settings.backoff)
    return ConcurrencyLimiter(max_concurrency, limit=limit, backend=backend, endpoint=endpoint)


# Replies that one call's attempts already got, by what they answered: a retry after a later failure (the
# follow-up of a rating) sends only what failed, never again what was answered.
_ANSWERED: ContextVar[dict[str, Any] | None] = ContextVar("llm_answered", default=None)


def answered() -> dict[str, Any]:
    """The current call's replies kept across its attempts (a throwaway dict outside ``rate``)."""
    memo = _ANSWERED.get()
    return {} if memo is None else memo


class ChatBackend(abc.ABC):
    """A chat model. ``chat`` is safe to call from many tasks at once."""

    name: str = "base"
    # Whether ``rate`` reads token probabilities (else callers parse the reply's text).
    rates_from_probabilities: bool = False

    def __init__(self, model: str, *, max_concurrency: int = 64, retry: RetryPolicy | None = None,
                 max_retry_after: float = MAX_RETRY_AFTER_SECONDS, adaptive: bool = False,
                 endpoint: str = "") -> None:
        self.model = model
        self.retry = retry or RetryPolicy()
        # A server's Retry-After is honoured up to this many seconds (a longer one waits this long).
        self.max_retry_after = max_retry_after
        # Where the calls go (redacted), for errors and the limit's gauge; "" for an in-process model.
        self.endpoint = redact_url(endpoint).rstrip("/") if endpoint else ""
        self.limiter = make_limiter(self.name, self.endpoint, max_concurrency, adaptive=adaptive)

    @abc.abstractmethod
    async def _chat_once(self, request: ChatRequest) -> Completion:
        """One attempt; raise RetryableBackendError for transient failures, anything else is final."""

    async def chat(self, request: ChatRequest) -> Completion:
        return await self._call_with_retries(request, self._chat_once)

    async def _call_with_retries(self, request: ChatRequest,
                                 attempt_once: Callable[[ChatRequest], Awaitable[Completion]]) -> Completion:
        """``attempt_once`` under the concurrency limit, per-attempt timeout, retries and accounting."""
        started = time.perf_counter()
        limiter, timeout = self.limiter, self.retry.timeout

        async def once(attempt: int) -> tuple[Completion, int]:
            # A place under the limit per attempt (none is held while backing off), and the attempt's timeout
            # from when it has one: waiting for a place is not the server being slow.
            slot = await limiter.acquire()
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    completion = await attempt_once(request)
            except TimeoutError as exc:
                limiter.release(slot, overloaded=True)
                if deadline.expired():
                    raise AttemptTimeoutError(f"attempt {attempt} timed out after {timeout:g}s") from exc
                raise
            except RetryableBackendError:
                limiter.release(slot, overloaded=True)
                raise
            except asyncio.CancelledError:
                # Cancelled by the step's deadline (no progress): the server is not keeping up, as for a timeout.
                limiter.release(slot, overloaded=progress.expired())
                raise
            except BaseException:
                limiter.release(slot)
                raise
            limiter.release(slot, tokens=completion.completion_tokens, kind=request.task)
            return completion, attempt

        def on_failure(failure: Failure) -> None:
            metrics.LLM_REQUESTS.labels(self.name, "chat", "retry").inc()
            if failure.delay is not None:
                log.warning("backend.retry", extra={"backend": self.name, "attempt": failure.attempt,
                                                    "delay_s": round(failure.delay, 3),
                                                    "error": str(failure.error)[:200]})

        def give_up(failure: Failure) -> BackendError:
            return BackendError(f"{self.name}: gave up after {failure.attempts} attempts: {failure.error}")

        try:
            result, attempts = await retry_async(
                once, self._retry_unbounded, on_failure=on_failure, give_up=give_up,
                retryable=lambda exc: isinstance(exc, (TimeoutError, RetryableBackendError)),
                wait_at_least=self._retry_after)
        except (BackendError, ValidationError):  # final (a retry cannot fix a bad request), or gave up
            metrics.LLM_REQUESTS.labels(self.name, "chat", "error").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a client error we did not classify
            metrics.LLM_REQUESTS.labels(self.name, "chat", "error").inc()
            raise BackendError(redact_text(f"{self.name}: {type(exc).__name__}: {exc}")) from exc
        latency = time.perf_counter() - started
        metrics.LLM_REQUESTS.labels(self.name, "chat", "ok").inc()
        metrics.LLM_SECONDS.labels(self.name, "chat").observe(latency)
        metrics.LLM_TOKENS.labels(self.name, "prompt", request.task).inc(result.prompt_tokens)
        metrics.LLM_TOKENS.labels(self.name, "completion", request.task).inc(result.completion_tokens)
        return Completion(result.text, result.model or self.model, result.prompt_tokens,
                          result.completion_tokens, latency, attempts)

    @property
    def _retry_unbounded(self) -> RetryPolicy:
        """The retry policy without its per-attempt timeout, which ``once`` applies after the wait for a place
        (made once per policy: a call's path is hot)."""
        cached = self.__dict__.get("_unbounded")
        if cached is None or cached[0] is not self.retry:
            cached = self.__dict__["_unbounded"] = (self.retry, replace(self.retry, timeout=None))
        return cached[1]

    def _retry_after(self, error: Exception) -> float | None:
        """The server-directed wait of a failure (Retry-After), capped at ``max_retry_after``."""
        seconds = getattr(error, "retry_after", None)
        return None if seconds is None else min(float(seconds), self.max_retry_after)

    async def _rate_once(self, request: ChatRequest, scale: int) -> RatedCompletion:
        """One attempt at a rating with token probabilities; only for backends that set
        ``rates_from_probabilities``."""
        raise NotImplementedError

    async def rate(self, request: ChatRequest, *, scale: int = 7) -> RatedCompletion:
        """A rating reply to ``request`` (a prompt asking for ``Rating: <1-scale> ### Reason: <text>``).

        Backends that can read token probabilities (``rates_from_probabilities``) return the
        distribution over the digits 1..scale where the rating goes, and a reply whose rating is
        its argmax; the others return a plain ``chat`` reply with ``digits`` None, to be parsed.
        Retries, the concurrency limit and accounting are those of ``chat``.
        """
        if not self.rates_from_probabilities:
            return RatedCompletion(await self.chat(request))
        holder: list[RatedCompletion] = []

        async def once(req: ChatRequest) -> Completion:
            rated = await self._rate_once(req, scale)
            holder.append(rated)
            return rated.completion

        token = _ANSWERED.set({})  # what this rating's attempts got already (``answered``)
        try:
            completion = await self._call_with_retries(request, once)
        finally:
            _ANSWERED.reset(token)
        return RatedCompletion(completion, holder[-1].digits)

    async def aclose(self) -> None:
        """Releases connections; the default has none."""


class Embedder(abc.ABC):
    """Sentence embeddings, returned as float32 rows of unit length (so cosine = dot product)."""

    name: str = "base"
    model: str = ""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Returns an array of shape (len(texts), dim)."""

    async def aclose(self) -> None:
        """Releases resources; the default has none."""


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms
