"""The local runner: a training job as a subprocess on the trainer's own machine.

One job is ``python -m stablealign.training.train --model .. --data .. --out .. <flags>`` (through
``torch.distributed.run`` — torchrun — when ``spec.gpus > 1``), started in its own session so
that cancelling reaches torchrun's workers too: SIGTERM to the process group, SIGKILL after the
grace period. Its stdout and stderr become job log lines (tqdm's carriage-return updates count as
lines); its progress comes from ``<out>/train_log.jsonl``, read every ``poll_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import services
from services.trainer.inputs import local_paths
from services.trainer.runners import (
    JobReporter,
    Runner,
    RunResult,
    check_gpus,
    metrics_from_json,
    train_flags,
    train_module_argv,
)
from services.trainer.settings import TrainerSettings
from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.v1 import trainer_pb2

log = get_logger(__name__)

MAX_LINE_CHARS = 4000
TRAIN_LOG = "train_log.jsonl"
_LINE_BREAK = re.compile(rb"[\r\n]")
# Processes that belong to a training job (checked before signalling a pid left by an earlier service).
_TRAINING_MARKERS = ("stablealign.training.train", "torch.distributed.run")


def project_root() -> Path:
    """The folder that holds the ``services`` package (so ``-m stablealign.training.train`` imports)."""
    return Path(services.__file__).resolve().parent.parent


def training_command(spec: trainer_pb2.JobSpec, python: str | None = None) -> list[str]:
    """The argv of one local job (validated flags only)."""
    python = python or sys.executable
    train = train_module_argv(spec, spec.gpus)
    if spec.gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc_per_node={spec.gpus}", *train]
    return [python, *train]


class TrainLogTail:
    """Reads the records appended to ``train_log.jsonl`` since the last look (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> dict[str, float]:
        """Metrics of the newest complete record (merged over the new ones), {} if nothing new."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return {}
        self.offset += len(chunk)
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        merged: dict[str, float] = {}
        for line in lines:
            merged.update(metrics_from_json(line.decode("utf-8", errors="replace")))
        return merged


class LocalRunner(Runner):
    name = "local"
    detached = False

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def prepare(self, spec: trainer_pb2.JobSpec) -> trainer_pb2.JobSpec:
        spec = trainer_pb2.JobSpec.FromString(spec.SerializeToString())
        if not spec.model:
            raise ValidationError("model is required (a local model directory)")
        if not spec.data:
            raise ValidationError("data is required (an alignment data JSONL file)")
        model, data, out = local_paths(spec, self.settings)  # inside the configured roots, symlinks resolved
        if not model.exists():
            raise ValidationError(f"model path {spec.model!r} does not exist on the trainer's machine")
        if not data.is_file():
            raise ValidationError(f"data file {spec.data!r} does not exist on the trainer's machine")
        if spec.nodes > 1:
            raise ValidationError("the local runner runs on one node; use runner 'kubernetes' for nodes > 1")
        check_gpus(spec.gpus, self.settings)
        train_flags(spec.args)  # raises on an unknown name or a bad value
        spec.model, spec.data, spec.output_dir = str(model), str(data), str(out)
        return spec

    async def run(self, job: trainer_pb2.Job, reporter: JobReporter, *, reattach: bool = False) -> RunResult:
        spec = job.spec
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        argv = training_command(spec, self.settings.python or None)
        env = dict(os.environ, PYTHONUNBUFFERED="1", STABLEALIGN_JOB_ID=spec.job_id)  # the child's environment
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root()), env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=env)
        except OSError as exc:
            return RunResult(trainer_pb2.JOB_STATE_FAILED, -1, f"cannot start the training process: {exc}")
        self._procs[spec.job_id] = proc
        log.info("job.process_started", extra={"job_id": spec.job_id, "pid": proc.pid, "argv": argv})
        await reporter.handle(str(proc.pid))
        await reporter.log("$ " + shlex.join(argv))  # a command that can be pasted into a shell
        tail = TrainLogTail(out / TRAIN_LOG)
        reader = asyncio.create_task(self._read_output(proc, reporter))
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=self.settings.poll_seconds)
                    break
                except TimeoutError:
                    if values := tail.read():
                        await reporter.metrics(values)
            await reader
        except BaseException:
            # The service is stopping, or reporting failed (NATS down): either way the process must
            # not outlive its watcher, or it would train on untracked.
            await asyncio.shield(self._terminate(proc))
            reader.cancel()
            raise
        finally:
            self._procs.pop(spec.job_id, None)
        if values := tail.read():
            await reporter.metrics(values)
        code = proc.returncode if proc.returncode is not None else -1
        if code == 0:
            return RunResult(trainer_pb2.JOB_STATE_SUCCEEDED, 0, "training finished")
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return RunResult(trainer_pb2.JOB_STATE_FAILED, code, f"training process failed ({reason})")

    async def _read_output(self, proc: asyncio.subprocess.Process, reporter: JobReporter) -> None:
        assert proc.stdout is not None
        pending = b""
        last_progress = ""
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            pending += chunk
            parts = _LINE_BREAK.split(pending)
            pending = parts.pop()
            for raw in parts:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if not line or line == last_progress:
                    continue
                last_progress = line
                await self._report(reporter, line)
        if pending.strip():
            await self._report(reporter, pending.decode("utf-8", errors="replace").rstrip())

    @staticmethod
    async def _report(reporter: JobReporter, line: str) -> None:
        """Stores one output line; a failure to store it is logged, never allowed to stop the reading:
        an undrained pipe would block the training process on its next write."""
        try:
            await reporter.log(line[:MAX_LINE_CHARS])
            if values := metrics_from_json(line):
                await reporter.metrics(values)
        except Exception as exc:  # noqa: BLE001
            log.warning("job.log_store_failed", extra={"error": str(exc)[:200]})

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the job's process group, SIGKILL after the grace period."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.settings.cancel_grace_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # torchrun's workers share the group; make sure none is left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def cancel(self, job: trainer_pb2.Job) -> None:
        proc = self._procs.get(job.spec.job_id)
        if proc is not None:
            await self._terminate(proc)
        elif job.handle:
            kill_orphan(job.handle)

    async def close(self) -> None:
        await asyncio.gather(*(self._terminate(p) for p in list(self._procs.values())), return_exceptions=True)


def kill_orphan(handle: str) -> bool:
    """Stops a training process group left by an earlier trainer service (crash), if it is still there.

    Checks the command line first so that a recycled pid never gets a signal.
    """
    try:
        pid = int(handle)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (ValueError, OSError):
        return False
    if not any(marker in cmdline for marker in _TRAINING_MARKERS):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
        time.sleep(0.1)
        return True
    return False
