"""Runs one world: prior setup, then rounds of concurrent interactions, with progress in KV.

A round gives every agent one interaction, all in flight at once up to the spec's concurrency;
round r+1 starts only after every record of round r is published, because an agent's draft in
r+1 must see the revision it wrote in r. After each round a RoundSummary and the progress go to
the World in SANDBOX_WORLDS, which is what a restarted replica resumes from: the records already
in the stream say which (round, agent) pairs are done, and the rest are (re)run — idempotent by
message id, so an interaction cut off between its memory append and its record is simply redone.
The same path resumes a FAILED or CANCELLED world (manager.resume). A failing interaction is tried
again while the world's failure budget lasts (budget.py: missing replicas, failing LLMs), resuming
from the step that failed (the replies of the steps before it are kept: interaction.InteractionProgress);
what the world waits for meanwhile is in World.waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

import numpy as np
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.world import grid, metrics
from services.world.budget import FailureBudget, reason
from services.world.interaction import InteractionDeps, InteractionProgress, run_interaction
from services.world.prior import prepare_questions, seed_prior
from services.world.settings import WorldSettings
from services.world.spec import confined_files
from services.world.store import LeaseLostError, WorldStore
from stablealign.core.errors import StableAlignError
from stablealign.core.logs import get_logger
from stablealign.core.retry import Failure, RetryPolicy, retry_async
from stablealign.core.timing import timed
from stablealign.sandbox import data
from stablealign.sandbox.record_stream import TrustedRecords, read_trusted
from stablealign.v1 import common_pb2, world_pb2

log = get_logger(__name__)

CANCELLED = world_pb2.WORLD_STATE_CANCELLED


class InteractionFailedError(StableAlignError):
    """An interaction failed for good: a final error, or the world's failure budget is spent (budget.py)."""


RATING_FIELDS = ("alignment_before", "alignment_after", "engagement_before", "engagement_after")
Scores = tuple  # (alignment_before, alignment_after, engagement_before, engagement_after), each int | None


def scores_of(record: common_pb2.InteractionRecord) -> Scores:
    """The four observer ratings of a record; all a round summary needs (records are not kept)."""
    return tuple(
        getattr(record, f).score if getattr(record, f).HasField("score") else None for f in RATING_FIELDS
    )


class QuestionVectors:
    """The embeddings of a round's questions, computed before the round starts.

    A round's questions are known in advance (``grid.pick_question`` over the world's pool), so their
    distinct texts are embedded in batches (``embed_cached``: one request per 256 questions for a remote
    embedder, the on-disk cache for MiniLM) and every draft request carries its question's vector: the
    interaction's critical path holds only the LLM calls. Memory stays bounded: only the vectors of the
    round being prepared and of the one running are held (at most the pool's distinct questions each).
    A failing embedder is not fatal here: the round then runs without vectors and each interaction
    embeds its own question (a step retried within the world's failure budget).
    """

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}

    async def prepare(self, questions: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(questions))
        missing = [q for q in wanted if q not in self._vectors]
        if missing:
            from stablealign.llm.backends.embeddings import embed_cached

            try:
                rows = np.asarray(await embed_cached(self.embedder, missing), dtype=np.float32)
            except Exception as exc:  # noqa: BLE001 - the interactions embed their own questions instead
                log.warning("world.question_embeddings_failed", extra={"questions": len(missing),
                                                                       "error": _reason(exc)})
                return {}
            self._vectors.update(zip(missing, rows))
        ready = {q: self._vectors[q] for q in wanted}
        self._vectors = dict(ready)  # forget the questions of older rounds
        return ready


def round_questions(spec: world_pb2.WorldSpec, pool: Sequence[str], round_: int,
                    agents: Sequence[int]) -> list[str]:
    """The distinct questions ``agents`` answer in ``round_`` (first-use order)."""
    return list(dict.fromkeys(grid.pick_question(pool, seed=spec.seed, round_=round_, agent=a) for a in agents))


def summarize(round_: int, scores: Sequence[Scores], duration: float) -> world_pb2.RoundSummary:
    """Population means over the ratings that are present (unset when none is); absent ones are counted."""
    summary = world_pb2.RoundSummary(
        round=round_,
        interactions=len(scores),
        missing_ratings=sum(1 for s in scores for x in s if x is None),
        duration_seconds=duration,
    )
    names = ("mean_alignment_before", "mean_alignment_after", "mean_engagement_before", "mean_engagement_after")
    for i, name in enumerate(names):
        present = [s[i] for s in scores if s[i] is not None]
        if present:
            setattr(summary, name, float(np.mean(present)))
    return summary


