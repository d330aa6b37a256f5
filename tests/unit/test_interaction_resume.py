"""A retried interaction resumes from the step that failed: the replies of the steps before it are kept
(issue 9: a retry reuses the work already done for the same (world, round, agent, step) instead of
asking the models again), and the record holds the replies the later steps saw."""

from __future__ import annotations

import pytest

from services.world import interaction, scheduler
from services.world.settings import WorldSettings
from services.world.store import WorldStore
from stablealign.core.errors import UnavailableError
from stablealign.nats import subjects
from stablealign.v1 import agent_pb2, common_pb2, observer_pb2, world_pb2


class FlakyDeps(interaction.InteractionDeps):
    """Answers every request at once; the steps named in ``fail`` fail the first time they are asked."""

    def __init__(self, fail: set[str]) -> None:
        # One call per request (batch_requests off), so that each item can fail on its own here; the
        # batched path is the same per item (InteractionProgress.step_many) and runs on NATS in the world tests.
        super().__init__(nc=None, js=None, settings=WorldSettings(batch_requests=False), embedder=None)
        self.fail = set(fail)
        self.asked: list[str] = []
        self.answered: dict[str, int] = {}

    async def call(self, subject, message, response_type, *, backend, step):
        name = step if subject != subjects.OBSERVER_RATE else f"{step}.{message.aspect}"
        if subject == subjects.AGENT_FEEDBACK:
            name = f"feedback.{message.agent_id}"
        self.asked.append(name)
        if name in self.fail:
            self.fail.discard(name)
            raise interaction.StepError(step, subject, UnavailableError(f"{name} unavailable"))
        answers = self.answered[name] = self.answered.get(name, 0) + 1  # a second answer would differ
        if subject == subjects.OBSERVER_RATE:
            return observer_pb2.RateResponse(rating=common_pb2.Rating(score=3 + answers, reason="r"))
        if subject == subjects.AGENT_FEEDBACK:
            return agent_pb2.FeedbackResponse(feedback=common_pb2.Feedback(rating=5, text=f"ok {answers}"))
        return response_type(answer=f"{step} answer {answers}")


def _spec() -> world_pb2.WorldSpec:
    return world_pb2.WorldSpec(world_id="w", size=3, rounds=1, labels=[1] * 9,
                               agent_model=common_pb2.ModelRef(backend="openai"),
                               observer_model=common_pb2.ModelRef(backend="openai"))


@pytest.fixture
def persisted(monkeypatch):
    records: list[common_pb2.InteractionRecord] = []

    async def keep(_deps, record, _memory, attempts=5):
        records.append(record)

    monkeypatch.setattr(interaction, "_persist", keep)
    return records


@pytest.mark.parametrize("failing", [{"revise"}, {"feedback.2", "rate_after.2"}, {"draft"}])
async def test_a_retry_asks_only_the_steps_that_had_not_answered(persisted, failing):
    deps = FlakyDeps(failing)
    progress = interaction.InteractionProgress()
    record = None
    for _attempt in range(len(failing) + 1):  # each failing step fails once
        try:
            record = await interaction.run_interaction(deps, _spec(), 0, 4, "Why?", [1, 2, 3], [0.1, 0.2],
                                                       progress=progress)
            break
        except interaction.StepError:
            continue
    assert record is not None
    # Every step was answered once: a failing step was asked twice (its failure, then its answer), the
    # others once, however many attempts the interaction took.
    every = ["draft", "feedback.1", "feedback.2", "feedback.3", "rate_before.1", "rate_before.2", "revise",
             "rate_after.1", "rate_after.2"]
    assert {name: deps.asked.count(name) for name in every} == {name: 1 + (name in failing) for name in every}
    # The record holds the answer each step gave (the first answer: a second one would read "2").
    assert record.draft_answer == "draft answer 1" and record.revised_answer == "revise answer 1"
    assert [f.text for f in record.feedback] == ["ok 1", "ok 1", "ok 1"]
    assert record.alignment_before.score == 4 and record.engagement_after.score == 4
    assert len(persisted) == 1


async def test_replies_that_break_the_records_checks_are_all_asked_again(persisted, monkeypatch):
    deps = FlakyDeps(set())
    progress = interaction.InteractionProgress()
    checks = iter([interaction.BackendError("invalid rating in a reply"), None])

    async def check(_record):
        error = next(checks)
        if error is not None:
            raise error

    monkeypatch.setattr(interaction, "_checked", check)
    with pytest.raises(interaction.StepError, match="check"):
        await interaction.run_interaction(deps, _spec(), 0, 4, "Why?", [1, 2], [0.1], progress=progress)
    assert progress.results == {}
    deps.asked.clear()
    await interaction.run_interaction(deps, _spec(), 0, 4, "Why?", [1, 2], [0.1], progress=progress)
    assert len(deps.asked) == 8  # draft, 2 feedback, 2 before, revise, 2 after: all asked again


async def test_the_scheduler_retries_an_interaction_from_its_failed_step(persisted, monkeypatch):
    deps = FlakyDeps({"revise"})
    world = world_pb2.World(spec=_spec(), state=world_pb2.WORLD_STATE_RUNNING)
    runner = scheduler.WorldRunner(world, nc=None, js=None, store=WorldStore.__new__(WorldStore),
                                   settings=WorldSettings(failure_backoff_max_seconds=0.01))
    record = await runner._interact(deps, ["Why?"], 0, 4, {"Why?": [0.1, 0.2]})  # noqa: SLF001 - its retry loop
    assert deps.asked.count("draft") == 1 and deps.asked.count("revise") == 2
    assert record.revised_answer == "revise answer 1"  # the failed step answered once, on the retry
    assert len(persisted) == 1
