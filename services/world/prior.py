"""Prior memories: M HH-RLHF pairs per agent, embedded once per world, one batch per agent.

The original embedded every agent's prior separately and wrote a file per agent (186 s of
setup for 100 agents). Here the pairs of all agents are drawn first, each distinct question
is embedded once in one batched call, and every agent's prior is published as one
MemoryBatch message (good agents hold the ``chosen`` answers, bad agents the ``rejected``
ones), many at a time. Message ids "<world>.prior.<agent>" make a repeated setup (a resumed
PENDING world) drop what was already published.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from nats.js import JetStreamContext

from services.world import grid
from stablealign import data
from stablealign.logs import get_logger
from stablealign.memory import append_memory, prior_msg_id
from stablealign.v1 import common_pb2, world_pb2

log = get_logger(__name__)


@dataclass(frozen=True)
class PriorPlan:
    """Which pair indices each agent gets, and the distinct questions to embed."""

    pairs: tuple[data.HHPair, ...]
    indices: list[np.ndarray]  # per agent id
    questions: list[str]  # distinct questions, embedding row order
    row_of: dict[str, int]  # question -> embedding row


def plan_prior(spec: world_pb2.WorldSpec) -> PriorPlan:
    """Draws M pairs per agent without replacement, seeded by (world seed, agent id)."""
    pairs = data.load_prior_pairs(spec.prior_path or None)  # never the pairs evaluation scores
    m = min(spec.prior_size, len(pairs))
    n = spec.size * spec.size
    indices = [
        grid.rng_for(spec.seed, "prior", a).choice(len(pairs), size=m, replace=False)
        if m
        else np.zeros(0, dtype=np.int64)
        for a in range(n)
    ]
    row_of: dict[str, int] = {}
    questions: list[str] = []
    for idx in indices:
        for i in idx:
            q = pairs[int(i)].question
            if q not in row_of:
                row_of[q] = len(questions)
                questions.append(q)
    return PriorPlan(pairs, indices, questions, row_of)


def build_batches(spec: world_pb2.WorldSpec, plan: PriorPlan, embeddings: np.ndarray) -> list[bytes]:
    """One serialized MemoryBatch per agent id.

    Each distinct (pair, persona) entry is serialized once and batches are byte concatenations
    of them: a repeated message field is encoded entry by entry, so the concatenation of
    one-entry batches *is* the many-entry batch (and 100 agents × 50 × 384 floats stay cheap).
    """
    cache: dict[tuple[int, int], bytes] = {}
    out: list[bytes] = []
    for agent, idx in enumerate(plan.indices):
        persona = spec.labels[agent]
        parts = []
        for i in idx:
            key = (int(i), persona)
            blob = cache.get(key)
            if blob is None:
                pair = plan.pairs[key[0]]
                entry = common_pb2.MemoryEntry(
                    question=pair.question,
                    answer=pair.chosen if persona == grid.GOOD else pair.rejected,
                    source="prior",
                    round=-1,
                )
                entry.question_embedding.extend(embeddings[plan.row_of[pair.question]].tolist())
                blob = common_pb2.MemoryBatch(entries=[entry]).SerializeToString()
                cache[key] = blob
            parts.append(blob)
        out.append(b"".join(parts))
    return out


async def seed_prior(js: JetStreamContext, spec: world_pb2.WorldSpec, *, chunk: int = 64) -> float:
    """Embeds and publishes every agent's prior memory; returns the seconds it took."""
    from stablealign.backends import get_embedder  # imported late: it pulls in the model libraries

    started = time.perf_counter()
    if spec.prior_size == 0:
        return 0.0
    plan = await asyncio.to_thread(plan_prior, spec)
    if plan.questions:
        embedder = get_embedder(spec.embedding_model)
        embeddings = np.asarray(await embedder.embed(plan.questions), dtype=np.float32)
    else:
        embeddings = np.zeros((0, 0), dtype=np.float32)
    batches = await asyncio.to_thread(build_batches, spec, plan, embeddings)
    world_id = spec.world_id

    async def publish(agent: int) -> bool:
        batch = common_pb2.MemoryBatch()
        batch.ParseFromString(batches[agent])
        return await append_memory(js, world_id, agent, batch, prior_msg_id(world_id, agent))

    for start in range(0, len(batches), chunk):
        await asyncio.gather(*(publish(a) for a in range(start, min(start + chunk, len(batches)))))
    seconds = time.perf_counter() - started
    log.info(
        "world.prior_seeded",
        extra={
            "world_id": world_id,
            "agents": len(batches),
            "prior_size": spec.prior_size,
            "questions_embedded": len(plan.questions),
            "seconds": round(seconds, 3),
        },
    )
    return seconds
