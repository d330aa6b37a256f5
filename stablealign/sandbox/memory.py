"""Agent memory: an append-only JetStream log per agent, and a numpy matrix per agent for retrieval.

Why this layout: the original rewrote every agent's whole memory file (pickle) after each
answer, so a round cost grew with the memory size and a simulation with rounds². Here an
agent's memory is the subject ``sandbox.memory.<world>.<agent>`` of the ``SANDBOX_MEMORY``
stream; each message is one ``MemoryBatch`` (the prior: one batch of M entries; each round's
revised answer: one batch of one entry), published with a ``Nats-Msg-Id`` so a re-sent append
is dropped by the server. The log survives restarts and every agent replica reads the same
one; a replica keeps a decoded copy (``AgentMemory``) and on each use reads only the messages
appended since (``MemoryStore``).

Retrieval is one matrix-vector product over the agent's question embeddings plus
``np.argpartition`` for the top k, instead of the original's Python loop over distances; rows
are stored unit-normalised, so cosine similarity is a dot product. Capacity grows by doubling,
so appends are amortised O(1) and memory per agent stays flat across rounds.

Prior memories are shared, not copied (``MemoryPool``): the M prior pairs of every agent are
drawn from one file, so a world stores the distinct (question, answer) entries its agents use
once — texts plus one unit-normalised embedding matrix, as one content-addressed object in the
``SANDBOX_MEMORY_POOLS`` stream — and an agent's prior batch only carries the pool id and M
int32 entry indices. Each process keeps one decoded copy of a pool (``get_pool``), and an
agent's memory holds a reference to it plus the indices; retrieval gathers the agent's M rows
by index, so results equal those of a per-agent matrix, while a cached agent holds only its
indices instead of its own float32 matrix and M decoded strings (``python -m bench.scale``;
figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import numpy as np
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from stablealign.core.errors import ConflictError, UnavailableError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.nats import client as nats_client
from stablealign.nats import streams, subjects
from stablealign.nats.subjects import POOL_STREAM, POOL_SUBJECT
from stablealign.v1 import common_pb2

log = get_logger(__name__)

# Retrieval defaults (a world spec's 0 means these). The original put the single nearest memory
# into the prompt when its cosine distance was < 0.3; we allow a few.
DEFAULT_RETRIEVAL_K = 3
DEFAULT_RETRIEVAL_THRESHOLD = 0.3
# Matrices smaller than this many floats are searched on the event loop (a thread hop costs more).
_INLINE_SEARCH_FLOATS = 1 << 20
# New batches fetched one by one on a cache hit before switching to a consumer for the backlog.
_INCREMENTAL_GETS = 8


def memory_subject(world_id: str, agent_id: int) -> str:
    return subjects.MEMORY_SUBJECT.format(world_id=world_id, agent_id=agent_id)


def prior_msg_id(world_id: str, agent_id: int) -> str:
    """Message id of an agent's prior memory batch."""
    return f"{world_id}.prior.{agent_id}"


def revision_msg_id(world_id: str, round_: int, agent_id: int) -> str:
    """Message id of the revised answer an agent wrote in ``round_``."""
    return f"{world_id}.{round_}.{agent_id}.memory"


# --- shared memory pools ------------------------------------------------------------------------

