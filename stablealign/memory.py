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
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import nats.errors
import nats.js.errors
import numpy as np
from nats.js import JetStreamContext

from stablealign import bus
from stablealign.errors import UnavailableError, ValidationError
from stablealign.logs import get_logger
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
    return bus.MEMORY_SUBJECT.format(world_id=world_id, agent_id=agent_id)


def prior_msg_id(world_id: str, agent_id: int) -> str:
    """Message id of an agent's prior memory batch."""
    return f"{world_id}.prior.{agent_id}"


def revision_msg_id(world_id: str, round_: int, agent_id: int) -> str:
    """Message id of the revised answer an agent wrote in ``round_``."""
    return f"{world_id}.{round_}.{agent_id}.memory"


def _check_batch(batch: common_pb2.MemoryBatch) -> None:
    dims = {len(e.question_embedding) for e in batch.entries}
    if not batch.entries:
        raise ValidationError("a memory batch needs at least one entry")
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
                               timeout=timeout, headers={bus.MSG_ID_HEADER: msg_id})
    except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
        raise UnavailableError(f"memory append for agent {agent_id} of world {world_id} not acknowledged") from exc
    return not ack.duplicate


class AgentMemory:
    """One agent's memory as arrays: unit question embeddings (n, dim) float32, questions, answers.

    Only ever extended. Readers take a snapshot of (matrix, n) and only look at rows < n, while an
    extension writes rows >= n or swaps in a larger matrix; so a retrieval running in a worker
    thread never sees a half-written row.
    """

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = max(1, capacity)
        self._matrix: np.ndarray | None = None  # (capacity, dim) once the first entry arrives
        self._n = 0
        self.questions: list[str] = []
        self.answers: list[str] = []
        self._rounds = np.zeros(0, dtype=np.int32)  # round of each row (-1: prior), same growth as rows
        self.last_sequence = 0  # stream sequence of the last batch applied

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return None if self._matrix is None else self._matrix.shape[1]

    @property
    def embeddings(self) -> np.ndarray:
        """The (n, dim) matrix of unit question embeddings (a view; do not modify)."""
        if self._matrix is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._matrix[: self._n]

    @property
    def capacity(self) -> int:
        return 0 if self._matrix is None else self._matrix.shape[0]

    @property
    def nbytes(self) -> int:
        return 0 if self._matrix is None else int(self._matrix.nbytes)

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
            block = np.stack(rows)
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            # Texts first: a reader in another thread indexes them only below n, which moves last.
            self.questions.extend(questions)
            self.answers.extend(answers)
            self._append_rows(block / norms, np.asarray(rounds, dtype=np.int32))
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

    def retrieve(self, query_embedding: Sequence[float] | np.ndarray, k: int,
                 threshold: float = DEFAULT_RETRIEVAL_THRESHOLD, *,
                 before_round: int | None = None) -> list[common_pb2.Memory]:
        """The k memories whose questions are most similar to the query, most similar first.

        Keeps only memories with cosine distance (1 - cosine similarity) below ``threshold``; ties
        go to the earlier memory. ``before_round`` hides memories written in that round or later:
        a draft redone after a crash must not see the revision its first attempt already stored,
        so that a resumed world gives the same records as an unbroken one.
        """
        matrix, n, rounds = self._matrix, self._n, self._rounds
        if matrix is None or n == 0 or k <= 0:
            return []
        query = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if query.size != matrix.shape[1]:
            raise ValidationError(f"question embedding has {query.size} dimensions, memory has {matrix.shape[1]}")
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm):
            raise ValidationError("question embedding must be finite")
        if norm == 0.0:
            return []  # no features (e.g. a hashing embedding of "?!"): nothing is similar
        similarities = matrix[:n] @ (query / norm)
        if before_round is not None:
            similarities = np.where(rounds[:n] < before_round, similarities, -np.inf)
        k = min(k, n)
        if k < n:
            top = np.argpartition(-similarities, k - 1)[:k]
        else:
            top = np.arange(n)
        order = top[np.lexsort((top, -similarities[top]))]
        keep = order[np.isfinite(similarities[order]) & ((1.0 - similarities[order]) < threshold)]
        return [common_pb2.Memory(question=self.questions[i], answer=self.answers[i],
                                  similarity=float(similarities[i])) for i in keep]

    async def aretrieve(self, query_embedding: Sequence[float] | np.ndarray, k: int,
                        threshold: float = DEFAULT_RETRIEVAL_THRESHOLD, *,
                        before_round: int | None = None) -> list[common_pb2.Memory]:
        """``retrieve``, in a worker thread when the matrix is large enough to block the event loop."""
        if self._n * (self.dim or 0) <= _INLINE_SEARCH_FLOATS:
            return self.retrieve(query_embedding, k, threshold, before_round=before_round)
        return await asyncio.to_thread(functools.partial(self.retrieve, before_round=before_round),
                                       query_embedding, k, threshold)


def _decode_batch(data: bytes, subject: str, seq: int) -> list[common_pb2.MemoryEntry]:
    batch = common_pb2.MemoryBatch()
    try:
        batch.ParseFromString(data)
    except Exception:  # noqa: BLE001 - a foreign message on our subject must not wedge the agent
        log.warning("memory.batch_skipped", extra={"subject": subject, "seq": seq, "reason": "undecodable"})
        return []
    return list(batch.entries)


class MemoryStore:
    """Per-process LRU cache of ``AgentMemory`` objects, kept current with the JetStream log.

    ``get`` loads an agent's whole log on a miss (the prior is one batch, so usually two small
    requests) and, on a hit, reads only the batches appended since its last read
    (``_read_newer``): another process (the world service) appends revisions, and whichever
    replica serves the next draft must see them. Concurrent gets of one agent share a lock, so
    one load serves them all.
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
        revision two. A long backlog (an agent not seen for many rounds) is read with a consumer.
        """
        applied = 0
        while True:
            if applied >= _INCREMENTAL_GETS:
                before = memory.last_sequence
                await self._read_into(memory, subject)
                return applied + (memory.last_sequence > before)
            try:
                raw = await self.js.get_msg(bus.MEMORY_STREAM, seq=memory.last_sequence + 1, subject=subject,
                                            next=True)
            except nats.js.errors.NotFoundError:
                return applied
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                raise UnavailableError(f"cannot read {subject} from {bus.MEMORY_STREAM}") from exc
            seq = int(raw.seq or 0)
            if seq <= memory.last_sequence:
                return applied  # defensive: never loop on a server that answers an older message
            memory.extend(_decode_batch(raw.data or b"", subject, seq), seq)
            applied += 1

    async def _read_into(self, memory: AgentMemory, subject: str) -> None:
        try:
            messages = await bus.read_subject(self.js, bus.MEMORY_STREAM, subject, after_seq=memory.last_sequence,
                                              timeout=self.read_timeout)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            raise UnavailableError(f"cannot read {subject} from {bus.MEMORY_STREAM}") from exc
        for seq, msg in messages:
            if seq <= memory.last_sequence:
                continue  # already applied (a redelivery)
            memory.extend(_decode_batch(msg.data, subject, seq), seq)

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
