"""Shared prior pools: an agent's prior is M int32 indices into one pool per world, and retrieval over
it equals retrieval over the former per-agent matrix (same memories, same order, same similarities)."""

from __future__ import annotations

import numpy as np
import pytest

from services.world import grid
from services.world.prior import build_pool, expand_batch, plan_prior, prior_batch
from services.world.spec import resolve_spec
from stablealign.core.errors import ConflictError, ValidationError
from stablealign.llm.backends.embeddings import HashingEmbedder
from stablealign.sandbox.memory import AgentMemory, MemoryPool
from stablealign.v1 import common_pb2, world_pb2

HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


def world(size: int = 4, prior_size: int = 20, setting: str = "half_half", seed: int = 3) -> world_pb2.WorldSpec:
    return resolve_spec(world_pb2.WorldSpec(size=size, rounds=2, seed=seed, setting=setting, prior_size=prior_size,
                                            agent_model=common_pb2.ModelRef(backend="offline"),
                                            observer_model=common_pb2.ModelRef(backend="offline"),
                                            embedding_model=HASHING))


def pooled(spec: world_pb2.WorldSpec):
    plan = plan_prior(spec)
    embeddings = HashingEmbedder(384).embed_sync(plan.questions)
    return plan, embeddings, build_pool(plan, embeddings)


def former_entries(spec, plan, embeddings, agent: int) -> list[common_pb2.MemoryEntry]:
    """What the world used to publish for an agent: M entries by value (texts + the question's embedding)."""
    out = []
    row_of = plan.row_of
    for i in plan.indices[agent]:
        pair = plan.pairs[int(i)]
        entry = common_pb2.MemoryEntry(question=pair.question,
                                       answer=pair.chosen if spec.labels[agent] == grid.GOOD else pair.rejected,
                                       source="prior", round=-1)
        entry.question_embedding.extend(embeddings[row_of[pair.question]].tolist())
        out.append(entry)
    return out


def test_draws_are_the_former_draws_and_indices_round_trip():
    spec = world(size=5, prior_size=12, setting="mixed_half_half")
    plan, embeddings, pool = pooled(spec)
    n_pairs = len(plan.pairs)
    for agent in range(25):  # the same seeded draws as before: the same prior pairs for every agent
        want = grid.rng_for(spec.seed, "prior", agent).choice(n_pairs, size=12, replace=False)
        assert plan.indices[agent].tolist() == want.tolist()
        batch = prior_batch(pool, plan, agent)
        decoded = common_pb2.MemoryBatch()
        decoded.ParseFromString(batch.SerializeToString())
        assert decoded.pool_id == pool.pool_id and list(decoded.pool_entries) == plan.entries[agent].tolist()
        # By reference or by value: the same entries.
        assert [(e.question, e.answer, e.source, e.round, list(e.question_embedding)) for e in
                expand_batch(decoded, pool)] == [
            (e.question, e.answer, e.source, e.round, pytest.approx(list(e.question_embedding), abs=1e-6))
            for e in former_entries(spec, plan, embeddings, agent)]
    # One entry per distinct (pair, persona) used; one embedding row per distinct question.
    used = {(int(p), spec.labels[a]) for a in range(25) for p in plan.indices[a]}
    assert len(pool) == len(used) and pool.matrix.shape == (len(set(pool.questions)), 384)
    # A batch of M indices is small: a few bytes per entry, not texts and 384 floats.
    assert len(prior_batch(pool, plan, 0).SerializeToString()) < 12 * 3 + 80


def test_pool_bytes_round_trip_and_are_verified():
    spec = world()
    plan, embeddings, pool = pooled(spec)
    data = pool.to_bytes()
    again = MemoryPool.from_bytes(data, pool.pool_id)
    assert again.pool_id == pool.pool_id and again.questions == pool.questions and again.answers == pool.answers
    assert np.array_equal(again.matrix, pool.matrix) and np.array_equal(again.question_of, pool.question_of)
    assert not again.matrix.flags.writeable
    # Same content -> same id in any process; any changed byte -> refused loudly.
    assert build_pool(plan_prior(spec), embeddings.copy()).pool_id == pool.pool_id
    tampered = bytearray(data)
    tampered[-3] ^= 0xFF
    with pytest.raises(ConflictError, match="hashes to"):
        MemoryPool.from_bytes(bytes(tampered), pool.pool_id)
    with pytest.raises(ConflictError, match="undecodable"):
        MemoryPool.from_bytes(b"not a pool")
    with pytest.raises(ValidationError):
        MemoryPool.build(["q"], ["a", "b"], [0, 1], np.ones((1, 4), dtype=np.float32))


