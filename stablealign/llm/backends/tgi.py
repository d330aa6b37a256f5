"""A text-generation-inference server (the "local agents") through the ``text-generation`` client.

TGI's generate API takes one prompt string, so the conversation is rendered with the project's
single template (``stablealign.llm.prompt_format``) and cut at the next turn header. Greedy
decoding when ``temperature`` is 0, otherwise sampling with the request's seed, so a seeded run
asks the server for the same text twice.

Failures are sorted like the openai backend's: rate limits, overload, shards not ready, 5xx,
timeouts and dropped connections are retried by ``ChatBackend``; validation errors and other
4xx are final. A server's (or its proxy's) ``Retry-After`` on such a failure makes the next attempt
wait at least that long: the client's exceptions carry no headers, so the client's sessions get an
aiohttp trace hook that notes the header of a failed reply for the call that is waiting for it
(``_note_retry_after``; a no-op for anyone else using ``text_generation``).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import aiohttp
import text_generation.client
from text_generation import AsyncClient
from text_generation import errors as tgi_errors

from stablealign.core.errors import BackendError, ConfigError
from stablealign.core.logs import get_logger
from stablealign.core.redaction import redact_text, redact_url
from stablealign.llm import progress
from stablealign.llm.backends.base import (
    MAX_RETRY_AFTER_SECONDS,
    RETRYABLE_4XX,
    ChatBackend,
    ChatRequest,
    Completion,
    RetryableBackendError,
    RetryPolicy,
    parse_retry_after,
    refused,
)
from stablealign.llm.prompt_format import STOP_SEQUENCES, count_tokens, cut_at_stop, render_prompt

log = get_logger(__name__)

DEFAULT_TGI_MODEL = "tgi"

RETRYABLE_TGI_ERRORS: tuple[type[Exception], ...] = (
    tgi_errors.RateLimitExceededError,   # HTTP 429
    tgi_errors.OverloadedError,          # the router's queue is full
    tgi_errors.ShardNotReadyError,       # HTTP 403/424 while shards load
    tgi_errors.ShardTimeoutError,        # HTTP 504
    tgi_errors.GenerationError,          # a shard failed mid-generation
    tgi_errors.IncompleteGenerationError,
    tgi_errors.UnknownError,             # any other status (5xx without a TGI error type)
)
FINAL_TGI_ERRORS: tuple[type[Exception], ...] = (
    tgi_errors.ValidationError,          # HTTP 422: bad parameters or a prompt too long
    tgi_errors.BadRequestError,          # HTTP 400
    tgi_errors.NotFoundError,            # HTTP 404: wrong URL
    tgi_errors.NotSupportedError,
)


# The Retry-After of the last failed reply of the current call (one holder per call, in its context).
_RETRY_AFTER: contextvars.ContextVar[list[str | None] | None] = contextvars.ContextVar("tgi_retry_after",
                                                                                       default=None)


async def _note_retry_after(_session: Any, _ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
    holder = _RETRY_AFTER.get()
    if holder is not None and params.response.status >= 400:
        holder[:] = [params.response.headers.get("Retry-After"), str(params.response.status)]


_TRACE = aiohttp.TraceConfig()
_TRACE.on_request_end.append(_note_retry_after)


def _traced_session(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
    """``aiohttp.ClientSession`` with the Retry-After hook: what ``text_generation``'s client opens per call."""
    kwargs["trace_configs"] = [*(kwargs.get("trace_configs") or ()), _TRACE]
    return aiohttp.ClientSession(*args, **kwargs)


text_generation.client.ClientSession = _traced_session  # type: ignore[attr-defined,assignment]


