"""Vectorised retrieval over an agent's memory equals a plain loop, honours k and the threshold,
and appends keep every earlier entry while capacity only doubles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stablealign.core.errors import ValidationError
from stablealign.sandbox.memory import AgentMemory
from stablealign.v1 import common_pb2


def entry(i: int, vector) -> common_pb2.MemoryEntry:
    e = common_pb2.MemoryEntry(question=f"q{i}", answer=f"a{i}", source="prior", round=-1)
    e.question_embedding.extend(np.asarray(vector, dtype=np.float32).tolist())
    return e


def naive(vectors: np.ndarray, query: np.ndarray, k: int, threshold: float) -> list[tuple[int, float]]:
    """The original's way: a distance per memory in a Python loop, then sort."""
    q = query / np.linalg.norm(query)
    scored = []
    for i, v in enumerate(vectors):
        sim = float(np.dot(v / np.linalg.norm(v), q))
        if 1.0 - sim < threshold:
            scored.append((i, sim))
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    return scored[:k]


def test_top_k_threshold_and_order():
    memory = AgentMemory()
    memory.extend([entry(0, [1, 0, 0]), entry(1, [0.9, 0.1, 0]), entry(2, [0, 1, 0]),
                   entry(3, [0.7, 0.7, 0]), entry(4, [-1, 0, 0])], sequence=1)
    got = memory.retrieve([1, 0, 0], k=3, threshold=0.3)
    assert [m.question for m in got] == ["q0", "q1", "q3"]
    assert got[0].similarity == pytest.approx(1.0)
    assert all(a.similarity >= b.similarity for a, b in itertools.pairwise(got))
    # Threshold: cos distance < 0.05 keeps only the two nearest.
    assert [m.question for m in memory.retrieve([1, 0, 0], k=5, threshold=0.05)] == ["q0", "q1"]
    # k larger than the memory, and the opposite vector never passes the original's threshold.
    assert "q4" not in [m.question for m in memory.retrieve([1, 0, 0], k=50, threshold=0.3)]
    assert memory.retrieve([1, 0, 0], k=0, threshold=0.3) == []
    # Answers travel with their questions.
    assert got[1].answer == "a1"


def test_empty_memory_and_bad_queries():
    memory = AgentMemory()
    assert memory.retrieve([1.0, 0.0], k=3) == []
    memory.extend([entry(0, [1, 0])])
    with pytest.raises(ValidationError, match="dimensions"):
        memory.retrieve([1.0, 0.0, 0.0], k=3)
    with pytest.raises(ValidationError, match="finite"):
        memory.retrieve([float("nan"), 0.0], k=3)
    assert memory.retrieve([0.0, 0.0], k=3) == []  # a featureless query has no similar memories


def test_vectorised_equals_naive_loop():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(8, 32)).astype(np.float32)
    # Clusters around a few centres so that some memories pass the threshold.
    vectors = np.concatenate([base[rng.integers(0, 8)] + 0.3 * rng.normal(size=(1, 32)) for _ in range(300)])
    vectors = vectors.astype(np.float32)
    memory = AgentMemory(capacity=4)
    for start in range(0, 300, 37):  # several batches, like prior + revisions
        memory.extend([entry(i, vectors[i]) for i in range(start, min(start + 37, 300))], sequence=start + 1)
    for trial in range(20):
        query = base[trial % 8] + 0.2 * rng.normal(size=32)
        for k, threshold in ((1, 0.3), (5, 0.3), (10, 0.5), (300, 2.0)):
            got = [(int(m.question[1:]), m.similarity) for m in memory.retrieve(query, k, threshold)]
            want = naive(vectors, query, k, threshold)
            assert len(got) == len(want)
            assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
            # Same memories in the same order, up to float32 rounding between near-equal similarities:
            # where the index differs, the naive loop's similarity of our pick ties with its own pick.
            exact = dict(naive(vectors, query, len(vectors), 3.0))
            mismatches = 0
            for (gi, _), (wi, ws) in zip(got, want):
                if gi != wi:
                    mismatches += 1
                    assert abs(exact[gi] - ws) < 1e-5
            assert mismatches <= 2


def test_growth_keeps_earlier_entries_and_doubles_capacity():
    memory = AgentMemory(capacity=2)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(100, 16)).astype(np.float32)
    capacities = []
    for i in range(100):  # one revision per round
        memory.extend([entry(i, vectors[i])], sequence=i + 1)
        capacities.append(memory.capacity)
    assert len(memory) == 100 and memory.last_sequence == 100
    assert memory.questions == [f"q{i}" for i in range(100)]
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(memory.embeddings, expected, atol=1e-6)
    # Amortised growth: capacity only ever doubles (7 reallocations for 100 appends), and stays < 2n.
    assert sorted(set(capacities)) == [2, 4, 8, 16, 32, 64, 128]
    assert memory.nbytes == 128 * 16 * 4
    for i in (0, 50, 99):
        assert memory.retrieve(vectors[i], k=1, threshold=0.01)[0].question == f"q{i}"


def test_mismatched_entries_are_skipped_not_fatal():
    memory = AgentMemory()
    added = memory.extend([entry(0, [1, 0, 0]), entry(1, [1, 0]), common_pb2.MemoryEntry(question="x")])
    assert added == 1 and len(memory) == 1


def test_snapshot_survives_growth():
    """A reader holding the old matrix keeps valid rows while a writer grows the memory."""
    memory = AgentMemory(capacity=1)
    memory.extend([entry(0, [1, 0])])
    before = memory.embeddings
    memory.extend([entry(i, [0, 1]) for i in range(1, 10)])
    assert np.allclose(before, [[1, 0]]) and len(memory) == 10


def test_memories_of_the_current_round_and_later_are_hidden():
    """A redone draft (after a crash) must not see the revision its first attempt already stored."""
    from stablealign.sandbox.memory import AgentMemory
    from stablealign.v1 import common_pb2

    memory = AgentMemory(capacity=1)
    memory.extend([common_pb2.MemoryEntry(question="prior", answer="p", question_embedding=[1, 0], round=-1)])
    memory.extend([common_pb2.MemoryEntry(question="r0", answer="a0", question_embedding=[1, 0.01], round=0)])
    memory.extend([common_pb2.MemoryEntry(question="r1", answer="a1", question_embedding=[1, 0.02], round=1)])
    everything = [m.question for m in memory.retrieve([1, 0], k=5, threshold=0.3)]
    assert everything == ["prior", "r0", "r1"]
    assert [m.question for m in memory.retrieve([1, 0], k=5, threshold=0.3, before_round=1)] == ["prior", "r0"]
    assert [m.question for m in memory.retrieve([1, 0], k=1, threshold=0.3, before_round=0)] == ["prior"]
