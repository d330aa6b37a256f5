"""Prior memories: M HH-RLHF pairs per agent, stored once per world and referenced by index.

The original embedded every agent's prior separately and wrote a file per agent, so its setup
grew with every agent (docs/benchmarks.md). Here the pairs of all agents are drawn first (seeded by world seed and
agent id), the distinct (pair, persona) entries they use become one shared ``MemoryPool``
(good agents hold the ``chosen`` answers, bad agents the ``rejected`` ones), each distinct
question is embedded once — through the embedder's on-disk cache, so a later run on the same
machine does not even load the model — and every agent's prior is published as one small
MemoryBatch of M int32 pool indices. The pool itself is stored once, content-addressed, in
the ``SANDBOX_MEMORY_POOLS`` stream, where any agent replica finds and verifies it. Message ids
"<world>.prior.<agent>" make a repeated setup (a resumed PENDING world) drop what was already
published.

Memory is linear in the number of agents with a small constant: the draws are one (agents, M)
int32 array, batches are built chunk by chunk, and nothing per agent holds texts or vectors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from nats.js import JetStreamContext

from services.world import grid
from stablealign.core.logs import get_logger
from stablealign.sandbox import data
from stablealign.sandbox.memory import MemoryPool, append_memory, prior_msg_id, publish_pool
from stablealign.v1 import common_pb2, world_pb2

log = get_logger(__name__)

# Cap on the question draws scanned to warm the embedder's cache before the rounds (the distinct
# questions of any world are at most the pool, which ~10 x pool-size draws almost always cover).
_QUESTION_SCAN_LIMIT = 2_000_000


@dataclass(frozen=True)
class PriorPlan:
    """Which pair each agent's M prior entries come from, and the shared entries they become."""

    pairs: tuple[data.HHPair, ...]
    indices: np.ndarray  # (agents, M) int32: pair index of each prior entry, in draw order
    entries: np.ndarray  # (agents, M) int32: pool entry of each prior entry
    entry_pairs: np.ndarray  # (entries,) int32: pair of each pool entry
    entry_bad: np.ndarray  # (entries,) bool: the entry holds the rejected answer (a bad agent's)
    questions: list[str]  # distinct questions, embedding row order
    question_of: np.ndarray  # (entries,) int32: question row of each pool entry

    @property
    def row_of(self) -> dict[str, int]:
        """question -> embedding row."""
        return {q: i for i, q in enumerate(self.questions)}

    def answers(self) -> list[str]:
        return [self.pairs[p].rejected if bad else self.pairs[p].chosen
                for p, bad in zip(self.entry_pairs.tolist(), self.entry_bad.tolist())]


