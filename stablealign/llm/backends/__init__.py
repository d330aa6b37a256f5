"""LLM backends behind one interface, built from a ``ModelRef`` and shared per process.

``make_chat_backend`` / ``make_embedder`` build a new backend from a ``common_pb2.ModelRef``
(backend, model, url). ``get_chat_backend`` / ``get_embedder`` return a process-wide instance per
(backend, model, url), so every world and handler of a service shares one HTTP connection pool,
one concurrency limit and one loaded model; ``close_backends`` releases them at shutdown.

Backends: ``offline`` (deterministic, no network), ``openai`` (official SDK, any OpenAI-compatible
server), ``tgi`` (text-generation-inference), ``hf`` (transformers in-process from a local path).
Embedders: ``openai`` embeddings for the openai backend; ``hashing`` when the model is named
``hashing``; else all-MiniLM-L6-v2 in-process.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

from stablealign.core.config import BackendSettings, load_settings
from stablealign.core.errors import ConfigError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.backends.base import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    Completion,
    Embedder,
    RetryableBackendError,
    RetryPolicy,
    normalise_rows,
)
from stablealign.llm.endpoints import resolve_endpoint
from stablealign.v1 import common_pb2

log = get_logger(__name__)

BACKENDS = ("offline", "openai", "tgi", "hf")
DEFAULT_CHAT_MODELS = {"offline": "offline-deterministic", "openai": "gpt-4o-mini", "tgi": "tgi"}
OPENAI_CHAT_MODEL_ENV = "STABLEALIGN_OPENAI_CHAT_MODEL"
MAX_CONCURRENCY_ENV = "STABLEALIGN_LLM_MAX_CONCURRENCY"

__all__ = [
    "BACKENDS", "ChatBackend", "ChatMessage", "ChatRequest", "Completion", "Embedder", "RetryPolicy",
    "RetryableBackendError", "close_backends", "default_chat_model", "default_embedding_model", "default_max_concurrency",
    "get_chat_backend", "get_embedder",
    "make_chat_backend", "make_embedder", "normalise_rows",
]


def _backend_name(ref: common_pb2.ModelRef) -> str:
    name = (ref.backend or "").strip().lower()
    if name not in BACKENDS:
        raise ValidationError(f"unknown backend {ref.backend!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def default_chat_model(backend: str) -> str:
    """The chat model used when a ModelRef names none (openai: $STABLEALIGN_OPENAI_CHAT_MODEL)."""
    if backend == "openai":
        return load_settings(BackendSettings).openai_chat_model or DEFAULT_CHAT_MODELS["openai"]
    if backend == "hf":
        raise ConfigError("hf backend needs a model path (ModelRef.model = a local save_pretrained directory)")
    return DEFAULT_CHAT_MODELS[backend]


def default_embedding_model(backend: str) -> str:
    """The embedding model used when a ModelRef names none: OpenAI's for openai, else all-MiniLM-L6-v2."""
    if backend == "openai":
        from stablealign.llm.backends.openai_backend import DEFAULT_EMBEDDING_MODEL

        return DEFAULT_EMBEDDING_MODEL
    from stablealign.llm.backends.embeddings import MINILM_MODEL

    return MINILM_MODEL


def make_chat_backend(ref: common_pb2.ModelRef, *, max_concurrency: int = 64) -> ChatBackend:
    """A new chat backend for ``ref``; ValidationError for an unknown or disabled backend, a URL that is
    not a configured endpoint (``stablealign.llm.endpoints``: checked here, in the process that holds the key,
    whoever sent the ref), or an hf model outside ``STABLEALIGN_MODEL_ROOTS`` (``models.confined_model_path``:
    checked here, in the process that loads it); ConfigError for bad settings. The client gets its
    endpoint's key, and only it."""
    backend = _backend_name(ref)
    endpoint = resolve_endpoint(backend, ref.url, field="model")
    model = ref.model.strip() or default_chat_model(backend)
    if backend == "offline":
        from stablealign.llm.backends.offline import OfflineChatBackend

        return OfflineChatBackend(model, max_concurrency=max(max_concurrency, 1024))
    if backend == "openai":
        from stablealign.llm.backends.openai_backend import OpenAIChatBackend

        assert endpoint is not None
        return OpenAIChatBackend(model, base_url=endpoint.url, api_key=endpoint.api_key(),
                                 max_concurrency=max_concurrency, timeout=REMOTE_TIMEOUT_SECONDS)
    if backend == "tgi":
        from stablealign.llm.backends.tgi import TGIChatBackend

        assert endpoint is not None
        return TGIChatBackend(endpoint.url, model, api_key=endpoint.api_key(), max_concurrency=max_concurrency,
                              timeout=REMOTE_TIMEOUT_SECONDS)
    from stablealign.llm.backends.hf import HFChatBackend
    from stablealign.llm.models import confined_model_path

    # The path comes from a request (a world spec): only a directory inside STABLEALIGN_MODEL_ROOTS.
    return HFChatBackend(confined_model_path(model, field="model"), max_concurrency=max_concurrency)


