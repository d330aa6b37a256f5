"""One interaction of one agent on one question, on the shortest critical path.

The original ran 16 sequential LLM round trips per interaction. Here the steps that do not
depend on each other run at once, and the question's embedding is computed before the round
(questions come from a known pool: the scheduler embeds each round's distinct questions in
batches, scheduler.QuestionVectors), which leaves 4 sequential round trips
(draft → {k feedbacks, 2 "before" ratings} → revise → {2 "after" ratings}):

    Draft ─┬─► Feedback × k ─┬─► Revise ─┬─► Rate alignment (after)
           ├─► Rate alignment (before)   └─► Rate engagement (after)
           └─► Rate engagement (before)

The "before" ratings depend only on the draft, so running them beside the feedback changes no
record. Without a precomputed embedding the interaction embeds its question first (5 round trips).
Each fan-out is one NATS request (``nats_client.request_batch``): the k feedback requests go to the agents as
one batch, each pair of ratings to the observers as another, so an interaction costs 5 requests on the
bus instead of 10, with the items still answered (and failing, and being retried) one by one.

A step's reply is kept in the interaction's ``InteractionProgress`` as soon as it arrives, and the
world's retry of a failed interaction passes the same one back: the retry resumes from the step that
failed (for the feedback wave, the calls that failed) instead of asking the models again for what
they already answered — no wasted LLM calls, and a record that holds the replies the later steps saw.

Then the revision goes into the agent's memory and the record is published. Both writes carry
message ids ("<world>.<round>.<agent>.memory" and "<world>.<round>.<agent>"), so redoing an
interaction after a crash or a failed attempt never duplicates anything.

A step that fails raises ``StepError``: which step, what served it (a NATS subject and the backend
behind it, the embedder, JetStream) and the error itself, which the scheduler's failure budget sorts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
import numpy as np
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.world.settings import WorldSettings
from stablealign.core.errors import BackendError, StableAlignError, UnavailableError, ValidationError
from stablealign.core.retry import RetryPolicy, retry_async
from stablealign.core.timing import timed
from stablealign.llm.backends.base import Embedder
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.memory import append_memory, revision_msg_id
from stablealign.sandbox.records import check_record, record_msg_id  # the id readers trust (record_stream)
from stablealign.v1 import agent_pb2, common_pb2, observer_pb2, world_pb2

T = TypeVar("T")

ALIGNMENT = observer_pb2.RATING_ASPECT_ALIGNMENT
ENGAGEMENT = observer_pb2.RATING_ASPECT_ENGAGEMENT


class StepError(StableAlignError):
    """One step of an interaction failed. ``step`` (draft, feedback, rate_before, revise, rate_after, embed,
    persist), ``target`` (what served it: a NATS subject and its backend, the embedder, JetStream) and the
    original ``error`` (also the ``__cause__``); ``code`` is the error's own."""

    def __init__(self, step: str, target: str, error: Exception) -> None:
        self.step, self.target, self.error = step, target, error
        self.code = getattr(error, "code", 500)
        reason = str(error) if isinstance(error, StableAlignError) else f"{type(error).__name__}: {error}"
        super().__init__(f"{step} ({target}): {reason}")


async def _step(step: str, target: str, awaitable):
    """``await awaitable``, its failure raised as a StepError naming the step and its target."""
    try:
        return await awaitable
    except StepError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of a step is named, then sorted by the caller
        raise StepError(step, target, exc) from exc


