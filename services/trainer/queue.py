"""The job queue and scheduler: validation, bounded parallelism per runner, cancel, recovery, drain.

Every state change goes through the ``JobStore`` (KV) first, so what a client reads is what a
restarted service will find. Each runner has its own FIFO queue and workers
(``max_parallel_jobs`` local processes, ``max_parallel_k8s_jobs`` Kubernetes watchers).

Lifecycle of a job: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. On a graceful stop the
local processes are stopped and their jobs go back to QUEUED (the next start runs them again and
the trainer resumes from the last checkpoint in the output directory); Kubernetes jobs keep
running in the cluster and are re-attached on start. After a crash, jobs RUNNING under a local
process that died with the service are marked FAILED ("trainer restarted").

A FAILED or CANCELLED job submitted again with the same spec (same id) is queued again: it runs in
its own output directory, so the training resumes from that job's last checkpoint. This is how a
broken job continues; a new job cannot name another job's directory (``services.trainer.inputs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping

from prometheus_client import Counter, Gauge, Histogram

from services.trainer.inputs import check_image
from services.trainer.jobs import JobStore, check_job_id, follow_logs, is_terminal, new_job_id, state_name
from services.trainer.runners import Runner, RunResult
from services.trainer.runners.local import kill_orphan
from services.trainer.settings import TrainerSettings
from stablealign.core.errors import ConflictError, NotFoundError, StableAlignError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.v1 import trainer_pb2

log = get_logger(__name__)

JOBS_SUBMITTED = Counter("stablealign_trainer_jobs_submitted_total", "Training jobs accepted, by runner.",
                         ["runner"])
JOBS_FINISHED = Counter("stablealign_trainer_jobs_finished_total",
                        "Training jobs ended, by runner and final state (succeeded|failed|cancelled).",
                        ["runner", "state"])
JOBS_RUNNING = Gauge("stablealign_trainer_jobs_running", "Training jobs running now, by runner.", ["runner"])
JOBS_QUEUED = Gauge("stablealign_trainer_jobs_queued", "Training jobs waiting for a slot, by runner.", ["runner"])
JOB_SECONDS = Histogram("stablealign_trainer_job_duration_seconds", "Wall time of one training job, start to end.",
                        ["runner"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200))
JOB_LOG_LINES = Counter("stablealign_trainer_job_log_lines_total", "Job log lines stored, by runner.", ["runner"])

REQUEUED_MESSAGE = "requeued: the trainer service stopped; the job runs again (resuming its checkpoint) on start"
RESUBMITTED_MESSAGE = "resubmitted: the job runs again, resuming from the last checkpoint in its output directory"
# States a job may be submitted again from (a SUCCEEDED job is returned as it is: its retried request).
RESUBMITTABLE = frozenset({trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED})


class Reporter:
    """What a runner reports, written to the store: log lines at once, metrics at most once a second."""

    def __init__(self, store: JobStore, job_id: str, runner: str, last_log_time: float = 0.0) -> None:
        self.store = store
        self.job_id = job_id
        self.runner = runner
        self.last_log_time = last_log_time
        self._metrics: dict[str, float] = {}
        self._flushed = 0.0

    async def log(self, line: str, at: float | None = None) -> None:
        await self.store.append_log(self.job_id, line, at)
        JOB_LOG_LINES.labels(self.runner).inc()

    async def metrics(self, values: Mapping[str, float]) -> None:
        self._metrics.update(values)
        if time.monotonic() - self._flushed >= 1.0:
            await self.flush()

    async def flush(self) -> None:
        if self._metrics:
            values, self._metrics = self._metrics, {}
            await self.store.update(self.job_id, metrics=values)
        self._flushed = time.monotonic()

    async def handle(self, handle: str) -> None:
        await self.store.update(self.job_id, handle=handle)

    async def note(self, message: str) -> None:
        await self.store.update(self.job_id, message=message)


class Scheduler:
    """Owns the queues and the running jobs of one trainer service process."""

    def __init__(self, store: JobStore, runners: Mapping[str, Runner], settings: TrainerSettings) -> None:
        self.store = store
        self.runners = dict(runners)
        self.settings = settings
        self._queues: dict[str, asyncio.Queue[tuple[str, bool]]] = {name: asyncio.Queue() for name in self.runners}
        self._workers: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}
        self._cancelling: set[str] = set()
        self._stopping = False

    # --- requests --------------------------------------------------------------------------------

    async def submit(self, spec: trainer_pb2.JobSpec) -> trainer_pb2.Job:
        """Validates and queues a job; re-submitting the same spec under the same id returns the job."""
        if self._stopping:
            raise StableAlignError("the trainer service is shutting down")
        spec = trainer_pb2.JobSpec.FromString(spec.SerializeToString())
        spec.runner = spec.runner or self.settings.runner
        if spec.runner not in self.runners:
            raise ValidationError(f"unknown runner {spec.runner!r}; this trainer runs: {sorted(self.runners)}")
        if spec.job_id:
            check_job_id(spec.job_id)
            with contextlib.suppress(NotFoundError):
                existing = await self.store.get(spec.job_id)
                if self._same_request(existing.spec, spec):
                    if existing.state in RESUBMITTABLE:
                        return await self._resubmit(spec.job_id)
                    return existing  # a retried request (e.g. the NATS reply was lost)
                raise ConflictError(f"job {spec.job_id} exists already with another spec")
        else:
            spec.job_id = new_job_id()
        check_image(spec, self.settings)  # only allowed images, whatever the runner
        spec = self.runners[spec.runner].prepare(spec)
        job = trainer_pb2.Job(spec=spec, state=trainer_pb2.JOB_STATE_QUEUED, created_at=time.time(),
                              message="queued")
        await self.store.create(job)
        JOBS_SUBMITTED.labels(spec.runner).inc()
        log.info("job.submitted", extra={"job_id": spec.job_id, "runner": spec.runner, "model": spec.model,
                                         "data": spec.data, "out": spec.output_dir})
        await self.store.append_log(spec.job_id, f"job {spec.job_id} queued on runner {spec.runner}")
        self._enqueue(spec.job_id, spec.runner)
        return job

    async def _resubmit(self, job_id: str) -> trainer_pb2.Job:
        """Queues a FAILED or CANCELLED job again (its output directory, and so its checkpoints, unchanged)."""
        async with self.store.lock(job_id):
            job = await self.store.get(job_id)
            if job.state not in RESUBMITTABLE:
                return job
            job.state = trainer_pb2.JOB_STATE_QUEUED
            job.message = RESUBMITTED_MESSAGE
            job.handle = ""
            job.exit_code = 0
            job.started_at = job.finished_at = 0.0
            await self.store.put(job)
        JOBS_SUBMITTED.labels(job.spec.runner).inc()
        log.info("job.resubmitted", extra={"job_id": job_id, "runner": job.spec.runner, "out": job.spec.output_dir})
        await self.store.append_log(job_id, RESUBMITTED_MESSAGE)
        self._enqueue(job_id, job.spec.runner)
        return job

    def _same_request(self, stored: trainer_pb2.JobSpec, submitted: trainer_pb2.JobSpec) -> bool:
        try:
            return self.runners[submitted.runner].prepare(submitted) == stored
        except StableAlignError:
            return False

    async def get(self, job_id: str) -> trainer_pb2.Job:
        return await self.store.get(job_id)

    async def list(self) -> list[trainer_pb2.Job]:
        return await self.store.list()

    async def cancel(self, job_id: str) -> trainer_pb2.Job:
        """Stops a queued or running job and returns it in its final state (bounded wait)."""
        job = await self.store.get(job_id)
        if is_terminal(job):
            raise ConflictError(f"job {job_id} has ended already ({state_name(job.state)})")
        async with self.store.lock(job_id):
            job = await self.store.get(job_id)
            if job.state == trainer_pb2.JOB_STATE_QUEUED:
                job.state = trainer_pb2.JOB_STATE_CANCELLED
                job.finished_at = time.time()
                job.message = "cancelled before it started"
                await self.store.put(job)
                JOBS_FINISHED.labels(job.spec.runner, "cancelled").inc()
                await self.store.append_log(job_id, "cancelled before it started")
                return job
        if is_terminal(job):
            return job
        runner = self.runners.get(job.spec.runner)
        task = self._running.get(job_id)
        self._cancelling.add(job_id)
        if runner is not None:
            await runner.cancel(job)
        if task is not None:
            # The worker records the end (CANCELLED) once the runner returns.
            await asyncio.wait({task}, timeout=self.settings.cancel_grace_seconds + 10.0)
            return await self.store.get(job_id)
        # Running under a previous service process (not watched here): record the end ourselves.
        job = await self.store.update(job_id, state=trainer_pb2.JOB_STATE_CANCELLED, finished_at=time.time(),
                                      message="cancelled")
        JOBS_FINISHED.labels(job.spec.runner, "cancelled").inc()
        return job

    def logs(self, job_id: str, follow: bool, poll: float = 0.5) -> AsyncIterator[trainer_pb2.LogLine]:
        return follow_logs(self.store, job_id, follow, poll)

    # --- scheduling ------------------------------------------------------------------------------

    def _enqueue(self, job_id: str, runner: str, reattach: bool = False) -> None:
        self._queues[runner].put_nowait((job_id, reattach))
        JOBS_QUEUED.labels(runner).set(self._queues[runner].qsize())

    async def start(self) -> None:
        """Recovers the jobs of earlier service processes, then starts the workers."""
        await self.recover()
        limits = {"local": self.settings.max_parallel_jobs, "kubernetes": self.settings.max_parallel_k8s_jobs}
        for name in self.runners:
            for i in range(limits.get(name, 1)):
                self._workers.append(asyncio.create_task(self._worker(name), name=f"trainer-{name}-{i}"))

    async def run(self) -> None:
        """Background task of the service: start, then wait (the workers do the work)."""
        await self.start()
        await asyncio.Event().wait()

    async def recover(self) -> None:
        for job in await self.store.list():
            if is_terminal(job):
                continue
            runner = self.runners.get(job.spec.runner)
            job_id = job.spec.job_id
            if job.state == trainer_pb2.JOB_STATE_QUEUED:
                if runner is None:
                    await self._finish_orphan(job, f"runner {job.spec.runner!r} is not enabled on this trainer")
                    continue
                self._enqueue(job_id, job.spec.runner)
                log.info("job.requeued", extra={"job_id": job_id})
            elif runner is not None and runner.detached:
                self._enqueue(job_id, job.spec.runner, reattach=True)
                log.info("job.reattaching", extra={"job_id": job_id, "handle": job.handle})
            else:
                killed = kill_orphan(job.handle) if job.spec.runner == "local" else False
                await self._finish_orphan(job, "trainer restarted" + (" (its process was stopped)" if killed else ""))

    async def _finish_orphan(self, job: trainer_pb2.Job, message: str) -> None:
        await self.store.append_log(job.spec.job_id, f"job failed: {message}")
        await self.store.update(job.spec.job_id, state=trainer_pb2.JOB_STATE_FAILED, finished_at=time.time(),
                                message=message)
        JOBS_FINISHED.labels(job.spec.runner, "failed").inc()
        log.warning("job.orphaned", extra={"job_id": job.spec.job_id, "reason": message})

    async def _worker(self, runner_name: str) -> None:
        queue = self._queues[runner_name]
        while True:
            job_id, reattach = await queue.get()
            JOBS_QUEUED.labels(runner_name).set(queue.qsize())
            task = asyncio.create_task(self._execute(job_id, runner_name, reattach))
            self._running[job_id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                raise
            except Exception:
                log.exception("job.worker_failed", extra={"job_id": job_id})
            finally:
                self._running.pop(job_id, None)

    async def _execute(self, job_id: str, runner_name: str, reattach: bool) -> None:
        runner = self.runners[runner_name]
        async with self.store.lock(job_id):
            job = await self.store.get(job_id)
            if reattach:
                if job.state != trainer_pb2.JOB_STATE_RUNNING:
                    return
            elif job.state != trainer_pb2.JOB_STATE_QUEUED:
                return  # cancelled while it waited
            else:
                job.state = trainer_pb2.JOB_STATE_RUNNING
                job.started_at = time.time()
                job.message = "running"
                await self.store.put(job)
        last_log_time = await self.store.last_log_time(job_id) if reattach else 0.0
        reporter = Reporter(self.store, job_id, runner_name, last_log_time)
        if not reattach:
            await reporter.log(f"job {job_id} started on runner {runner_name}")
        log.info("job.started", extra={"job_id": job_id, "runner": runner_name, "reattach": reattach})
        JOBS_RUNNING.labels(runner_name).inc()
        try:
            try:
                result = await runner.run(job, reporter, reattach=reattach)
            except asyncio.CancelledError:
                await asyncio.shield(self._interrupted(job, reporter))
                raise
            except StableAlignError as exc:
                result = RunResult(trainer_pb2.JOB_STATE_FAILED, -1, str(exc))
            except Exception as exc:
                log.exception("job.runner_failed", extra={"job_id": job_id})
                result = RunResult(trainer_pb2.JOB_STATE_FAILED, -1, f"runner error: {type(exc).__name__}")
        finally:
            JOBS_RUNNING.labels(runner_name).dec()
        if job_id in self._cancelling:
            self._cancelling.discard(job_id)
            result = RunResult(trainer_pb2.JOB_STATE_CANCELLED, result.exit_code, "cancelled")
        await reporter.flush()
        final = state_name(result.state).lower()
        await reporter.log(f"job {job_id} {final}: {result.message}")
        job = await self.store.update(job_id, state=result.state, finished_at=time.time(),
                                      exit_code=result.exit_code, message=result.message)
        JOBS_FINISHED.labels(runner_name, final).inc()
        if job.started_at:
            JOB_SECONDS.labels(runner_name).observe(max(0.0, job.finished_at - job.started_at))
        log.info("job.finished", extra={"job_id": job_id, "state": final, "exit_code": result.exit_code,
                                        "detail": result.message})

    async def _interrupted(self, job: trainer_pb2.Job, reporter: Reporter) -> None:
        """The service is stopping while the job runs."""
        with contextlib.suppress(Exception):
            await reporter.flush()
        runner = self.runners[job.spec.runner]
        if runner.detached:
            with contextlib.suppress(Exception):
                await reporter.log("trainer service stopping: the job keeps running and is re-attached on start")
            return
        with contextlib.suppress(Exception):
            await reporter.log(REQUEUED_MESSAGE)
            await self.store.update(job.spec.job_id, state=trainer_pb2.JOB_STATE_QUEUED, message=REQUEUED_MESSAGE,
                                    handle="")

    async def stop(self) -> None:
        """Drain: no new jobs; stop local processes (requeued) and Kubernetes watchers (re-attached later)."""
        self._stopping = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()
        for runner in self.runners.values():
            with contextlib.suppress(Exception):
                await runner.close()
