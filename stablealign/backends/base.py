"""One async interface for every LLM backend: chat completions and embeddings.

Concrete backends implement ``_chat_once`` (one attempt, no retries); the base class adds what
every backend needs and that the original script lacked: a per-backend concurrency limit,
retries with exponential backoff and full jitter on 429/5xx/timeouts, and token/latency
accounting into Prometheus.

``ChatRequest.task`` and ``hints`` carry the structured context of a SANDBOX step (persona,
memories, ratings...). Real models ignore them — they read the prompt — but the offline
backend answers from them deterministically, so that the whole system runs with no key,
no GPU and no network.
"""

from __future__ import annotations

import abc
import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stablealign import metrics
from stablealign.errors import BackendError, ValidationError
from stablealign.logs import get_logger

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
    """A failure worth retrying: HTTP 429, 5xx, a timeout or a dropped connection."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    timeout: float = 120.0  # per attempt, seconds

    def delay(self, attempt: int) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** attempt)))


class ChatBackend(abc.ABC):
    """A chat model. ``chat`` is safe to call from many tasks at once."""

    name: str = "base"
    # Whether ``rate`` reads token probabilities (else callers parse the reply's text).
    rates_from_probabilities: bool = False

    def __init__(self, model: str, *, max_concurrency: int = 64, retry: RetryPolicy | None = None) -> None:
        self.model = model
        self.retry = retry or RetryPolicy()
        self._semaphore = asyncio.Semaphore(max_concurrency)

    @abc.abstractmethod
    async def _chat_once(self, request: ChatRequest) -> Completion:
        """One attempt; raise RetryableBackendError for transient failures, anything else is final."""

    async def chat(self, request: ChatRequest) -> Completion:
        return await self._call_with_retries(request, self._chat_once)

    async def _call_with_retries(self, request: ChatRequest,
                                 attempt_once: Callable[[ChatRequest], Awaitable[Completion]]) -> Completion:
        """``attempt_once`` under the concurrency limit, per-attempt timeout, retries and accounting."""
        started = time.perf_counter()
        last: Exception | None = None
        async with self._semaphore:
            for attempt in range(self.retry.attempts):
                try:
                    result = await asyncio.wait_for(attempt_once(request), timeout=self.retry.timeout)
                except (TimeoutError, RetryableBackendError) as exc:
                    last = exc
                    metrics.LLM_REQUESTS.labels(self.name, "chat", "retry").inc()
                    if attempt + 1 < self.retry.attempts:
                        delay = self.retry.delay(attempt)
                        log.warning("backend.retry", extra={"backend": self.name, "attempt": attempt + 1,
                                                            "delay_s": round(delay, 3), "error": str(exc)[:200]})
                        await asyncio.sleep(delay)
                    continue
                except (BackendError, ValidationError):  # final: a retry cannot fix a bad request
                    metrics.LLM_REQUESTS.labels(self.name, "chat", "error").inc()
                    raise
                except Exception as exc:  # noqa: BLE001 - a client error we did not classify
                    metrics.LLM_REQUESTS.labels(self.name, "chat", "error").inc()
                    raise BackendError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
                latency = time.perf_counter() - started
                metrics.LLM_REQUESTS.labels(self.name, "chat", "ok").inc()
                metrics.LLM_SECONDS.labels(self.name, "chat").observe(latency)
                metrics.LLM_TOKENS.labels(self.name, "prompt").inc(result.prompt_tokens)
                metrics.LLM_TOKENS.labels(self.name, "completion").inc(result.completion_tokens)
                return Completion(result.text, result.model or self.model, result.prompt_tokens,
                                  result.completion_tokens, latency, attempt + 1)
        metrics.LLM_REQUESTS.labels(self.name, "chat", "error").inc()
        raise BackendError(f"{self.name}: gave up after {self.retry.attempts} attempts: {last}")

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

        completion = await self._call_with_retries(request, once)
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