def plan_prior(spec: world_pb2.WorldSpec) -> PriorPlan:
    """Draws M pairs per agent without replacement, seeded by (world seed, agent id)."""
    pairs = data.load_prior_pairs(spec.prior_path or None)  # never the pairs evaluation scores
    m = min(spec.prior_size, len(pairs))
    n = spec.size * spec.size
    indices = np.zeros((n, m), dtype=np.int32)
    if m:
        for a in range(n):
            indices[a] = grid.rng_for(spec.seed, "prior", a).choice(len(pairs), size=m, replace=False)
    bad = np.asarray(spec.labels, dtype=np.int64).reshape(-1)[:n] == grid.BAD
    if bad.size < n:
        bad = np.concatenate([bad, np.zeros(n - bad.size, dtype=bool)])
    # Entry key = pair * 2 + persona; the key space is small (2 x pairs), so a table maps keys to
    # pool entries without sorting agents x M keys.
    keys = indices.astype(np.int64) * 2 + bad[:, None]
    used = np.zeros(2 * len(pairs), dtype=bool)
    used[keys.ravel()] = True
    entry_keys = np.flatnonzero(used)
    table = np.full(2 * len(pairs), -1, dtype=np.int32)
    table[entry_keys] = np.arange(len(entry_keys), dtype=np.int32)
    entries = table[keys]
    del keys
    entry_pairs = (entry_keys // 2).astype(np.int32)
    row_of: dict[str, int] = {}
    questions: list[str] = []
    question_of = np.zeros(len(entry_keys), dtype=np.int32)
    for e, p in enumerate(entry_pairs.tolist()):
        q = pairs[p].question
        if q not in row_of:
            row_of[q] = len(questions)
            questions.append(q)
        question_of[e] = row_of[q]
    return PriorPlan(pairs, indices, entries, entry_pairs, (entry_keys % 2).astype(bool), questions, question_of)


def build_pool(plan: PriorPlan, embeddings: np.ndarray) -> MemoryPool:
    """The world's shared pool: every (pair, persona) entry its agents use, each question embedded once."""
    return MemoryPool.build(plan.questions, plan.answers(), plan.question_of, embeddings)


def prior_batch(pool: MemoryPool, plan: PriorPlan, agent: int) -> common_pb2.MemoryBatch:
    """Agent ``agent``'s prior: M references into ``pool``, in draw order."""
    return common_pb2.MemoryBatch(pool_id=pool.pool_id, pool_entries=plan.entries[agent].tolist())


def expand_batch(batch: common_pb2.MemoryBatch, pool: MemoryPool) -> list[common_pb2.MemoryEntry]:
    """The entries a pool-referencing batch stands for, by value (for tests, exports and old readers)."""
    out = []
    for e in batch.pool_entries:
        question, answer = pool.entry(e)
        entry = common_pb2.MemoryEntry(question=question, answer=answer, source="prior", round=-1)
        entry.question_embedding.extend(pool.matrix[pool.question_of[e]].tolist())
        out.append(entry)
    return [*out, *batch.entries]


def world_questions(spec: world_pb2.WorldSpec, pool: tuple[str, ...] | list[str]) -> list[str]:
    """The distinct questions a world's interactions will ask (in first-use order; all of the pool at most)."""
    seen: dict[str, None] = {}
    draws = 0
    for round_ in range(spec.rounds):
        for agent in range(spec.size * spec.size):
            seen.setdefault(grid.pick_question(pool, seed=spec.seed, round_=round_, agent=agent))
            draws += 1
            if len(seen) == len(pool) or draws >= _QUESTION_SCAN_LIMIT:
                return list(seen)
    return list(seen)


async def prepare_questions(embedder, spec: world_pb2.WorldSpec, pool: tuple[str, ...] | list[str]) -> float:
    """Embeds the world's questions up front through the embedder's on-disk cache, so that each
    interaction's embedding is an in-memory hit (and the model is not loaded when all were cached);
    returns the seconds it took. Only for embedders with such a cache (MiniLM): a remote embedder
    keeps embedding one question per interaction."""
    if getattr(embedder, "embed_cached", None) is None:
        return 0.0
    started = time.perf_counter()
    questions = await asyncio.to_thread(world_questions, spec, pool)
    await embedder.embed_cached(questions)
    seconds = time.perf_counter() - started
    log.info("world.questions_prepared", extra={"world_id": spec.world_id, "questions": len(questions),
                                                "seconds": round(seconds, 3)})
    return seconds


async def seed_prior(js: JetStreamContext, spec: world_pb2.WorldSpec, *, chunk: int = 64) -> float:
    """Builds and stores the world's pool, then publishes every agent's prior; returns the seconds it took."""
    from stablealign.llm.backends import get_embedder  # imported late: it pulls in the model libraries
    from stablealign.llm.backends.embeddings import embed_cached

    started = time.perf_counter()
    if spec.prior_size == 0:
        return 0.0
    plan = await asyncio.to_thread(plan_prior, spec)
    if plan.indices.shape[1] == 0:
        return time.perf_counter() - started
    embeddings = np.asarray(await embed_cached(get_embedder(spec.embedding_model), plan.questions),
                            dtype=np.float32)
    pool = await publish_pool(js, await asyncio.to_thread(build_pool, plan, embeddings))
    world_id = spec.world_id
    agents = plan.indices.shape[0]

    async def publish(agent: int) -> bool:
        return await append_memory(js, world_id, agent, prior_batch(pool, plan, agent), prior_msg_id(world_id, agent))

    for start in range(0, agents, chunk):
        await asyncio.gather(*(publish(a) for a in range(start, min(start + chunk, agents))))
    seconds = time.perf_counter() - started
    log.info(
        "world.prior_seeded",
        extra={
            "world_id": world_id,
            "agents": agents,
            "prior_size": spec.prior_size,
            "pool_id": pool.pool_id,
            "pool_entries": len(pool),
            "questions_embedded": len(plan.questions),
            "seconds": round(seconds, 3),
        },
    )
    return seconds
