"""OpenAI (and any OpenAI-compatible server: vLLM, TGI's /v1, llama.cpp...) through the official SDK.

The SDK's own retries are switched off (``max_retries=0``): ``ChatBackend`` retries with full
jitter under its concurrency limit, and counts every attempt in Prometheus, so there is one retry
policy for every backend and no retry inside a retry (the SDK sends each request once; a call
makes at most ``RetryPolicy.attempts`` attempts). Failures are sorted here: 429, 5xx, timeouts and dropped
connections are worth another attempt (``RetryableBackendError``, carrying the server's
``Retry-After``/``retry-after-ms`` from ``exc.response.headers``, which the next attempt waits at
least); any other 4xx is the caller's fault and is final (``BackendError`` carrying the status).

Ratings (``rate``) are read from token log-probabilities where the server gives them
(``logprobs``/``top_logprobs``: OpenAI, vLLM, llama.cpp's server): the distribution over the digits
1..scale at the generated token that holds the rating, its argmax the score. A server that returns
no log-probabilities, or rejects the request for them, is remembered, and its ratings are parsed
from the reply's text by the caller from then on.

Settings come from the SDK's own environment variables (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``)
unless given explicitly, so pointing the project at another server needs no new flag.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx2
import numpy as np
import openai
from openai.types.chat import ChatCompletion

from stablealign.core import metrics
from stablealign.core.config import HostSettings, load_settings
from stablealign.core.errors import BackendError, ConfigError
from stablealign.core.logs import get_logger
from stablealign.core.redaction import redact_text, redact_url
from stablealign.core.retry import Failure, retry_async
from stablealign.llm import progress
from stablealign.llm.backends.base import (
    MAX_RETRY_AFTER_SECONDS,
    RETRYABLE_4XX,
    ChatBackend,
    ChatRequest,
    Completion,
    DigitDistribution,
    Embedder,
    RatedCompletion,
    RetryableBackendError,
    RetryPolicy,
    answered,
    normalise_rows,
    parse_retry_after,
    refused,
)
from stablealign.llm.backends.openai_http import DirectChatCompletions, ReplyFields
from stablealign.llm.endpoints import OPENAI_DEFAULT_URL, canonical_url, openai_key_for
from stablealign.llm.prompt_format import count_tokens
from stablealign.sandbox.ratings import parse_rating

log = get_logger(__name__)

DEFAULT_CHAT_MODEL = "gpt-4o-mini"
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
# A key the SDK requires but a local OpenAI-compatible server ignores.
PLACEHOLDER_KEY = "sk-local-no-key"
EMBED_BATCH = 256
# Embedding requests of one ``embed`` call in flight at once.
EMBED_CONCURRENCY = 8
# Alternatives asked for at each generated token of a rating: OpenAI's (and llama.cpp's) maximum,
# so that every digit 1..7 is among them unless the model all but ignores it.
TOP_LOGPROBS = 20
# "Rating" (or score/grade), perhaps the scale quoted ("(1-7)"), then only punctuation or markdown
# before the digit: "Rating: **5", "Rating (1-7): 5".
_AFTER_LABEL = re.compile(r"\b(?:rating|score|grade)s?\b(?:\s*\(?\s*\d+\s*(?:-|–|—|to)\s*\d+\s*\)?)?"
                          r"[\s*_:=#\-–—'\"`>\[\(]{0,12}$", re.IGNORECASE)
# A digit that starts or ends a range ("1-7", "1 to 7") quotes the scale, it is not the rating.
_RANGE_BEFORE = re.compile(r"\d\s*(?:-|–|—|\bto)\s*$", re.IGNORECASE)
_RANGE_NEXT = re.compile(r"^\s*(?:-|–|—|to\b)", re.IGNORECASE)
# A digit token inside a longer number ("12", "2023", "5.5": tokenizers split digits) is no rating.
_NUMBER_BEFORE = re.compile(r"\d[.,]?$")
_NUMBER_NEXT = re.compile(r"^[.,]?\d")


def make_client(*, base_url: str | None, api_key: str | None, timeout: float,
                max_connections: int = 64) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` without SDK retries; a missing key is an error unless a base URL is set.

    Without an explicit ``api_key``, ``OPENAI_API_KEY`` is used only when ``base_url`` is the URL that key
    belongs to (``OPENAI_BASE_URL``, or OpenAI's API when that is unset): a key never goes to another server
    because somebody named its URL (``stablealign.llm.endpoints``)."""
    base_url = base_url or load_settings(HostSettings).openai_base_url or None
    api_key = api_key or openai_key_for(base_url)
    if api_key is None:
        if base_url is None or canonical_url(base_url) == canonical_url(OPENAI_DEFAULT_URL):
            raise ConfigError("OPENAI_API_KEY is not set (the openai backend needs a key, or OPENAI_BASE_URL "
                              "pointing at an OpenAI-compatible server)")
        api_key = PLACEHOLDER_KEY
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
                              http_client=_http_client(timeout, max_connections))


