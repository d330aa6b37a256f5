"""The interaction's critical path: the question's vector is computed before the round (the draft
request carries it, nothing embeds it on the path) and the LLM steps run in 4 sequential waves."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from services.world import interaction, scheduler
from services.world.settings import WorldSettings
from stablealign.nats import subjects
from stablealign.v1 import agent_pb2, common_pb2, observer_pb2, world_pb2

STEP_SECONDS = 0.2  # each fake call's latency; waves are told apart by start times 0.2 s apart


class CountingEmbedder:
    name = "counting"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    async def embed(self, texts):
        self.calls.append(list(texts))
        if self.fail:
            raise RuntimeError("embedder down")
        await asyncio.sleep(STEP_SECONDS)
        return np.full((len(texts), 4), 0.5, dtype=np.float32)


class FakeDeps(interaction.InteractionDeps):
    """Answers every agent/observer request after STEP_SECONDS and notes (subject, start, request)."""

    def __init__(self, embedder) -> None:
        # One call per request (batch_requests off): the calls and their start times are what this test reads.
        super().__init__(nc=None, js=None, settings=WorldSettings(batch_requests=False), embedder=embedder)
        self.calls: list[tuple[str, float, object]] = []

    async def call(self, subject, message, response_type, *, backend, step):
        self.calls.append((subject, time.monotonic(), message))
        await asyncio.sleep(STEP_SECONDS)
        if subject == subjects.OBSERVER_RATE:
            return observer_pb2.RateResponse(rating=common_pb2.Rating(score=4))
        if subject == subjects.AGENT_FEEDBACK:
            return agent_pb2.FeedbackResponse(feedback=common_pb2.Feedback(rating=5, text="ok"))
        return response_type(answer=f"{step} answer")


def _spec() -> world_pb2.WorldSpec:
    return world_pb2.WorldSpec(world_id="w", size=3, rounds=1, labels=[0] * 9,
                               agent_model=common_pb2.ModelRef(backend="openai"),
                               observer_model=common_pb2.ModelRef(backend="openai"))


def _waves(starts: list[float], started: float) -> list[int]:
    """How many calls started in each STEP_SECONDS-wide slot after ``started`` (0-based slots)."""
    slots: dict[int, int] = {}
    for s in starts:
        slot = int((s - started) / STEP_SECONDS + 0.5)
        slots[slot] = slots.get(slot, 0) + 1
    return [slots[k] for k in sorted(slots)]


@pytest.fixture
def no_writes(monkeypatch):
    async def nothing(*_args, **_kwargs):
        return None

    monkeypatch.setattr(interaction, "_persist", nothing)
    monkeypatch.setattr(interaction, "_checked", nothing)


async def test_a_precomputed_embedding_leaves_four_sequential_llm_steps(no_writes):
    embedder = CountingEmbedder()
    deps = FakeDeps(embedder)
    vector = [0.1, 0.2, 0.3, 0.4]
    started = time.monotonic()
    record = await interaction.run_interaction(deps, _spec(), 0, 4, "Is it fine?", [1, 3, 5, 7],
                                               question_embedding=np.asarray(vector, dtype=np.float32))
    elapsed = time.monotonic() - started
    assert embedder.calls == []  # nothing embedded on the path
    draft = [m for s, _, m in deps.calls if s == subjects.AGENT_DRAFT]
    assert len(draft) == 1 and list(draft[0].question_embedding) == pytest.approx(vector)
    # draft | 4 feedbacks + 2 "before" ratings | revise | 2 "after" ratings: 4 waves, 10 calls
    assert _waves([t for _, t, _ in deps.calls], started) == [1, 6, 1, 2]
    sent = [s for s, _, _ in deps.calls]
    assert sent.count(subjects.AGENT_FEEDBACK) == 4 and sent.count(subjects.OBSERVER_RATE) == 4
    assert 4 * STEP_SECONDS <= elapsed < 4 * STEP_SECONDS + 0.5 * STEP_SECONDS + 1.0  # generous: loaded CI
    assert record.latency_seconds["embed"] < STEP_SECONDS / 2
    assert [f.partner_id for f in record.feedback] == [1, 3, 5, 7]


async def test_without_a_vector_the_interaction_embeds_its_question_first(no_writes):
    embedder = CountingEmbedder()
    deps = FakeDeps(embedder)
    started = time.monotonic()
    await interaction.run_interaction(deps, _spec(), 0, 4, "Is it fine?", [1, 3])
    assert embedder.calls == [["Is it fine?"]]
    # the embedding is one more wave before the draft
    assert _waves([t for _, t, _ in deps.calls], started - STEP_SECONDS) == [1, 4, 1, 2]
    draft = next(m for s, _, m in deps.calls if s == subjects.AGENT_DRAFT)
    assert list(draft.question_embedding) == pytest.approx([0.5] * 4)


async def test_question_vectors_embed_a_rounds_distinct_questions_in_one_go():
    embedder = CountingEmbedder()
    vectors = scheduler.QuestionVectors(embedder)
    first = await vectors.prepare(["a", "b", "a", "c"])
    assert embedder.calls == [["a", "b", "c"]] and set(first) == {"a", "b", "c"}
    second = await vectors.prepare(["c", "d"])  # only the new question is embedded; older rounds forgotten
    assert embedder.calls[-1] == ["d"] and set(second) == {"c", "d"}
    assert set(vectors._vectors) == {"c", "d"}


async def test_a_failing_embedder_leaves_the_embedding_to_each_interaction():
    vectors = scheduler.QuestionVectors(CountingEmbedder(fail=True))
    assert await vectors.prepare(["a"]) == {}


def test_round_questions_are_the_ones_the_interactions_ask():
    from services.world import grid

    spec = world_pb2.WorldSpec(size=4, seed=7)
    pool = [f"q{i}" for i in range(5)]
    asked = {grid.pick_question(pool, seed=7, round_=2, agent=a) for a in range(16)}
    got = scheduler.round_questions(spec, pool, 2, range(16))
    assert set(got) == asked and len(got) == len(asked)