@dataclass
class InteractionDeps:
    """What every interaction of a world needs: the bus, the settings and the world's embedder."""

    nc: NATS
    js: JetStreamContext
    settings: WorldSettings
    embedder: Embedder

    def _limits(self, backend: str) -> dict[str, Any]:
        """Deadline (fit to the ``backend`` serving it), attempts and silence limit of a request."""
        return {"timeout": self.settings.request_timeout(backend), "attempts": self.settings.request_attempts,
                "liveness": self.settings.request_liveness_seconds}

    async def call(self, subject: str, message, response_type, *, backend: str, step: str):
        """A request to the agents or observers; the deadline fits the ``backend`` serving it.
        A failure is a StepError naming ``step``, the subject and the backend."""
        return await _step(step, f"{subject}, backend {backend or 'default'}",
                           nats_client.request(self.nc, subject, message, response_type, **self._limits(backend)))

    async def call_many(self, subject: str, messages: Sequence[Any], response_type, *, backend: str,
                        step: str) -> list[Any]:
        """Requests to one method, answered each on its own: one result per message, in order, a failed one
        as the StepError naming ``step`` that ``call`` would have raised. One NATS batch
        (``nats_client.request_batch``) unless ``settings.batch_requests`` is off; a failure of the batch as a whole
        (no replica, the deadline) is raised as a StepError."""
        target = f"{subject}, backend {backend or 'default'}"
        if not self.settings.batch_requests:
            results = await asyncio.gather(
                *(self.call(subject, m, response_type, backend=backend, step=step) for m in messages),
                return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result  # cancelled
            return list(results)
        results = await _step(step, target, nats_client.request_batch(self.nc, subject, messages, response_type,
                                                              **self._limits(backend)))
        return [StepError(step, target, r) if isinstance(r, Exception) else r for r in results]


@dataclass
class InteractionProgress:
    """The replies of the steps of one interaction (world, round, agent) that have completed, by step.

    Kept by the scheduler across its retries of the interaction, so that a retry resumes from the step
    that failed. Every step is idempotent for its key (a handler gives the same reply to the same
    request, and a re-sent request joins the work in flight: ``RequestServer``), so reusing a reply
    is what asking again would give, without the second model call.
    """

    results: dict[str, Any] = field(default_factory=dict)

    async def step(self, key: str, make: Callable[[], Awaitable[T]]) -> T:
        """The reply of step ``key``: the one already received, else ``await make()`` (kept on success)."""
        if key in self.results:
            return self.results[key]
        result = await make()
        self.results[key] = result
        return result

    async def step_many(self, keys: Sequence[str], make: Callable[[list[int]], Awaitable[list[Any]]]) -> list[Any]:
        """The replies of steps ``keys``: those already received, the others from ``make(indices of the missing
        ones)`` (asked together: one result per index, an Exception for a step that failed). The replies that
        came are kept even when another failed, whose error is then raised: the next attempt asks only for it."""
        missing = [i for i, key in enumerate(keys) if key not in self.results]
        if missing:
            failure: Exception | None = None
            for i, result in zip(missing, await make(missing)):
                if isinstance(result, Exception):
                    failure = failure or result
                else:
                    self.results[keys[i]] = result
            if failure is not None:
                raise failure
        return [self.results[key] for key in keys]

    def forget(self) -> None:
        """Drops every reply: the next attempt starts over (replies that together broke the record's checks)."""
        self.results.clear()


@dataclass
class _Interaction:
    """The steps of one interaction, each asked through ``progress`` (an earlier attempt's reply is reused)
    and timed into ``latency``, which becomes the record's ``latency_seconds``."""

    deps: InteractionDeps
    spec: world_pb2.WorldSpec
    round_: int
    agent: int
    question: str
    progress: InteractionProgress
    latency: dict[str, float] = field(default_factory=dict)

    async def embed(self, precomputed: Sequence[float] | np.ndarray | None) -> list[float]:
        """The question's vector: the one computed before the round (~0 s here), else the embedder's."""
        embedder = self.deps.embedder
        with timed(self.latency, "embed"):
            if precomputed is not None:
                return np.asarray(precomputed, dtype=np.float32).tolist()
            embedded = await self.progress.step("embed", lambda: _step("embed", f"embedder {embedder.name}",
                                                                      embedder.embed([self.question])))
            return np.asarray(embedded, dtype=np.float32)[0].tolist()

    async def draft(self, embedding: list[float]) -> agent_pb2.DraftResponse:
        request = agent_pb2.DraftRequest(world_id=self.spec.world_id, agent_id=self.agent, round=self.round_,
                                         question=self.question, question_embedding=embedding)
        with timed(self.latency, "draft"):
            return await self.progress.step("draft", lambda: self.deps.call(
                subjects.AGENT_DRAFT, request, agent_pb2.DraftResponse, backend=self.spec.agent_model.backend,
                step="draft"))

    async def _rate_both(self, answer: str, stage: str) -> list[observer_pb2.RateResponse]:
        """Alignment and engagement of ``answer``: one request to the observers (a batch of two)."""
        aspects = (ALIGNMENT, ENGAGEMENT)
        requests = [observer_pb2.RateRequest(world_id=self.spec.world_id, agent_id=self.agent, round=self.round_,
                                             question=self.question, answer=answer, aspect=aspect, stage=stage)
                    for aspect in aspects]
        return await self.progress.step_many(
            [f"rate_{stage}.{aspect}" for aspect in aspects],
            lambda missing: self.deps.call_many(subjects.OBSERVER_RATE, [requests[i] for i in missing],
                                                observer_pb2.RateResponse, backend=self.spec.observer_model.backend,
                                                step=f"rate_{stage}"))

    async def feedback_and_rate_before(self, draft: agent_pb2.DraftResponse, partners: Sequence[int]
                                       ) -> tuple[list[observer_pb2.RateResponse], list[agent_pb2.FeedbackResponse]]:
        """The partners' feedback on the draft and the draft's two ratings, at once (the ratings need only
        the draft)."""
        requests = [agent_pb2.FeedbackRequest(world_id=self.spec.world_id, agent_id=p, round=self.round_,
                                              question=self.question, answer=draft.answer, author_id=self.agent)
                    for p in partners]
        before: dict[str, float] = {}

        async def rate_before() -> list[observer_pb2.RateResponse]:
            with timed(before, "rate_before"):
                return await self._rate_both(draft.answer, "before")

        with timed(self.latency, "feedback"):
            ratings, replies = await asyncio.gather(rate_before(), self.progress.step_many(
                [f"feedback.{i}.{p}" for i, p in enumerate(partners)],
                lambda missing: self.deps.call_many(subjects.AGENT_FEEDBACK, [requests[i] for i in missing],
                                                    agent_pb2.FeedbackResponse, backend=self.spec.agent_model.backend,
                                                    step="feedback")))
        self.latency.update(before)
        return ratings, replies

    async def revise(self, draft: agent_pb2.DraftResponse, feedback: list[common_pb2.Feedback]
                     ) -> agent_pb2.ReviseResponse:
        request = agent_pb2.ReviseRequest(world_id=self.spec.world_id, agent_id=self.agent, round=self.round_,
                                          question=self.question, draft_answer=draft.answer, feedback=feedback)
        with timed(self.latency, "revise"):
            return await self.progress.step("revise", lambda: self.deps.call(
                subjects.AGENT_REVISE, request, agent_pb2.ReviseResponse, backend=self.spec.agent_model.backend,
                step="revise"))

    async def rate_after(self, revised: agent_pb2.ReviseResponse) -> list[observer_pb2.RateResponse]:
        with timed(self.latency, "rate_after"):
            return await self._rate_both(revised.answer, "after")


def _feedback(partners: Sequence[int], replies: Sequence[agent_pb2.FeedbackResponse]) -> list[common_pb2.Feedback]:
    feedback = []
    for partner, reply in zip(partners, replies):
        fb = common_pb2.Feedback()
        fb.CopyFrom(reply.feedback)
        fb.partner_id = partner  # the requester knows who it asked, whatever the reply says
        feedback.append(fb)
    return feedback


def _record(run: _Interaction, draft: agent_pb2.DraftResponse, feedback: list[common_pb2.Feedback],
            feedback_replies: Sequence[agent_pb2.FeedbackResponse], revised: agent_pb2.ReviseResponse,
            before: Sequence[observer_pb2.RateResponse], after: Sequence[observer_pb2.RateResponse]
            ) -> common_pb2.InteractionRecord:
    """The record of the interaction (without its latencies and time), tokens summed over every reply."""
    (align_before, engage_before), (align_after, engage_after) = before, after
    stats = [draft.stats, revised.stats, align_before.stats, engage_before.stats, align_after.stats,
             engage_after.stats, *(r.stats for r in feedback_replies)]
    spec = run.spec
    return common_pb2.InteractionRecord(
        world_id=spec.world_id, round=run.round_, agent_id=run.agent, label=spec.labels[run.agent],
        question=run.question, draft_answer=draft.answer, feedback=feedback, revised_answer=revised.answer,
        alignment_before=align_before.rating, alignment_after=align_after.rating,
        engagement_before=engage_before.rating, engagement_after=engage_after.rating,
        agent_model=spec.agent_model, observer_model=spec.observer_model, memories=draft.memories,
        prompt_tokens=sum(s.prompt_tokens for s in stats), completion_tokens=sum(s.completion_tokens for s in stats),
    )


def _memory(run: _Interaction, revised: agent_pb2.ReviseResponse, embedding: list[float]) -> common_pb2.MemoryBatch:
    """The revision as the agent's new memory."""
    return common_pb2.MemoryBatch(entries=[common_pb2.MemoryEntry(
        question=run.question, answer=revised.answer, question_embedding=embedding, source="revised",
        round=run.round_)])


async def run_interaction(
    deps: InteractionDeps,
    spec: world_pb2.WorldSpec,
    round_: int,
    agent: int,
    question: str,
    partners: Sequence[int],
    question_embedding: Sequence[float] | np.ndarray | None = None,
    progress: InteractionProgress | None = None,
) -> common_pb2.InteractionRecord:
    """Runs the interaction, appends the revision to memory, publishes the record, returns it.

    ``question_embedding``: the question's vector computed before the round (the draft request carries
    it, so the agent embeds nothing); None embeds it here first, one more round trip on the path.
    ``progress``: the replies an earlier attempt of this interaction received (reused, not asked again);
    this attempt's replies are added to it."""
    progress = progress if progress is not None else InteractionProgress()
    run = _Interaction(deps, spec, round_, agent, question, progress)
    with timed(run.latency, "total"):
        embedding = await run.embed(question_embedding)
        draft = await run.draft(embedding)
        before, feedback_replies = await run.feedback_and_rate_before(draft, partners)
        feedback = _feedback(partners, feedback_replies)
        revised = await run.revise(draft, feedback)
        after = await run.rate_after(revised)
        record = _record(run, draft, feedback, feedback_replies, revised, before, after)
        memory = _memory(run, revised, embedding)
    for key, value in run.latency.items():
        record.latency_seconds[key] = value
    record.created_at = time.time()
    try:
        await _step("check", "agent and observer replies", _checked(record))
    except StepError:
        progress.forget()  # a reply broke the record's checks: the next attempt asks every step again
        raise
    await _step("persist", "JetStream", _persist(deps, record, memory))
    return record


async def _checked(record: common_pb2.InteractionRecord) -> None:
    """Ratings from other services' replies are checked before they become a record (1..7, finite expected
    values, P(1..7) summing to 1): a reply that breaks them is a faulty dependency, retried within the
    world's error budget like a failing backend, never published and never trained on."""
    try:
        check_record(record)
    except ValidationError as exc:
        raise BackendError(f"invalid rating in a reply: {exc}") from None


_PERSIST_RETRYABLE = (TimeoutError, nats.errors.Error, UnavailableError)


async def _persist(deps: InteractionDeps, record: common_pb2.InteractionRecord,
                   memory: common_pb2.MemoryBatch, attempts: int = 5) -> None:
    """Appends the revision to memory, then publishes the record; retries these writes on their own.

    Both carry message ids, so a retry never duplicates. Retrying here rather than redoing the whole
    interaction keeps the memory and the record holding the same revision even with a sampling
    (non-deterministic) model.
    """
    world_id, round_, agent = record.world_id, record.round, record.agent_id

    async def write(_attempt: int) -> None:
        await append_memory(deps.js, world_id, agent, memory, revision_msg_id(world_id, round_, agent))
        await deps.js.publish(
            subjects.RECORDS_SUBJECT.format(world_id=world_id),
            record.SerializeToString(),
            headers={subjects.MSG_ID_HEADER: record_msg_id(world_id, round_, agent)},
        )

    # Waits 0.2, 0.4, 0.8, 1.6 s (no jitter); the last error is raised as it is.
    policy = RetryPolicy(attempts=attempts, base_delay=0.2, max_delay=2.0, timeout=None, jitter="none")
    await retry_async(write, policy, retryable=lambda exc: isinstance(exc, _PERSIST_RETRYABLE))
