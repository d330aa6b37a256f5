"""A world's shared prior pool through JetStream: stored once, found and verified by any replica."""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict

import numpy as np
import pytest

from services.world.prior import build_pool, plan_prior, prior_batch
from services.world.spec import resolve_spec
from stablealign.core.errors import ConflictError, UnavailableError
from stablealign.llm.backends.embeddings import HashingEmbedder
from stablealign.sandbox import memory as memory_module
from stablealign.sandbox.memory import (
    POOL_STREAM,
    AgentMemory,
    MemoryStore,
    append_memory,
    ensure_pool_stream,
    pool_subject,
    prior_msg_id,
    publish_pool,
)
from stablealign.v1 import common_pb2, world_pb2


@pytest.fixture
def fresh_process(monkeypatch):
    """As if in another process: no pool decoded yet."""
    monkeypatch.setattr(memory_module, "_POOLS", OrderedDict())
    monkeypatch.setattr(memory_module, "_LIVE_POOLS", weakref.WeakValueDictionary())


def spec_and_pool():
    spec = resolve_spec(world_pb2.WorldSpec(
        world_id="pooled", size=3, rounds=1, seed=2, prior_size=8,
        agent_model=common_pb2.ModelRef(backend="offline"), observer_model=common_pb2.ModelRef(backend="offline"),
        embedding_model=common_pb2.ModelRef(backend="offline", model="hashing")))
    plan = plan_prior(spec)
    return spec, plan, build_pool(plan, HashingEmbedder(384).embed_sync(plan.questions))


async def test_a_replica_reads_the_pool_once_and_retrieves_as_the_world_built_it(nc, monkeypatch, fresh_process):
    js = nc.jetstream()
    spec, plan, pool = spec_and_pool()
    await publish_pool(js, pool)
    before = (await js.stream_info(POOL_STREAM)).state.messages
    await publish_pool(js, pool)  # content-addressed: storing it again adds nothing
    assert (await js.stream_info(POOL_STREAM)).state.messages == before
    for agent in range(9):
        assert await append_memory(js, "pooled", agent, prior_batch(pool, plan, agent), prior_msg_id("pooled", agent))

    # Another process: nothing decoded yet; nine agents loaded at once share one read of the pool.
    monkeypatch.setattr(memory_module, "_POOLS", OrderedDict())
    monkeypatch.setattr(memory_module, "_LIVE_POOLS", weakref.WeakValueDictionary())
    reads = []
    real_fetch = memory_module.fetch_pool

    async def counting(js_, pool_id):
        reads.append(pool_id)
        return await real_fetch(js_, pool_id)

    monkeypatch.setattr(memory_module, "fetch_pool", counting)
    store = MemoryStore(js)
    memories = await asyncio.gather(*(store.get("pooled", a) for a in range(9)))
    assert reads == [pool.pool_id]
    assert all(m.pool is memories[0].pool and m.pool is not pool for m in memories)  # one copy per process
    for agent, memory in enumerate(memories):
        local = AgentMemory()
        local.extend_pool(pool, plan.entries[agent])
        assert memory.questions == local.questions and memory.answers == local.answers
        for row in (0, 3):
            query = pool.matrix[row]
            assert [(m.question, m.similarity) for m in memory.retrieve(query, 3, 2.0)] == \
                [(m.question, m.similarity) for m in local.retrieve(query, 3, 2.0)]
        assert memory.nbytes == 8 * 4  # M int32 indices; texts and vectors live once, in the pool
    assert np.array_equal(memories[0].pool.matrix, pool.matrix)


async def test_a_corrupt_or_missing_pool_fails_loudly(nc, fresh_process):
    js = nc.jetstream()
    await ensure_pool_stream(js)
    fake_id = "0" * 64
    await js.publish(pool_subject(fake_id, 0), b"SAPOOL1\n not what the id promises")
    batch = common_pb2.MemoryBatch(pool_id=fake_id, pool_entries=[0, 1])
    await append_memory(js, "bad", 0, batch, prior_msg_id("bad", 0))
    store = MemoryStore(js)
    with pytest.raises(ConflictError, match="hashes to"):
        await store.get("bad", 0)
    assert store.cached("bad", 0) is None  # nothing half-loaded is kept

    missing = common_pb2.MemoryBatch(pool_id="f" * 64, pool_entries=[0])
    await append_memory(js, "bad", 1, missing, prior_msg_id("bad", 1))
    with pytest.raises(UnavailableError, match="not in"):
        await store.get("bad", 1)


async def test_a_pool_larger_than_a_message_travels_in_chunks(nc, fresh_process):
    js = nc.jetstream()
    rng = np.random.default_rng(5)
    questions = [f"question {i}?" for i in range(3000)]
    pool = memory_module.MemoryPool.build(questions, [f"answer {i} " * 20 for i in range(3000)], np.arange(3000),
                                          rng.normal(size=(3000, 384)).astype(np.float32))
    size = len(pool.to_bytes())
    assert size > 4 * 1024 * 1024  # several NATS messages
    await publish_pool(js, pool)
    chunks = (await js.stream_info(POOL_STREAM)).state.messages
    assert chunks == -(-size // (512 * 1024))
    pool_id = pool.pool_id
    memory_module._POOLS.clear()
    memory_module._LIVE_POOLS.clear()  # as if in another process: only the stream holds it now
    again = await memory_module.fetch_pool(js, pool_id)
    assert again is not pool and again.pool_id == pool_id and np.array_equal(again.matrix, pool.matrix)
    assert len(again) == 3000 and again.entry(2999) == ("question 2999?", "answer 2999 " * 20)