@pytest.mark.parametrize("setting", ["half_half", "mixed_half_half", "all_bad"])
def test_retrieval_from_the_pool_equals_the_former_per_agent_matrix(setting):
    spec = world(size=4, prior_size=25, setting=setting)
    plan, embeddings, pool = pooled(spec)
    hashing = HashingEmbedder(384)
    rng = np.random.default_rng(0)
    queries = [hashing.embed_one(plan.pairs[int(i)].question + " please") for i in rng.integers(len(plan.pairs), size=6)]
    queries += [embeddings[int(i)] for i in rng.integers(len(plan.questions), size=6)]
    for agent in range(16):
        former = AgentMemory(capacity=64)  # the former layout: every prior entry copied into the agent's matrix
        former.extend(former_entries(spec, plan, embeddings, agent), sequence=1)
        shared = AgentMemory()
        assert shared.extend_pool(pool, plan.entries[agent], sequence=1) == 25
        # Two rounds of revisions, by value, on both.
        for round_ in range(2):
            revision = common_pb2.MemoryEntry(question=f"revised {agent} {round_}", answer="r", round=round_,
                                              source="revised")
            revision.question_embedding.extend(queries[(agent + round_) % len(queries)].tolist())
            former.extend([revision], sequence=2 + round_)
            shared.extend([revision], sequence=2 + round_)
        assert len(shared) == len(former) == 27 and shared.questions == former.questions
        assert shared.answers == former.answers
        assert np.array_equal(shared.embeddings, former.embeddings)
        for query in queries:
            for k, threshold, before in ((3, 0.75, None), (1, 0.3, None), (10, 2.0, 1), (27, 2.0, 0)):
                got = shared.retrieve(query, k, threshold, before_round=before)
                want = former.retrieve(query, k, threshold, before_round=before)
                assert [(m.question, m.answer, m.similarity) for m in got] == \
                    [(m.question, m.answer, m.similarity) for m in want]
        # The agent's own bytes: M int32 indices and its revisions, not a 64 x 384 matrix of priors.
        assert shared.nbytes <= 25 * 4 + 4 * 384 * 4 < former.nbytes // 10


def test_pool_indices_outside_the_pool_are_skipped_and_a_second_pool_is_copied_in():
    _, _, pool = pooled(world(size=2, prior_size=5))
    memory = AgentMemory()
    assert memory.extend_pool(pool, [0, 1, len(pool), -1]) == 2 and len(memory) == 2
    other = MemoryPool.build(["other question"], ["other answer"], [0], np.ones((1, pool.dim), dtype=np.float32))
    assert memory.extend_pool(other, [0]) == 1
    assert memory.pool is pool and memory.questions[-1] == "other question" and len(memory) == 3
    got = memory.retrieve(np.ones(pool.dim), k=1, threshold=0.01)
    assert [m.answer for m in got] == ["other answer"]
    # A pool whose embeddings do not match the memory's own entries is refused, not mixed.
    small = AgentMemory()
    small.extend([common_pb2.MemoryEntry(question="q", answer="a", question_embedding=[1.0, 0.0])])
    assert small.extend_pool(pool, [0]) == 0 and len(small) == 1


def test_pool_entries_count_as_prior_for_hidden_rounds():
    _, _, pool = pooled(world(size=2, prior_size=5))
    memory = AgentMemory()
    memory.extend_pool(pool, [0])
    question, _ = pool.entry(0)
    vector = pool.matrix[pool.question_of[0]]
    memory.extend([common_pb2.MemoryEntry(question="mine", answer="m", question_embedding=vector.tolist(), round=0)])
    assert [m.question for m in memory.retrieve(vector, k=5, threshold=0.1)] == [question, "mine"]
    assert [m.question for m in memory.retrieve(vector, k=5, threshold=0.1, before_round=0)] == [question]