def _http_client(timeout: float, max_connections: int) -> Any:
    """The SDK's aiohttp transport when it is available, else its default httpx2 client.

    The aiohttp transport costs far less client CPU per call than the default pool (which scans every
    pooled connection on each request), and client CPU is what bounds a simulation on a few cores
    (figures: docs/benchmarks.md).

    The pool keeps as many connections alive as the backend runs calls at once: with the
    transport's default (20 kept alive, 100 at most) a round of hundreds of concurrent calls
    queued behind 100 sockets and re-opened the rest on every call.
    """
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    try:
        return openai.DefaultAioHttpClient(timeout=timeout, limits=limits)
    except RuntimeError:  # the SDK's aiohttp extra is missing
        return openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


def _root_cause(exc: BaseException) -> str:
    """`` (Type: message)`` of the innermost cause, e.g. the refused connection behind a timeout."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return "" if root is exc else f" ({type(root).__name__}: {str(root)[:200]})"


def classify(exc: Exception, backend: str, base_url: str | None = None) -> Exception:
    """Maps an SDK exception to RetryableBackendError (transient) or a final error: LLMRequestError for
    a 4xx (other than 408/409/429), BackendError otherwise. Messages never carry a credential."""
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return RetryableBackendError(redact_text(f"{backend}: {type(exc).__name__}: {exc}{_root_cause(exc)}"))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500 or status in RETRYABLE_4XX:
            retry_after = _retry_after(exc.response)
            waited = "" if retry_after is None else f" (retry after {retry_after:g}s)"
            return RetryableBackendError(redact_text(f"{backend}: HTTP {status}: {exc.message}{waited}"),
                                         retry_after=retry_after)
        if 400 <= status < 500:
            return refused(backend, base_url, status, exc.message)
        error = BackendError(redact_text(f"{backend}: HTTP {status}: {exc.message}"))
        error.status = status  # type: ignore[attr-defined]
        return error
    return BackendError(redact_text(f"{backend}: {type(exc).__name__}: {exc}"))


def _retry_after(response: Any) -> float | None:
    """The server's requested wait: ``retry-after-ms`` (OpenAI's), else ``Retry-After`` (seconds or a date)."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = parse_retry_after(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    return parse_retry_after(headers.get("retry-after"))


def _capped_retry_after(error: Exception) -> float | None:
    seconds = getattr(error, "retry_after", None)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER_SECONDS)


def _digit(token: str, scale: int) -> int | None:
    """The rating a token stands for (its stripped text is 1..scale), else None."""
    text = token.strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= scale:
        return int(text)
    return None


def rating_position(tokens: Sequence[str], scale: int) -> int | None:
    """Index of the generated token that holds the rating: a digit 1..scale on its own (not part of
    a longer number, nor of a range such as ``1-7``, which quotes the scale); None if there is none.

    The first such digit right after a ``Rating:`` label (only punctuation, markdown or the quoted
    scale between) wins, else the first one.
    """
    first: int | None = None
    seen = ""
    for index, token in enumerate(tokens):
        following = "".join(tokens[index + 1:index + 3])
        in_number = bool(_NUMBER_NEXT.match(following) or (not token[:1].isspace() and _NUMBER_BEFORE.search(seen)))
        in_range = bool(_RANGE_BEFORE.search(seen) or _RANGE_NEXT.match(following))
        if _digit(token, scale) is not None and not in_number and not in_range:
            if _AFTER_LABEL.search(seen):
                return index
            first = index if first is None else first
        seen += token
    return first