_POOL_MAGIC = b"SAPOOL1\n"
_POOL_CHUNK_BYTES = 512 * 1024  # below NATS' default 1 MB payload limit
_POOL_CHUNKS_HEADER = "Stablealign-Pool-Chunks"
_POOLS_KEPT = 8  # decoded pools kept per process besides those that agents' memories still reference


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): the one normalisation of every stored embedding."""
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return block / norms


@dataclass(frozen=True, eq=False)
class MemoryPool:
    """Prior (question, answer) entries shared by many agents: each text and question embedding once.

    Entry ``e`` is ``(questions[question_of[e]], answers[e])`` and its question embedding is row
    ``question_of[e]`` of ``matrix`` (unit rows, float32, read-only). ``pool_id`` is the SHA-256 of the
    serialized pool (``to_bytes``): the same content has the same id in every process, and a copy read
    back from JetStream is checked against it (``from_bytes``), so a replica never retrieves from a
    pool other than the one the world built.
    """

    pool_id: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_of: np.ndarray
    matrix: np.ndarray

    @classmethod
    def build(cls, questions: Sequence[str], answers: Sequence[str], question_of: Sequence[int] | np.ndarray,
              embeddings: np.ndarray) -> MemoryPool:
        """A pool from its entries and the raw (not necessarily unit) embeddings of its questions."""
        matrix = np.asarray(embeddings, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(questions) or (len(questions) and matrix.shape[1] == 0):
            raise ValidationError(f"a memory pool of {len(questions)} questions needs one embedding row each, "
                                  f"got shape {matrix.shape}")
        if not np.isfinite(matrix).all():
            raise ValidationError("memory pool embeddings must be finite")
        rows = np.asarray(question_of, dtype=np.int32).reshape(-1)
        if len(rows) != len(answers) or (len(rows) and (rows.min() < 0 or rows.max() >= len(questions))):
            raise ValidationError("every memory pool entry needs an answer and one of the pool's questions")
        matrix = _unit_rows(matrix).astype(np.float32, copy=False)
        payload = _pool_payload(tuple(questions), tuple(answers), rows, matrix)
        return cls._frozen(hashlib.sha256(payload).hexdigest(), tuple(questions), tuple(answers), rows, matrix)

    @classmethod
    def _frozen(cls, pool_id: str, questions: tuple[str, ...], answers: tuple[str, ...], rows: np.ndarray,
                matrix: np.ndarray) -> MemoryPool:
        rows.setflags(write=False)
        matrix.setflags(write=False)
        return cls(pool_id, questions, answers, rows, matrix)

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix.ndim == 2 else 0

    @property
    def nbytes(self) -> int:
        """Approximate memory held: arrays plus texts."""
        texts = sum(len(t) for t in self.questions) + sum(len(t) for t in self.answers)
        return int(self.matrix.nbytes + self.question_of.nbytes + texts + 60 * (len(self.questions) + len(self)))

    def entry(self, index: int) -> tuple[str, str]:
        return self.questions[int(self.question_of[index])], self.answers[index]

    def to_bytes(self) -> bytes:
        return _pool_payload(self.questions, self.answers, self.question_of, self.matrix)

    @classmethod
    def from_bytes(cls, data: bytes, pool_id: str | None = None) -> MemoryPool:
        """Decodes ``to_bytes``; with ``pool_id`` the content must hash to it (ConflictError otherwise)."""
        digest = hashlib.sha256(data).hexdigest()
        if pool_id is not None and digest != pool_id:
            raise ConflictError(f"memory pool {pool_id}: content hashes to {digest}; the stored pool is not the "
                                "one the world built (corrupt or foreign data on its subject)")
        try:
            if not data.startswith(_POOL_MAGIC):
                raise ValueError("not a memory pool")
            offset = len(_POOL_MAGIC)
            (header_len,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            header = json.loads(data[offset:offset + header_len].decode("utf-8"))
            offset += header_len
            questions, answers = tuple(header["questions"]), tuple(header["answers"])
            dim = int(header["dim"])
            rows = np.frombuffer(data, dtype="<i4", count=len(answers), offset=offset).astype(np.int32)
            offset += rows.nbytes
            matrix = np.frombuffer(data, dtype="<f4", count=len(questions) * dim, offset=offset)
            if offset + matrix.nbytes != len(data):
                raise ValueError("trailing bytes")
            matrix = matrix.astype(np.float32).reshape(len(questions), dim)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
            raise ConflictError(f"memory pool {pool_id or digest}: undecodable ({exc})") from exc
        if len(rows) and (rows.min() < 0 or rows.max() >= len(questions)):
            raise ConflictError(f"memory pool {pool_id or digest}: entry refers to a missing question")
        return cls._frozen(digest, questions, answers, rows, matrix)


def _pool_payload(questions: tuple[str, ...], answers: tuple[str, ...], rows: np.ndarray,
                  matrix: np.ndarray) -> bytes:
    dim = int(matrix.shape[1]) if matrix.ndim == 2 and matrix.shape[0] else 0
    header = json.dumps({"questions": list(questions), "answers": list(answers), "dim": dim},
                        ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join((_POOL_MAGIC, struct.pack("<Q", len(header)), header,
                     np.ascontiguousarray(rows, dtype="<i4").tobytes(),
                     np.ascontiguousarray(matrix, dtype="<f4").tobytes()))


_POOL_LOCK = threading.Lock()
_POOLS: OrderedDict[str, MemoryPool] = OrderedDict()  # recently used, strong references
_LIVE_POOLS: weakref.WeakValueDictionary[str, MemoryPool] = weakref.WeakValueDictionary()  # any still in use


def register_pool(pool: MemoryPool) -> MemoryPool:
    """Makes ``pool`` this process's copy of its id; returns the copy already there, if any (one per process)."""
    with _POOL_LOCK:
        existing = _POOLS.get(pool.pool_id) or _LIVE_POOLS.get(pool.pool_id)
        pool = existing or pool
        _LIVE_POOLS[pool.pool_id] = pool
        _POOLS[pool.pool_id] = pool
        _POOLS.move_to_end(pool.pool_id)
        while len(_POOLS) > _POOLS_KEPT:
            _POOLS.popitem(last=False)
        return pool