def classify(exc: BaseException, backend: str, retry_after: float | None = None, *, status: int = 0,
             url: str | None = None) -> Exception:
    """Maps a text-generation / aiohttp exception to RetryableBackendError or a final error.

    ``retry_after``: the failed reply's Retry-After in seconds, kept on a retryable error. ``status``: the
    failed reply's HTTP status (noted by the trace hook): a 401/403 — a proxy in front of TGI refusing the
    key; TGI itself never answers 403 — and any 4xx but 408/409/424/429 are final (LLMRequestError)."""
    waited = "" if retry_after is None else f" (retry after {retry_after:g}s)"
    if isinstance(exc, aiohttp.ClientResponseError):
        status = status or exc.status
    if 400 <= status < 500 and status not in _RETRYABLE_TGI_4XX:
        return refused(backend, url, status, str(getattr(exc, "message", "") or exc))
    if isinstance(exc, RETRYABLE_TGI_ERRORS):
        return RetryableBackendError(redact_text(f"{backend}: {type(exc).__name__}: {exc}{waited}"),
                                     retry_after=retry_after)
    if isinstance(exc, aiohttp.ClientResponseError):  # a body that was not TGI's JSON (e.g. a proxy page)
        if exc.status == 429 or exc.status >= 500:
            header = exc.headers.get("Retry-After") if exc.headers else None
            retry_after = retry_after if retry_after is not None else parse_retry_after(header)
            waited = "" if retry_after is None else f" (retry after {retry_after:g}s)"
            return RetryableBackendError(f"{backend}: HTTP {exc.status}: {exc.message}{waited}",
                                         retry_after=retry_after)
        return BackendError(redact_text(f"{backend}: HTTP {exc.status}: {exc.message}"))
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
                        ConnectionError)):
        return RetryableBackendError(redact_text(f"{backend}: {type(exc).__name__}: {exc}"))
    return BackendError(redact_text(f"{backend}: {type(exc).__name__}: {exc}"))


# TGI's 424 is a generation error on a shard (retried); 408/409/429 as for every backend.
_RETRYABLE_TGI_4XX = RETRYABLE_4XX | {424}


class TGIChatBackend(ChatBackend):
    """Chat over TGI's generate API (one rendered prompt per request), plain or streamed."""

    name = "tgi"

    def __init__(self, url: str, model: str = DEFAULT_TGI_MODEL, *, stream: bool = False, timeout: float = 60.0,
                 max_concurrency: int = 64, retry: RetryPolicy | None = None,
                 max_retry_after: float = MAX_RETRY_AFTER_SECONDS, api_key: str | None = None) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(f"tgi backend needs the server's http(s) URL, got {url!r}")
        # A remote server: calls in flight adapt to what it sustains (backends/limiter.py), up to max_concurrency.
        super().__init__(model or DEFAULT_TGI_MODEL, max_concurrency=max_concurrency,
                         retry=retry or RetryPolicy(timeout=timeout + 5.0), max_retry_after=max_retry_after,
                         adaptive=True, endpoint=url)
        self.url = url.rstrip("/")
        self.stream = stream
        # The client builds a session per call; ClientTimeout takes float seconds despite the hint.
        # ``api_key``: the endpoint's own (a proxy in front of TGI), sent as a bearer token to this URL only.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = AsyncClient(base_url=self.url, headers=headers, timeout=timeout)  # type: ignore[arg-type]
        log.info("backend.tgi", extra={"model": self.model, "url": redact_url(self.url), "stream": stream})

    def _parameters(self, request: ChatRequest) -> dict[str, Any]:
        sample = request.temperature > 0
        return {
            "max_new_tokens": max(1, request.max_tokens),
            "do_sample": sample,
            "temperature": request.temperature if sample else None,
            "seed": (request.seed % (2 ** 63)) if (sample and request.seed is not None) else None,
            "stop_sequences": list(STOP_SEQUENCES),
        }

    async def _chat_once(self, request: ChatRequest) -> Completion:
        prompt = render_prompt(request.messages)
        parameters = self._parameters(request)
        noted: list[str | None] = []
        token = _RETRY_AFTER.set(noted)  # the trace hook writes a failed reply's Retry-After here
        try:
            if self.stream:
                text, generated = await self._streamed(prompt, parameters)
            else:
                response = await self.client.generate(prompt, **parameters)
                text, generated = response.generated_text, response.details.generated_tokens
        except (RetryableBackendError, BackendError):
            raise
        except Exception as exc:
            raise classify(exc, self.name, parse_retry_after(noted[0]) if noted else None,
                           status=int(noted[1]) if len(noted) > 1 else 0, url=self.url) from exc
        finally:
            _RETRY_AFTER.reset(token)
        text = cut_at_stop(text)
        return Completion(text=text, model=self.model, prompt_tokens=count_tokens(prompt),
                          completion_tokens=generated if generated is not None else count_tokens(text))

    async def _streamed(self, prompt: str, parameters: dict[str, Any]) -> tuple[str, int | None]:
        """Joins non-special tokens; the final event's ``generated_text``/``details`` win when present."""
        parts: list[str] = []
        final_text: str | None = None
        generated: int | None = None
        async for event in self.client.generate_stream(prompt, **parameters):
            progress.progressed()  # each token is progress: the call's deadline starts again
            if not event.token.special:
                parts.append(event.token.text)
            if event.generated_text is not None:
                final_text = event.generated_text
            if event.details is not None:
                generated = event.details.generated_tokens
        return (final_text if final_text is not None else "".join(parts)), generated