def digit_logprobs(alternatives: Sequence[tuple[str, float]], scale: int) -> dict[int, float]:
    """Log-probability of each digit 1..scale among a position's alternatives.

    Tokens are compared stripped of whitespace, so ``"5"`` and ``" 5"`` are the same rating and
    their probabilities add up; a token listed twice counts once.
    """
    probabilities: dict[int, float] = {}
    seen: set[str] = set()
    for token, logprob in alternatives:
        digit = _digit(token, scale)
        if digit is None or token in seen or logprob is None or not math.isfinite(logprob):
            continue
        seen.add(token)
        probabilities[digit] = probabilities.get(digit, 0.0) + math.exp(logprob)
    return {d: math.log(p) for d, p in probabilities.items() if p > 0}


def read_rating(content: Sequence[Any], scale: int) -> DigitDistribution | None:
    """The distribution over 1..scale at the rating's token of a ``logprobs.content`` list, or None.

    The generated token itself is counted with its alternatives (with sampling it may be missing
    from the top list).
    """
    tokens = [entry.token or "" for entry in content]
    index = rating_position(tokens, scale)
    if index is None:
        return None
    return distribution_at(content[index], scale)


def distribution_at(entry: Any, scale: int) -> DigitDistribution | None:
    """The digits' distribution at one generated token: the token and its top alternatives (digits
    outside the server's top list count 0), or None when no digit 1..scale is among them."""
    alternatives = [(top.token or "", top.logprob) for top in (entry.top_logprobs or [])]
    if entry.token not in {token for token, _ in alternatives}:
        alternatives.append((entry.token, entry.logprob))
    return DigitDistribution.from_logprobs(digit_logprobs(alternatives, scale), scale)


# The follow-up turn of a rating whose reply had no digit.
DIGIT_ONLY = "Now give only the number of your rating, from 1 to {scale}."


def rating_reply(text: str, digits: DigitDistribution) -> str:
    """The reply restated with the distribution's argmax, so that its text and its score agree."""
    return f"Rating: {digits.score} ### Reason: {parse_rating(text).reason}"


def _mentions_logprobs(error: Exception) -> bool:
    return getattr(error, "status", None) in (400, 422) and "logprob" in str(error).lower()