async def published_scores(js: JetStreamContext, world_id: str, *, size: int | None = None,
                           rounds: int | None = None) -> dict[int, dict[int, Scores]]:
    """What the stream already holds for a world, by round then agent: trusted records only
    (``stablealign.sandbox.record_stream``: the world's message id, inside its grid and rounds, valid, once),
    so a forged or broken message neither fails the world nor makes resume skip an agent's real work.
    Streams the records: only their scores are kept."""
    out: dict[int, dict[int, Scores]] = {}
    trusted = TrustedRecords(world_id, size=size, rounds=rounds)
    async for record in read_trusted(js, trusted):
        out.setdefault(record.round, {})[record.agent_id] = scores_of(record)
    if trusted.stats.skipped_total:
        log.warning("world.records_skipped", extra={"world_id": world_id, "summary": trusted.stats.summary()})
    return out


class WorldRunner:
    """The leader's loop for one world. ``task`` runs :meth:`run`; see :meth:`cancel` and :meth:`shutdown`."""

    def __init__(
        self,
        world: world_pb2.World,
        *,
        nc: NATS,
        js: JetStreamContext,
        store: WorldStore,
        settings: WorldSettings,
    ) -> None:
        self.world = world
        self.spec = world.spec
        self.world_id = world.spec.world_id
        self.nc, self.js, self.store, self.settings = nc, js, store, settings
        self.owner = settings.owner
        self.published = int(world.records_published)
        self.budget = FailureBudget(min_attempts=settings.interaction_attempts,
                                    absent_seconds=settings.absent_budget_seconds,
                                    errors_in_a_row=settings.error_budget_consecutive,
                                    halted=lambda: self.halted)
        self._retries_written = 0  # of budget.retries, how many World.interaction_retries holds already
        self._cancel = asyncio.Event()  # the user cancelled: finish in-flight work, then CANCELLED
        self._stopping = asyncio.Event()  # this replica stops: finish in-flight work, leave the world RUNNING
        self.task: asyncio.Task | None = None

    # --- control --------------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self.run(), name=f"world-{self.world_id}")
        return self.task

    def cancel(self) -> None:
        """Stops scheduling new interactions; in-flight ones finish; the world ends CANCELLED."""
        self._cancel.set()

    async def shutdown(self, grace: float) -> None:
        """This replica stops: no new interactions, ``grace`` seconds for in-flight ones, then
        the lease is released so that another replica resumes the world at once."""
        self._stopping.set()
        if self.task and not self.task.done():
            await asyncio.wait({self.task}, timeout=grace)
            if not self.task.done():
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task
        with contextlib.suppress(Exception):
            await self.store.update(self.world_id, self._release)

    def _release(self, world: world_pb2.World) -> None:
        if world.owner != self.owner:
            raise LeaseLostError(f"world {self.world_id} is owned by {world.owner}")
        world.owner = ""  # no owner: any replica may take it over at once, without waiting for the lease
        world.records_published = max(world.records_published, self.published)

    @property
    def halted(self) -> bool:
        return self._cancel.is_set() or self._stopping.is_set()

    # --- KV writes ----------------------------------------------------------------------------

    def _own(self, world: world_pb2.World) -> None:
        """Common part of every write: still ours? cancelled by someone else? progress."""
        if world.owner != self.owner:
            raise LeaseLostError(f"world {self.world_id} is owned by {world.owner or 'nobody'} now")
        if world.state == CANCELLED:
            self._cancel.set()
        world.records_published = max(world.records_published, self.published)
        world.waiting = self.budget.waiting

    async def _write(self, mutate=None) -> world_pb2.World:
        # Retries not in KV yet, taken before the write so that concurrent writes never add the same ones.
        new_retries = self.budget.retries - self._retries_written
        self._retries_written += new_retries

        def apply(world: world_pb2.World) -> None:
            self._own(world)
            world.interaction_retries += new_retries
            if mutate:
                mutate(world)

        try:
            self.world = await self.store.update(self.world_id, apply)
        except BaseException:
            self._retries_written -= new_retries  # not written: the next write carries them
            raise
        return self.world

    async def _heartbeat(self) -> None:
        """Writes the lease heartbeat, and progress (records_published, and what the world waits for)
        when it moved, so that GetWorld shows a live count without a KV write per record."""
        beat = self.settings.heartbeat_interval
        tick = min(beat, self.settings.progress_seconds) if self.settings.progress_seconds > 0 else beat
        last_beat, last_published, last_waiting = time.monotonic(), self.published, ""
        while True:
            await asyncio.sleep(tick)
            if (time.monotonic() - last_beat < beat and self.published == last_published
                    and self.budget.waiting == last_waiting):
                continue
            try:
                last_published, last_waiting = self.published, self.budget.waiting
                await self._write()
                last_beat = time.monotonic()
            except LeaseLostError:
                log.warning("world.lease_lost", extra={"world_id": self.world_id, "owner": self.owner})
                if self.task:
                    self.task.cancel()
                return
            except Exception as exc:  # noqa: BLE001 - NATS hiccup: try again next beat
                log.warning("world.heartbeat_failed", extra={"world_id": self.world_id, "error": repr(exc)})

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        metrics.WORLDS_RUNNING.inc()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._run()
        except LeaseLostError:
            log.warning("world.lease_lost", extra={"world_id": self.world_id, "owner": self.owner})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the world goes FAILED with the reason, never silently
            # A failure the world names (its budget spent, a refused request) is one line; only an
            # unexpected error carries its traceback, for the developer who has to fix it.
            known = isinstance(exc, StableAlignError)
            message = str(exc) if known else f"{type(exc).__name__}: {exc}"
            log.error("world.failed", extra={"world_id": self.world_id, "error": message}, exc_info=not known)
            with contextlib.suppress(Exception):
                await self._write(lambda w: _finish(w, world_pb2.WORLD_STATE_FAILED, message))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            metrics.WORLDS_RUNNING.dec()
            metrics.forget_world(self.world_id)  # per-world series live only while the world runs here

    @property
    def expected_records(self) -> int:
        return self.spec.size * self.spec.size * self.spec.rounds

    async def _questions_ready(self, warm_first_round: bool) -> tuple[Sequence[str], InteractionDeps, QuestionVectors]:
        """The world's question pool, the interactions' dependencies and the question vectors; with
        ``warm_first_round`` also the vectors of the first round to run (for every agent)."""
        spec = self.spec
        pool = await asyncio.to_thread(data.load_questions, spec.questions_path or None)
        from stablealign.llm.backends import get_embedder

        deps = InteractionDeps(self.nc, self.js, self.settings, get_embedder(spec.embedding_model))
        await prepare_questions(deps.embedder, spec, pool)  # the world's questions, from the on-disk cache
        vectors = QuestionVectors(deps.embedder)
        if warm_first_round:
            first, agents = self.world.completed_rounds, range(spec.size * spec.size)
            await vectors.prepare(await asyncio.to_thread(round_questions, spec, pool, first, agents))
        return pool, deps, vectors

    async def _run(self) -> None:
        # The stored spec's files, confined again and resolved: what is opened below is the checked path.
        spec = self.spec = confined_files(self.spec, self.settings)
        done, pool, deps, vectors = await self._start(spec)
        await self._rounds(spec, done, pool, deps, vectors)
        if self._stopping.is_set() and not self._cancel.is_set():
            return  # this replica stops; the world stays RUNNING for the next owner
        if self._cancel.is_set():
            await self._write(lambda w: _finish(w, CANCELLED, w.error))
            log.info("world.cancelled", extra={"world_id": self.world_id, "published": self.published})
        else:
            await self._write(lambda w: _finish(w, world_pb2.WORLD_STATE_COMPLETED, ""))
            log.info("world.completed", extra={"world_id": self.world_id, "published": self.published})

    async def _start(self, spec: world_pb2.WorldSpec) -> tuple[dict[int, dict], Sequence[str], InteractionDeps,
                                                                QuestionVectors]:
        """A new world's prior seeded (and its state RUNNING); then, new or resumed, what is published
        already (by round), the question pool, the interactions' dependencies and the question vectors."""
        questions: asyncio.Task | None = None
        if self.world.state == world_pb2.WORLD_STATE_PENDING:
            from stablealign.llm.backends import get_embedder

            if getattr(get_embedder(spec.embedding_model), "embed_cached", None) is None:
                # A remote embedder: the first round's questions are embedded while the prior is seeded
                # (one round trip less before the first draft). An in-process model (MiniLM) would only
                # contend with the prior's embedding for the same cores, so it waits its turn.
                questions = asyncio.create_task(self._questions_ready(warm_first_round=True))
        try:
            if self.world.state == world_pb2.WORLD_STATE_PENDING:
                await self._seed(spec)
            done = await published_scores(self.js, self.world_id, size=spec.size, rounds=spec.rounds)
            self.published = sum(len(v) for v in done.values())
            metrics.set_world_progress(self.world_id, self.published, self.expected_records)
            pool, deps, vectors = await (questions if questions is not None else self._questions_ready(False))
        except BaseException:
            if questions is not None:  # cancelled, or its own error retrieved (no "never retrieved" warning)
                questions.cancel()
                with contextlib.suppress(BaseException):
                    await questions
            raise
        return done, pool, deps, vectors

    async def _seed(self, spec: world_pb2.WorldSpec) -> None:
        """The prior's memories published; the world RUNNING (unless cancelled meanwhile)."""
        seconds = await seed_prior(self.js, spec, chunk=self.settings.prior_publish_chunk)
        metrics.SETUP_SECONDS.observe(seconds)

        def started(world: world_pb2.World) -> None:
            if world.state != CANCELLED:
                world.state = world_pb2.WORLD_STATE_RUNNING
            world.setup_seconds = seconds

        await self._write(started)

    async def _rounds(self, spec: world_pb2.WorldSpec, done: dict[int, dict], pool: Sequence[str],
                      deps: InteractionDeps, vectors: QuestionVectors) -> None:
        """The rounds not completed yet, one after the other, until the last or a halt."""

        async def prepared(round_: int, skip: dict) -> dict[str, np.ndarray]:
            agents = [a for a in range(spec.size * spec.size) if a not in skip]
            return await vectors.prepare(await asyncio.to_thread(round_questions, spec, pool, round_, agents))

        first = self.world.completed_rounds
        upcoming = asyncio.create_task(prepared(first, done.get(first, {}))) if first < spec.rounds else None
        log.info("world.running", extra={"world_id": self.world_id, "owner": self.owner,
                                         "from_round": self.world.completed_rounds, "published": self.published})
        try:
            for round_ in range(self.world.completed_rounds, spec.rounds):
                if self.halted:
                    break
                round_vectors = await upcoming
                # The next round's question vectors are computed while this round runs.
                upcoming = (asyncio.create_task(prepared(round_ + 1, done.get(round_ + 1, {})))
                            if round_ + 1 < spec.rounds else None)
                took: dict[str, float] = {}
                with timed(took, "round"):
                    scores = await self._run_round(deps, pool, round_, done.pop(round_, {}), round_vectors)
                if scores is None:
                    break
                await self._round_done(round_, scores, took["round"])
        finally:
            if upcoming is not None:
                upcoming.cancel()

    async def _round_done(self, round_: int, scores: list[Scores], duration: float) -> None:
        """The round's summary written to the world, its metrics set and its log line."""
        summary = summarize(round_, scores, duration)

        def completed_round(world: world_pb2.World) -> None:
            if world.completed_rounds <= round_:
                world.rounds.append(summary)
                world.completed_rounds = round_ + 1

        await self._write(completed_round)
        metrics.ROUND_SECONDS.observe(duration)
        metrics.ROUNDS_COMPLETED.inc()
        if summary.HasField("mean_alignment_before"):
            metrics.ALIGNMENT_SCORE.labels("before").set(summary.mean_alignment_before)
        if summary.HasField("mean_alignment_after"):
            metrics.ALIGNMENT_SCORE.labels("after").set(summary.mean_alignment_after)
        log.info(
            "world.round_done",
            extra={
                "world_id": self.world_id,
                "round": round_,
                "seconds": round(duration, 3),
                "alignment_before": round(summary.mean_alignment_before, 3)
                if summary.HasField("mean_alignment_before") else None,
                "alignment_after": round(summary.mean_alignment_after, 3)
                if summary.HasField("mean_alignment_after") else None,
                "missing": summary.missing_ratings,
            },
        )

    async def _run_round(
        self, deps: InteractionDeps, pool: Sequence[str], round_: int, done: dict[int, Scores],
        vectors: dict[str, np.ndarray] | None = None,
    ) -> list[Scores] | None:
        """Every agent's interaction of a round; None when halted before all were published.

        A fixed pool of workers (the round's concurrency) pulls agent ids from one iterator, so
        a round of a million agents holds ``concurrency`` coroutines, not a million. The first
        interaction that fails for good stops the others from taking new work.
        """
        n = self.spec.size * self.spec.size
        scores: dict[int, Scores] = dict(done)
        todo = [a for a in range(n) if a not in done]
        limit = self.spec.concurrency or n
        if self.settings.max_interaction_concurrency:
            limit = min(limit, self.settings.max_interaction_concurrency)
        pending = iter(todo)
        failed = asyncio.Event()

        async def worker() -> None:
            for agent in pending:
                if self.halted or failed.is_set():
                    return
                try:
                    record = await self._interact(deps, pool, round_, agent, vectors or {})
                except InteractionFailedError:
                    if self.halted:  # cancelled or stopping: the round is left unfinished, not failed
                        return
                    failed.set()
                    raise
                scores[agent] = scores_of(record)
                self.published += 1
                metrics.set_world_progress(self.world_id, self.published, self.expected_records)

        results = await asyncio.gather(
            *(worker() for _ in range(max(1, min(limit, len(todo))))), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        if len(scores) < n:
            return None
        return [scores[a] for a in range(n)]

    async def _interact(
        self, deps: InteractionDeps, pool: Sequence[str], round_: int, agent: int,
        vectors: dict[str, np.ndarray] | None = None,
    ) -> common_pb2.InteractionRecord:
        """One interaction, retried from the step that failed; raises InteractionFailedError after the last try."""
        spec = self.spec
        question = grid.pick_question(pool, seed=spec.seed, round_=round_, agent=agent)
        partners = grid.sample_partners(  # O(1): the neighbourhood is never listed
            agent,
            spec.size,
            spec.radius,
            partners=spec.partners,
            seed=spec.seed,
            round_=round_,
            global_probability=spec.global_partner_probability,
        )

        # The replies of the steps that completed, across this interaction's attempts: a retry resumes
        # from the step that failed instead of asking the models again (interaction.InteractionProgress).
        progress = InteractionProgress()

        async def once(_attempt: int) -> tuple[common_pb2.InteractionRecord, float]:
            took: dict[str, float] = {}
            with timed(took, "interaction"):
                record = await run_interaction(deps, spec, round_, agent, question, partners,
                                               (vectors or {}).get(question), progress=progress)
            return record, took["interaction"]

        streak = self.budget.streak()

        def on_failure(failure: Failure) -> None:
            metrics.INTERACTIONS.labels("retry").inc()
            metrics.FAILURE_WAITS.labels(getattr(failure.error, "step", "other"), streak.kind).inc()
            log.warning(
                "world.interaction_retry",
                extra={
                    "world_id": self.world_id,
                    "round": round_,
                    "agent_id": agent,
                    "attempt": failure.attempt,
                    "kind": streak.kind,
                    "delay_s": round(failure.delay or 0.0, 3),
                    "error": _reason(failure.error),
                    "steps_kept": len(progress.results),
                },
            )

        # Retried from its failed step (cancellation never is) while the world's failure budget lasts (budget.py),
        # with capped full-jitter backoff; then the world fails loudly. The policy's attempts never run out.
        policy = RetryPolicy(attempts=sys.maxsize, base_delay=0.25, max_delay=self.settings.failure_backoff_max_seconds,
                             timeout=None, jitter="full")
        try:
            record, seconds = await retry_async(once, policy, retryable=streak.allows, on_failure=on_failure)
        except Exception as exc:  # noqa: BLE001 - the budget is spent or the error is final
            if not self.halted:
                metrics.INTERACTIONS.labels("failed").inc()
            raise InteractionFailedError(
                f"round {round_} agent {agent}: interaction failed after {streak.attempts} attempts: "
                f"{_reason(exc)} [{streak.kind}: {streak.verdict}]"
            ) from exc
        self.budget.succeeded()
        metrics.INTERACTIONS.labels("published").inc()
        metrics.INTERACTION_SECONDS.observe(seconds)
        return record


_reason = reason  # an interaction's error for a log line or a world's error


def _finish(world: world_pb2.World, state: int, error: str) -> None:
    """Final state; a CANCELLED world stays CANCELLED (the user's word wins over completion)."""
    world.waiting = ""
    if world.state == CANCELLED and state != world_pb2.WORLD_STATE_FAILED:
        return
    world.state = state
    world.error = error