def make_embedder(ref: common_pb2.ModelRef) -> Embedder:
    """openai -> OpenAIEmbedder; model "hashing" -> HashingEmbedder; otherwise all-MiniLM-L6-v2."""
    from stablealign.llm.backends.embeddings import (
        HASHING_MODEL,
        MINILM_MODEL,
        HashingEmbedder,
        MiniLMEmbedder,
    )

    backend = _backend_name(ref)
    model = ref.model.strip()
    if model == HASHING_MODEL:
        return HashingEmbedder()
    endpoint = resolve_endpoint(backend, ref.url, field="embedding_model")
    if backend == "openai":
        from stablealign.llm.backends.openai_backend import DEFAULT_EMBEDDING_MODEL, OpenAIEmbedder

        assert endpoint is not None
        return OpenAIEmbedder(model or DEFAULT_EMBEDDING_MODEL, base_url=endpoint.url, api_key=endpoint.api_key())
    return MiniLMEmbedder(MINILM_MODEL)


_LOCK = threading.Lock()
# Per event loop: a backend holds asyncio primitives and HTTP connection pools bound to the loop
# that first used them (tests and `stable-align run` may run several loops one after another).
_CACHES: weakref.WeakKeyDictionary[Any, dict[str, dict[tuple[str, str, str], Any]]] = weakref.WeakKeyDictionary()
_NO_LOOP: dict[str, dict[tuple[str, str, str], Any]] = {"chat": {}, "embed": {}}


def _key(ref: common_pb2.ModelRef) -> tuple[str, str, str]:
    return ((ref.backend or "").strip().lower(), ref.model.strip(), ref.url.strip())


def _cache() -> dict[str, dict[tuple[str, str, str], Any]]:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _NO_LOOP
    cache = _CACHES.get(loop)
    if cache is None:
        cache = _CACHES[loop] = {"chat": {}, "embed": {}}
    return cache


# The most calls in flight per remote backend (openai, tgi) and process unless $STABLEALIGN_LLM_MAX_CONCURRENCY
# says otherwise — the bound of the endpoint's adaptive limit (limiter.py), which starts small and grows only
# while the server's latency shows it keeps up: a world keeps up to WorldSettings.max_interaction_concurrency
# (1024) interactions in flight and its widest step fans out k partner feedbacks each, so a whole round of a
# 100-agent world with 4-6 partners (400-600 calls) may be in flight at once; beyond the limit calls wait their
# turn in the backend.
REMOTE_MAX_CONCURRENCY = 1024
LOCAL_BACKENDS = frozenset({"hf"})
# How long one attempt at a remote backend may go without a byte of its reply before it is given up and sent
# again: longer than a step's llm_deadline_seconds (90 s of time without progress), so that a reply that is slow
# but coming (a long generation at a server that decodes one request at a time) is not cut and asked again, work
# done twice; the step's deadline is what gives up on a hung model.
REMOTE_TIMEOUT_SECONDS = 180.0


def default_max_concurrency(backend: str | None = None) -> int:
    """Calls in flight at once per backend: $STABLEALIGN_LLM_MAX_CONCURRENCY when set, else by backend.

    The rule: a backend admits as many calls as the worlds can usefully keep in flight, bounded by what
    the backend can serve. A world runs up to min(its concurrency or its size, the world service's
    max_interaction_concurrency) interactions at once; their widest step is the feedback (k partners in
    parallel, plus the two "before" ratings at the observer), so a remote API backend (``openai``,
    ``tgi``, and ``offline``) gets ``REMOTE_MAX_CONCURRENCY`` (1024; for ``openai`` and ``tgi`` the bound of
    an adaptive limit learned from the server's latency, ``limiter.py``): a whole round of a 100-agent world
    with 4-6 partners in flight, 5,000 calls/s at 200 ms; beyond it calls queue in the backend. A local
    model (``hf``) gets its continuous batcher's capacity: two batches (``max_batch`` rows decoding and as
    many waiting to be admitted); more would only queue inside the batcher. ``None``: a remote backend.
    """
    value = load_settings(BackendSettings).llm_max_concurrency  # ConfigError naming the variable
    if value is not None:
        return value
    if (backend or "").strip().lower() in LOCAL_BACKENDS:
        from stablealign.llm.backends.batching import engine_settings

        return 2 * engine_settings().max_batch
    return REMOTE_MAX_CONCURRENCY


def get_chat_backend(ref: common_pb2.ModelRef, *, max_concurrency: int | None = None) -> ChatBackend:
    """The process-wide (per event loop) chat backend for (backend, model, url), built on first use.

    ``max_concurrency`` (else ``default_max_concurrency(ref.backend)``) applies when the backend is built;
    every caller of the same ref then shares that one limit.
    """
    key = _key(ref)
    with _LOCK:
        cache = _cache()["chat"]
        backend = cache.get(key)
        if backend is None:
            backend = cache[key] = make_chat_backend(
                ref, max_concurrency=max_concurrency or default_max_concurrency(key[0]))
        return backend


def get_embedder(ref: common_pb2.ModelRef) -> Embedder:
    """The process-wide (per event loop) embedder for (backend, model, url), built on first use."""
    key = _key(ref)
    with _LOCK:
        cache = _cache()["embed"]
        embedder = cache.get(key)
        if embedder is None:
            embedder = cache[key] = make_embedder(ref)
        return embedder


async def close_backends() -> None:
    """Closes and forgets the cached backends and embedders of this event loop (at service shutdown)."""
    with _LOCK:
        cache = _cache()
        items: list[ChatBackend | Embedder] = [*cache["chat"].values(), *cache["embed"].values()]
        cache["chat"].clear()
        cache["embed"].clear()
    for item in items:
        try:
            await item.aclose()
        except Exception as exc:  # noqa: BLE001 - shutdown goes on
            log.warning("backend.close_failed", extra={"backend": item.name, "error": str(exc)[:200]})