class OpenAIChatBackend(ChatBackend):
    """Chat completions on ``/v1/chat/completions``, plain or streamed; ratings from log-probabilities."""

    name = "openai"
    rates_from_probabilities = True

    def __init__(self, model: str = DEFAULT_CHAT_MODEL, *, base_url: str | None = None, api_key: str | None = None,
                 stream: bool = False, timeout: float = 60.0, max_concurrency: int = 64,
                 retry: RetryPolicy | None = None, max_retry_after: float = MAX_RETRY_AFTER_SECONDS) -> None:
        client = make_client(base_url=base_url, api_key=api_key, timeout=timeout, max_connections=max_concurrency)
        # A remote server: calls in flight adapt to what it sustains (backends/limiter.py), up to max_concurrency.
        super().__init__(model or DEFAULT_CHAT_MODEL, max_concurrency=max_concurrency,
                         retry=retry or RetryPolicy(timeout=timeout + 5.0), max_retry_after=max_retry_after,
                         adaptive=True, endpoint=str(client.base_url))
        self.stream = stream
        # Until a reply shows otherwise the server is taken to return log-probabilities.
        self.logprobs_supported = True
        self.client = client
        # Non-streamed calls: one lean POST with this client's URL, key and headers (openai_http.py:
        # ~0.6 instead of ~1.9 ms of CPU per call); clients with other kinds of auth stay on the SDK.
        self._direct = (DirectChatCompletions(self.client, timeout=timeout, max_connections=max_concurrency)
                        if DirectChatCompletions.supports(self.client) else None)
        log.info("backend.openai", extra={"model": self.model, "base_url": redact_url(str(self.client.base_url)),
                                          "stream": stream})

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model,
                                "messages": [{"role": m.role, "content": m.content} for m in request.messages],
                                "max_tokens": request.max_tokens, "temperature": request.temperature}
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    async def _post(self, body: dict[str, Any]) -> ChatCompletion | ReplyFields:
        """One non-streamed completion, read by attribute as the SDK's ``ChatCompletion``.

        With a fixed key: ``DirectChatCompletions`` (openai_http.py), one aiohttp POST and ``json.loads``
        with the client's own URL and headers, raising the SDK's exceptions. Else the SDK's own POST with
        its typed response, without `chat.completions.create`'s recursive TypedDict transform of the
        params (a large share of a call's CPU, docs/benchmarks.md): our body is already plain JSON.
        """
        try:
            if self._direct is not None:
                response = await self._direct.post(body)
            else:
                response = await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except openai.OpenAIError as exc:
            raise classify(exc, self.name, str(self.client.base_url)) from exc
        if not response.choices:
            raise RetryableBackendError(f"{self.name}: reply without choices")
        return response

    def _completion(self, response: ChatCompletion, messages: list[Any]) -> Completion:
        reply = response.choices[0].message.content or ""
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else sum(count_tokens(m["content"]) for m in messages)
        completion_tokens = usage.completion_tokens if usage else count_tokens(reply)
        return Completion(text=reply, model=response.model or self.model,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def _chat_once(self, request: ChatRequest) -> Completion:
        body = self._body(request)
        if self.stream:
            try:
                return await self._streamed(body, body["messages"])
            except openai.OpenAIError as exc:
                raise classify(exc, self.name, str(self.client.base_url)) from exc
        return self._completion(await self._post(body), body["messages"])

    async def _rate_once(self, request: ChatRequest, scale: int) -> RatedCompletion:
        """A rating with the digits' probabilities at the generated rating token (always non-streamed).

        Without log-probabilities in the reply (the server does not support them) the backend stops
        asking for them and the reply is returned as it is, for the caller to parse; with them but
        no digit 1..scale generated, ``digits`` is None as well.
        """
        if not self.logprobs_supported:
            return RatedCompletion(await self._chat_once(request))
        body = self._body(request)
        # A bool and at most 20: what OpenAI, the SDK's types and llama.cpp's server accept.
        body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        # An attempt after a failed follow-up (``_ask_for_the_digit``) re-uses the reply it follows up.
        kept = answered()
        response = kept.get("rating")
        if response is None:
            try:
                response = await self._post(body)
            except BackendError as exc:
                if not _mentions_logprobs(exc):
                    raise
                self._no_logprobs(str(exc))
                return RatedCompletion(await self._chat_once(request))
            kept["rating"] = response
        choice = response.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        completion = self._completion(response, body["messages"])
        if not content:
            if completion.text:  # text without a single token's log-probability: not supported
                self._no_logprobs("reply without logprobs")
            return RatedCompletion(completion)
        digits = read_rating(content, scale)
        if digits is None and completion.text.strip():
            digits, completion = await self._ask_for_the_digit(request, body, completion, scale)
        if digits is None:
            return RatedCompletion(completion)
        return RatedCompletion(replace(completion, text=rating_reply(completion.text, digits)), digits)

    async def _ask_for_the_digit(self, request: ChatRequest, body: dict[str, Any], completion: Completion,
                                 scale: int) -> tuple[DigitDistribution | None, Completion]:
        """The reply judged but wrote no rating (small models often do): ask in the same conversation
        for the digit alone and read the distribution at that one token. The first reply stays the reply
        (with a digit found, its words become the reason of ``rating_reply``).

        No server-side prefill of "Rating:" is portable across OpenAI-compatible servers; a follow-up
        turn is, and costs one short call.
        """
        follow = dict(body, max_tokens=2, temperature=0.0,
                      messages=[*body["messages"], {"role": "assistant", "content": completion.text},
                                {"role": "user", "content": DIGIT_ONLY.format(scale=scale)}])
        response = await self._post(follow)
        choice = response.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        # The digits' share of the first token's top alternatives, whatever token was generated: a
        # small model that answers the follow-up in words still ranks the digits there.
        digits = distribution_at(content[0], scale) if content else None
        extra = self._completion(response, follow["messages"])
        total = replace(completion, prompt_tokens=completion.prompt_tokens + extra.prompt_tokens,
                        completion_tokens=completion.completion_tokens + extra.completion_tokens)
        return digits, total

    def _no_logprobs(self, why: str) -> None:
        """Remembers that the server gives no log-probabilities: later ratings are parsed from text."""
        if self.logprobs_supported:
            log.warning("backend.openai.no_logprobs", extra={"model": self.model,
                                                            "base_url": redact_url(str(self.client.base_url)),
                                                            "reason": why[:200]})
        self.logprobs_supported = False
        self.rates_from_probabilities = False

    async def _streamed(self, kwargs: dict[str, Any], messages: list[Any]) -> Completion:
        """Joins the content deltas; usage comes from the final chunk when the server sends it."""
        stream = await self.client.chat.completions.create(**kwargs, stream=True,
                                                           stream_options={"include_usage": True})
        parts: list[str] = []
        model = self.model
        usage = None
        try:
            async for chunk in stream:
                progress.progressed()  # each chunk is progress: the call's deadline starts again
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        parts.append(choice.delta.content)
        finally:
            await stream.close()
        text = "".join(parts)
        prompt_tokens = usage.prompt_tokens if usage else sum(count_tokens(m["content"]) for m in messages)
        completion_tokens = usage.completion_tokens if usage else count_tokens(text)
        return Completion(text=text, model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self.client.close()


class OpenAIEmbedder(Embedder):
    """``/v1/embeddings`` in batches of at most 256 inputs; rows normalised to unit length."""

    name = "openai"

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, *, base_url: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0, batch_size: int = EMBED_BATCH,
                 retry: RetryPolicy | None = None) -> None:
        self.model = model or DEFAULT_EMBEDDING_MODEL
        self.batch_size = max(1, min(batch_size, EMBED_BATCH))
        self.retry = retry or RetryPolicy(timeout=timeout + 5.0)
        self.client = make_client(base_url=base_url, api_key=api_key, timeout=timeout)

    async def _embed_batch(self, batch: list[str]) -> np.ndarray:
        async def once(_attempt: int) -> Any:
            try:
                return await self.client.embeddings.create(model=self.model, input=batch)
            except openai.OpenAIError as exc:
                error = classify(exc, self.name, str(self.client.base_url))
                if not isinstance(error, RetryableBackendError):
                    metrics.LLM_REQUESTS.labels(self.name, "embed", "error").inc()
                raise error from exc

        def give_up(failure: Failure) -> BackendError:
            metrics.LLM_REQUESTS.labels(self.name, "embed", "error").inc()
            return BackendError(f"{self.name}: embeddings gave up after {failure.attempts} attempts: {failure.error}")

        # No per-attempt timeout of our own: the client's timeout bounds each request.
        response = await retry_async(
            once, replace(self.retry, timeout=None),
            retryable=lambda exc: isinstance(exc, RetryableBackendError),
            on_failure=lambda _failure: metrics.LLM_REQUESTS.labels(self.name, "embed", "retry").inc(),
            give_up=give_up, wait_at_least=_capped_retry_after)
        rows = sorted(response.data, key=lambda d: d.index)
        if len(rows) != len(batch):
            raise BackendError(f"{self.name}: asked for {len(batch)} embeddings, got {len(rows)}")
        metrics.LLM_REQUESTS.labels(self.name, "embed", "ok").inc()
        return np.asarray([r.embedding for r in rows], dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t if t else " " for t in texts]  # the API rejects empty strings
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # Batches at once (bounded), not one after another: a world's 1,700 prior questions are 7 requests,
        # 7 round trips of setup when sequential.
        limit = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def batch(start: int) -> np.ndarray:
            async with limit:
                return await self._embed_batch(texts[start:start + self.batch_size])

        chunks = await asyncio.gather(*(batch(i) for i in range(0, len(texts), self.batch_size)))
        return normalise_rows(np.concatenate(chunks, axis=0))

    async def aclose(self) -> None:
        await self.client.close()