def cached_pool(pool_id: str) -> MemoryPool | None:
    with _POOL_LOCK:
        return _POOLS.get(pool_id) or _LIVE_POOLS.get(pool_id)


def pool_subject(pool_id: str, chunk: int) -> str:
    return POOL_SUBJECT.format(pool_id=pool_id, chunk=chunk)


async def ensure_pool_stream(js: JetStreamContext) -> None:
    """Creates the shared pools' stream on first publish (whoever publishes a pool first: a world)."""
    await streams.ensure_stream(js, StreamConfig(
        name=POOL_STREAM, subjects=["sandbox.pools.>"], storage=StorageType.FILE,
        duplicate_window=subjects.DEDUP_WINDOW_SECONDS, allow_direct=True,
        description="Shared memory pools (prior texts + embeddings), chunks of content-addressed objects"))


async def _pool_chunk(js: JetStreamContext, pool_id: str, chunk: int):
    try:
        return await js.get_last_msg(POOL_STREAM, pool_subject(pool_id, chunk))
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
        raise UnavailableError(f"cannot read memory pool {pool_id} from {POOL_STREAM}") from exc


async def publish_pool(js: JetStreamContext, pool: MemoryPool, *, timeout: float = 10.0) -> MemoryPool:
    """Stores ``pool`` in JetStream unless it is there already (content-addressed, so safe to repeat);
    returns this process's copy."""
    pool = register_pool(pool)
    data = pool.to_bytes()
    count = max(1, -(-len(data) // _POOL_CHUNK_BYTES))
    await ensure_pool_stream(js)
    first, last = await _pool_chunk(js, pool.pool_id, 0), await _pool_chunk(js, pool.pool_id, count - 1)
    if first is not None and last is not None:
        return pool
    headers = {_POOL_CHUNKS_HEADER: str(count)}
    for i in range(count):
        try:
            await js.publish(pool_subject(pool.pool_id, i), data[i * _POOL_CHUNK_BYTES:(i + 1) * _POOL_CHUNK_BYTES],
                             timeout=timeout, headers={**headers, subjects.MSG_ID_HEADER: f"{pool.pool_id}.{i}"})
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            raise UnavailableError(f"memory pool {pool.pool_id} not acknowledged") from exc
    log.info("memory.pool_published", extra={"pool_id": pool.pool_id, "entries": len(pool),
                                             "questions": len(pool.questions), "bytes": len(data), "chunks": count})
    return pool


async def fetch_pool(js: JetStreamContext, pool_id: str) -> MemoryPool:
    """This process's copy of a pool, read from JetStream (and verified) the first time."""
    pool = cached_pool(pool_id)
    if pool is not None:
        return pool
    first = await _pool_chunk(js, pool_id, 0)
    if first is None:
        raise UnavailableError(f"memory pool {pool_id} is not in {POOL_STREAM}")
    try:
        count = int((first.headers or {}).get(_POOL_CHUNKS_HEADER, "1"))
    except ValueError as exc:
        raise ConflictError(f"memory pool {pool_id}: bad chunk count") from exc
    rest = await asyncio.gather(*(_pool_chunk(js, pool_id, i) for i in range(1, count)))
    if any(msg is None for msg in rest):
        raise UnavailableError(f"memory pool {pool_id}: chunks are missing from {POOL_STREAM}")
    data = b"".join([first.data or b"", *(msg.data or b"" for msg in rest)])
    pool = await asyncio.to_thread(MemoryPool.from_bytes, data, pool_id)
    log.info("memory.pool_loaded", extra={"pool_id": pool_id, "entries": len(pool), "bytes": len(data)})
    return register_pool(pool)


def _check_batch(batch: common_pb2.MemoryBatch) -> None:
    dims = {len(e.question_embedding) for e in batch.entries}
    if not batch.entries and not batch.pool_entries:
        raise ValidationError("a memory batch needs at least one entry")
    if batch.pool_entries and not batch.pool_id:
        raise ValidationError("pool entries of a memory batch need the pool's id")
    if 0 in dims:
        raise ValidationError("every memory entry needs a question embedding")
    if len(dims) > 1:
        raise ValidationError(f"memory entries of one batch have different embedding sizes {sorted(dims)}")


async def append_memory(js: JetStreamContext, world_id: str, agent_id: int, batch: common_pb2.MemoryBatch,
                        msg_id: str, *, timeout: float = 10.0) -> bool:
    """Appends one batch to the agent's memory log; False when the server dropped it as a duplicate.

    ``msg_id`` follows ``prior_msg_id`` / ``revision_msg_id`` so that a world service that resumes
    after a crash can re-send its appends without doubling anyone's memory.
    """
    _check_batch(batch)
    try:
        ack = await js.publish(memory_subject(world_id, agent_id), batch.SerializeToString(),
                               timeout=timeout, headers={subjects.MSG_ID_HEADER: msg_id})
    except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
        raise UnavailableError(f"memory append for agent {agent_id} of world {world_id} not acknowledged") from exc
    return not ack.duplicate


class AgentMemory:
    """One agent's memory: prior entries by reference into a shared ``MemoryPool``, plus its own entries.

    Own entries (revisions, or priors sent by value) are arrays: unit question embeddings (n, dim)
    float32, questions, answers, rounds. Pool entries are only int32 indices (they count as round
    -1 and come first). Only ever extended: readers take a snapshot and only look at rows below
    the counts they saw, while an extension writes rows >= n or swaps in a larger array; so a
    retrieval running in a worker thread never sees a half-written row.
    """

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = max(1, capacity)
        self._matrix: np.ndarray | None = None  # (capacity, dim) once the first own entry arrives
        self._n = 0
        self._questions: list[str] = []
        self._answers: list[str] = []
        self._rounds = np.zeros(0, dtype=np.int32)  # round of each own row (-1: prior), same growth as rows
        self._pool: MemoryPool | None = None
        self._pool_rows = np.zeros(0, dtype=np.int32)  # pool entry of each pool row; swapped, never written
        self.last_sequence = 0  # stream sequence of the last batch applied

    def __len__(self) -> int:
        return len(self._pool_rows) + self._n

    @property
    def dim(self) -> int | None:
        if self._pool is not None:
            return self._pool.dim
        return None if self._matrix is None else self._matrix.shape[1]

    @property
    def pool(self) -> MemoryPool | None:
        return self._pool

    @property
    def pool_entries(self) -> np.ndarray:
        """Indices of the pool entries this memory holds (a view; do not modify)."""
        return self._pool_rows

    @property
    def questions(self) -> list[str]:
        pool, rows = self._pool, self._pool_rows
        head = [pool.entry(int(i))[0] for i in rows] if pool is not None else []
        return head + self._questions[: self._n]

    @property
    def answers(self) -> list[str]:
        pool, rows = self._pool, self._pool_rows
        head = [pool.answers[int(i)] for i in rows] if pool is not None else []
        return head + self._answers[: self._n]

    @property
    def embeddings(self) -> np.ndarray:
        """The (len, dim) matrix of unit question embeddings, pool rows first (a copy when there are any)."""
        block = self._block(self._pool, self._pool_rows, self._matrix, self._n)
        return np.zeros((0, 0), dtype=np.float32) if block is None else block

    @property
    def capacity(self) -> int:
        """Rows allocated for own entries."""
        return 0 if self._matrix is None else self._matrix.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of this agent's own arrays (a shared pool is not counted)."""
        return (0 if self._matrix is None else int(self._matrix.nbytes)) + int(self._pool_rows.nbytes)

    def extend_pool(self, pool: MemoryPool, entries: Sequence[int] | np.ndarray, sequence: int | None = None) -> int:
        """Appends entries of a shared pool by index; returns how many were added.

        Indices outside the pool are skipped. A memory refers to one pool; entries of a second pool
        (not made by the world service) are copied in as own entries instead.
        """
        rows = np.asarray(entries, dtype=np.int64).reshape(-1)
        valid = (rows >= 0) & (rows < len(pool))
        if not valid.all():
            log.warning("memory.entry_skipped", extra={"reason": "pool index", "pool_id": pool.pool_id,
                                                       "count": int((~valid).sum())})
            rows = rows[valid]
        own_dim = None if self._matrix is None else self._matrix.shape[1]
        added = 0
        if len(rows) and own_dim is not None and own_dim != pool.dim:
            log.warning("memory.entry_skipped", extra={"reason": "embedding size", "size": pool.dim,
                                                       "expected": own_dim})
        elif len(rows) and self._pool is not None and self._pool is not pool:
            texts = [pool.entry(int(i)) for i in rows]
            self._questions.extend(q for q, _ in texts)
            self._answers.extend(a for _, a in texts)
            self._append_rows(pool.matrix[pool.question_of[rows]], np.full(len(rows), -1, dtype=np.int32))
            added = len(rows)
        elif len(rows):
            self._pool = pool
            self._pool_rows = np.concatenate([self._pool_rows, rows.astype(np.int32)])  # a new array: readers
            added = len(rows)  # keep the one they took
        if sequence is not None:
            self.last_sequence = max(self.last_sequence, sequence)
        return added

    def extend(self, entries: Iterable[common_pb2.MemoryEntry], sequence: int | None = None) -> int:
        """Appends entries (skipping ones whose embedding size does not match); returns how many were added."""
        rows: list[np.ndarray] = []
        questions: list[str] = []
        answers: list[str] = []
        rounds: list[int] = []
        dim = self.dim
        for entry in entries:
            vector = np.asarray(entry.question_embedding, dtype=np.float32)
            if dim is None and vector.size:
                dim = vector.size
            if vector.size == 0 or vector.size != dim:
                log.warning("memory.entry_skipped", extra={"reason": "embedding size", "size": int(vector.size),
                                                           "expected": dim})
                continue
            rows.append(vector)
            questions.append(entry.question)
            answers.append(entry.answer)
            rounds.append(entry.round)
        if rows:
            # Texts first: a reader in another thread indexes them only below n, which moves last.
            self._questions.extend(questions)
            self._answers.extend(answers)
            self._append_rows(_unit_rows(np.stack(rows)), np.asarray(rounds, dtype=np.int32))
        if sequence is not None:
            self.last_sequence = max(self.last_sequence, sequence)
        return len(rows)

    def _append_rows(self, block: np.ndarray, rounds: np.ndarray) -> None:
        count, dim = block.shape
        if self._matrix is None:
            capacity = self._capacity
            while capacity < count:
                capacity *= 2
            self._matrix = np.zeros((capacity, dim), dtype=np.float32)
        needed = self._n + count
        if needed > self._matrix.shape[0]:
            capacity = self._matrix.shape[0]
            while capacity < needed:
                capacity *= 2
            grown = np.zeros((capacity, dim), dtype=np.float32)
            grown[: self._n] = self._matrix[: self._n]
            self._matrix = grown  # swapped, not resized in place: readers keep their snapshot
        if needed > self._rounds.shape[0]:
            grown_rounds = np.zeros(self._matrix.shape[0], dtype=np.int32)
            grown_rounds[: self._n] = self._rounds[: self._n]
            self._rounds = grown_rounds
        self._rounds[self._n:needed] = rounds
        self._matrix[self._n:needed] = block
        self._n = needed  # published last, after the rows are written

    @staticmethod
    def _block(pool: MemoryPool | None, pool_rows: np.ndarray, matrix: np.ndarray | None,
               n: int) -> np.ndarray | None:
        """Pool rows (gathered by index: M small) above own rows, as one contiguous matrix."""
        head = pool.matrix[pool.question_of[pool_rows]] if pool is not None and len(pool_rows) else None
        tail = matrix[:n] if matrix is not None and n else None
        if head is None:
            return tail
        return head if tail is None else np.concatenate([head, tail])

    def retrieve(self, query_embedding: Sequence[float] | np.ndarray, k: int,
                 threshold: float = DEFAULT_RETRIEVAL_THRESHOLD, *,
                 before_round: int | None = None) -> list[common_pb2.Memory]:
        """The k memories whose questions are most similar to the query, most similar first.

        Keeps only memories with cosine distance (1 - cosine similarity) below ``threshold``; ties
        go to the earlier memory. ``before_round`` hides memories written in that round or later:
        a draft redone after a crash must not see the revision its first attempt already stored,
        so that a resumed world gives the same records as an unbroken one.
        """
        pool, pool_rows, matrix, n, rounds = self._pool, self._pool_rows, self._matrix, self._n, self._rounds
        block = self._block(pool, pool_rows, matrix, n)
        if block is None or k <= 0:
            return []
        query = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if query.size != block.shape[1]:
            raise ValidationError(f"question embedding has {query.size} dimensions, memory has {block.shape[1]}")
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm):
            raise ValidationError("question embedding must be finite")
        if norm == 0.0:
            return []  # no features (e.g. a hashing embedding of "?!"): nothing is similar
        similarities = block @ (query / norm)
        total, p = block.shape[0], block.shape[0] - n
        if before_round is not None:
            visible = np.concatenate([np.full(p, -1 < before_round), rounds[:n] < before_round])
            similarities = np.where(visible, similarities, -np.inf)
        k = min(k, total)
        if k < total:
            top = np.argpartition(-similarities, k - 1)[:k]
        else:
            top = np.arange(total)
        order = top[np.lexsort((top, -similarities[top]))]
        keep = order[np.isfinite(similarities[order]) & ((1.0 - similarities[order]) < threshold)]
        out = []
        for i in keep:
            if i < p:
                question, answer = pool.entry(int(pool_rows[i]))
            else:
                question, answer = self._questions[i - p], self._answers[i - p]
            out.append(common_pb2.Memory(question=question, answer=answer, similarity=float(similarities[i])))
        return out

    async def aretrieve(self, query_embedding: Sequence[float] | np.ndarray, k: int,
                        threshold: float = DEFAULT_RETRIEVAL_THRESHOLD, *,
                        before_round: int | None = None) -> list[common_pb2.Memory]:
        """``retrieve``, in a worker thread when the matrix is large enough to block the event loop."""
        if len(self) * (self.dim or 0) <= _INLINE_SEARCH_FLOATS:
            return self.retrieve(query_embedding, k, threshold, before_round=before_round)
        return await asyncio.to_thread(functools.partial(self.retrieve, before_round=before_round),
                                       query_embedding, k, threshold)


def _decode_batch(data: bytes, subject: str, seq: int) -> common_pb2.MemoryBatch | None:
    batch = common_pb2.MemoryBatch()
    try:
        batch.ParseFromString(data)
    except Exception:  # noqa: BLE001 - a foreign message on our subject must not wedge the agent
        log.warning("memory.batch_skipped", extra={"subject": subject, "seq": seq, "reason": "undecodable"})
        return None
    return batch


class MemoryStore:
    """Per-process LRU cache of ``AgentMemory`` objects, kept current with the JetStream log.

    ``get`` loads an agent's whole log on a miss (the prior is one batch, so usually two small
    requests) and, on a hit, reads only the batches appended since its last read
    (``_read_newer``): another process (the world service) appends revisions, and whichever
    replica serves the next draft must see them. Concurrent gets of one agent share a lock, so
    one load serves them all. A batch that refers to a shared pool resolves it through the
    process-wide pool registry, reading it from JetStream once (concurrent first uses share the read).
    """

    def __init__(self, js: JetStreamContext, max_agents: int = 10000, *, read_timeout: float = 10.0,
                 on_read: Callable[[str], None] | None = None) -> None:
        """``on_read("full"|"incremental")`` is called after each JetStream read (for metrics)."""
        if max_agents < 1:
            raise ValueError("max_agents must be >= 1")
        self.js = js
        self.max_agents = max_agents
        self.read_timeout = read_timeout
        self._agents: OrderedDict[tuple[str, int], AgentMemory] = OrderedDict()
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.loads = 0  # full loads (cache misses), for tests and logs
        self.refreshes = 0  # incremental reads on a hit
        self._on_read = on_read or (lambda kind: None)
        self._pool_reads: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._agents)

    def cached(self, world_id: str, agent_id: int) -> AgentMemory | None:
        return self._agents.get((world_id, agent_id))

    async def get(self, world_id: str, agent_id: int) -> AgentMemory:
        key = (world_id, agent_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            subject = memory_subject(world_id, agent_id)
            memory = self._agents.get(key)
            if memory is None:
                memory = AgentMemory()
                try:
                    await self._read_newer(memory, subject)
                except BaseException:
                    if key not in self._agents:
                        self._locks.pop(key, None)  # nothing cached: do not keep a lock per failed key
                    raise
                self.loads += 1
                self._on_read("full")
                self._agents[key] = memory
                self._evict()
            else:
                self._agents.move_to_end(key)
                if await self._read_newer(memory, subject):
                    self.refreshes += 1
                    self._on_read("incremental")
            return memory

    async def _read_newer(self, memory: AgentMemory, subject: str) -> int:
        """Applies the batches appended after ``memory.last_sequence``; returns how many.

        One "next message on this subject from sequence n" get per new batch, plus the one that
        finds none — so a hit with nothing new costs a single request (leader-served, hence
        read-after-write consistent with the world's append), and a hit after one round's
        revision two. A long backlog (an agent not seen for many rounds) is read in batched direct gets.
        """
        applied = 0
        while True:
            if applied >= _INCREMENTAL_GETS:
                before = memory.last_sequence
                await self._read_into(memory, subject)
                return applied + (memory.last_sequence > before)
            try:
                raw = await self.js.get_msg(subjects.MEMORY_STREAM, seq=memory.last_sequence + 1, subject=subject,
                                            next=True)
            except nats.js.errors.NotFoundError:
                return applied
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                raise UnavailableError(f"cannot read {subject} from {subjects.MEMORY_STREAM}") from exc
            seq = int(raw.seq or 0)
            if seq <= memory.last_sequence:
                return applied  # defensive: never loop on a server that answers an older message
            await self._apply(memory, _decode_batch(raw.data or b"", subject, seq), seq)
            applied += 1

    async def _read_into(self, memory: AgentMemory, subject: str) -> None:
        try:
            messages = await nats_client.read_subject(self.js, subjects.MEMORY_STREAM, subject, after_seq=memory.last_sequence,
                                              timeout=self.read_timeout)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            raise UnavailableError(f"cannot read {subject} from {subjects.MEMORY_STREAM}") from exc
        for seq, msg in messages:
            if seq <= memory.last_sequence:
                continue  # already applied (a redelivery)
            await self._apply(memory, _decode_batch(msg.data, subject, seq), seq)

    async def _apply(self, memory: AgentMemory, batch: common_pb2.MemoryBatch | None, seq: int) -> None:
        """Pool entries first (prior memory), then the batch's own entries."""
        if batch is not None and batch.pool_id and batch.pool_entries:
            memory.extend_pool(await self.pool(batch.pool_id), batch.pool_entries)
        memory.extend(batch.entries if batch is not None else (), seq)

    async def pool(self, pool_id: str) -> MemoryPool:
        """The shared pool ``pool_id``: this process's copy, else read once from JetStream."""
        pool = cached_pool(pool_id)
        if pool is not None:
            return pool
        reading = self._pool_reads.get(pool_id)
        if reading is None:
            reading = self._pool_reads[pool_id] = asyncio.ensure_future(fetch_pool(self.js, pool_id))
            reading.add_done_callback(lambda _f: self._pool_reads.pop(pool_id, None))
        return await asyncio.shield(reading)

    def _evict(self) -> None:
        while len(self._agents) > self.max_agents:
            key, _ = self._agents.popitem(last=False)
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]

    def forget_world(self, world_id: str) -> int:
        """Drops a world's agents from the cache (e.g. when it is deleted); returns how many."""
        keys = [key for key in self._agents if key[0] == world_id]
        for key in keys:
            del self._agents[key]
            self._locks.pop(key, None)
        return len(keys)
