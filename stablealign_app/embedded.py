"""The embedded stack of a SANDBOX run: used by `stable-align run`, the pipeline and benchmarks.

Without a NATS URL `run` brings up an embedded stack — a nats-server child process plus the agent,
observer and world services inside this event loop — so one command runs a whole society. With
a URL it only talks to services that are already running; either way the world is created,
followed and read back through the same client (``services/world/client.py``: the NATS API and the
SANDBOX_RECORDS stream), so both paths write the same ``records.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stablealign.core.config import load_settings
from stablealign.core.errors import ConfigError, ValidationError
from stablealign.core.logs import current_logging, get_logger
from stablealign.llm import endpoints, models
from stablealign.nats import auth as natsauth
from stablealign.nats.auth import NatsClientOptions
from stablealign.sandbox.data import data_dir
from stablealign.serving.service import RunningService, close_process_backends, settle_heap, start_service
from stablealign.v1 import world_pb2
from stablealign_app.natsserver import EmbeddedNatsServer

SANDBOX_SERVICES = ("agent", "observer", "world")
log = get_logger(__name__)


@dataclass
class EmbeddedStack:
    """nats-server + the SANDBOX services in this process; ``async with`` starts and stops it all."""

    services: tuple[str, ...] = SANDBOX_SERVICES
    # Ends with this process even after `kill -9` (Linux): spawned on the event loop's thread (see start).
    server: EmbeddedNatsServer = field(default_factory=lambda: EmbeddedNatsServer(die_with_parent=True))
    running: list[RunningService] = field(default_factory=list)
    # Settings per service name beyond the defaults (e.g. the world's data roots for a user's own files).
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    # The embedded nats-server has no users and no TLS: NATS client settings in the environment (or the
    # command's --nats-* flags) are meant for a remote server (--nats), and would make every connection to
    # this one fail (a CA: a TLS handshake with a plaintext server). Its clients connect without them.
    client_options: NatsClientOptions = field(default_factory=NatsClientOptions)
    # Helper processes serving more agent and observer replicas (stablealign_app/worker.py), and the
    # arguments that give them what this process trusts (the LLM URLs and model directories of the spec).
    workers: int = 0
    worker_args: list[str] = field(default_factory=list)
    worker_processes: list[EmbeddedWorker] = field(default_factory=list)
    worker_counters: dict[str, float] = field(default_factory=dict)

    async def start(self) -> EmbeddedStack:
        ignored = remote_nats_settings()
        if ignored:
            log.warning("embedded.nats_settings_ignored", extra={
                "ignored": ", ".join(ignored),
                "why": "the embedded NATS server of this run has no users and no TLS; they are for --nats"})
        # Spawned on this thread, which lives as long as the command (the server's parent-death signal
        # follows the spawning thread); waited for on another, so the loop is not blocked meanwhile.
        self.server.spawn()
        await asyncio.to_thread(self.server.wait_ready)
        try:
            # Workers first: they start (a second or so of imports) while this process starts its own services.
            for number in range(self.workers):
                self.worker_processes.append(await EmbeddedWorker.spawn(self.url, number, self.worker_args))
            for name in self.services:
                self.running.append(await start_embedded_service(name, self.url, instance=f"embedded-{name}",
                                                                 overrides=self.overrides.get(name)))
        except BaseException:
            await self.stop()
            raise
        # What the command and its services keep for their life: out of the cycle collector's way.
        settle_heap(self.running[0].context.settings.gc_gen0_threshold if self.running else 0)
        return self

    async def stop_workers(self) -> None:
        """Drains and ends the worker processes (idempotent); their counters go to ``worker_counters``."""
        workers, self.worker_processes = self.worker_processes, []
        for counters in await asyncio.gather(*(worker.stop() for worker in workers)):
            for key, value in counters.items():
                self.worker_counters[key] = self.worker_counters.get(key, 0.0) + value

    async def stop(self) -> None:
        await self.stop_workers()
        for service in reversed(self.running):
            await service.stop(grace=5.0)
        if self.running:
            await close_process_backends()
        self.running.clear()
        await asyncio.to_thread(self.server.stop)

    async def __aenter__(self) -> EmbeddedStack:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def start_embedded_service(name: str, nats_url: str, *, instance: str,
                                 overrides: dict[str, Any] | None = None) -> RunningService:
    """One service of an embedded stack on its NATS server: no gRPC or metrics port, no NATS users."""
    module = importlib.import_module(f"services.{name}.main")
    settings = load_settings(module.SETTINGS, {"nats_url": nats_url, "grpc_port": -1, "metrics_port": -1,
                                               "instance": instance,
                                               **{setting: "" for setting in natsauth.SETTING_NAMES},
                                               **(overrides or {})})
    return await start_service(name, settings, module.build)


@dataclass
class EmbeddedWorker:
    """One ``stablealign_app.worker`` process of an embedded stack (more agent and observer replicas)."""

    number: int
    process: asyncio.subprocess.Process
    counters: dict[str, float] = field(default_factory=dict)
    reader: asyncio.Task | None = None

    @classmethod
    async def spawn(cls, nats_url: str, number: int, extra_args: list[str]) -> EmbeddedWorker:
        level, fmt = current_logging()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stablealign_app.worker", "--nats", nats_url, "--instance",
            f"embedded-worker{number}", "--log-level", level, "--log-format", fmt, *extra_args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        worker = cls(number, process)
        worker.reader = asyncio.ensure_future(worker._read())
        return worker

    async def _read(self) -> None:
        """Follows the worker's stdout (one JSON object per line); says so if it ends before its stop."""
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("ready"):
                log.debug("embedded.worker_ready", extra={"worker": self.number, "pid": self.process.pid})
            if isinstance(message.get("counters"), dict):
                self.counters = {k: float(v) for k, v in message["counters"].items()}
        code = await self.process.wait()
        if code != 0 and not self.counters:
            log.warning("embedded.worker_exited", extra={
                "worker": self.number, "exit_code": code,
                "effect": "its share of the requests goes to the other replicas"})

    async def stop(self, grace: float = 10.0) -> dict[str, float]:
        """Asks the worker to drain (SIGTERM), waits ``grace`` seconds, then kills it; returns its counters."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout=grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.reader, timeout=5.0)
        return self.counters


def remote_nats_settings() -> list[str]:
    """The NATS client settings this process was given (``STABLEALIGN_NATS_USER``, ``_CA``, ... in the
    environment, or the command's ``--nats-*`` flags) that an embedded stack does not use."""
    given = natsauth.client_options()  # the command's, from its flags and variables
    from_command = [f"STABLEALIGN_NATS_{f.name.upper()}" for f in fields(given) if getattr(given, f.name)]
    from_env = natsauth.settings_in_environment()
    return list(dict.fromkeys([*from_command, *from_env]))


# A world smaller than this is over before a worker would have started: no workers by default.
WORKERS_MIN_INTERACTIONS = 200
MAX_DEFAULT_WORKERS = 4
AUTO_WORKERS = -1


def run_workers(spec: world_pb2.WorldSpec, requested: int = AUTO_WORKERS, cpus: int | None = None) -> int:
    """How many worker processes an embedded run of ``spec`` starts (``stablealign_app/worker.py``).

    ``requested`` (`run --workers`, ``STABLEALIGN_RUN_WORKERS``) when >= 0 (0: everything in the command's
    own process). Else one per core beyond the first, at most ``MAX_DEFAULT_WORKERS``; none on one core, none
    for a world of fewer than ``WORKERS_MIN_INTERACTIONS`` interactions (a worker's start-up would cost
    more than it serves), and none with an in-process model (``hf``): each process would load its own copy,
    and torch already uses the cores.
    """
    if requested >= 0:
        return requested
    if requested != AUTO_WORKERS:
        raise ConfigError(f"--workers must be >= 0, or {AUTO_WORKERS} for one per extra core; got {requested}")
    if "hf" in (spec.agent_model.backend, spec.observer_model.backend):
        return 0
    if spec.size * spec.size * max(spec.rounds, 1) < WORKERS_MIN_INTERACTIONS:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cpus - 1, MAX_DEFAULT_WORKERS))


def embedded_stack_for(spec: world_pb2.WorldSpec, workers: int = AUTO_WORKERS) -> EmbeddedStack:
    """An embedded stack that may run ``spec``: the person running the command is its operator.

    The in-process services accept the LLM URLs the spec names (``endpoints.trust``: without a key;
    ``OPENAI_API_KEY`` still goes only to ``OPENAI_BASE_URL``), its hf model directories
    (``models.trust_model_dir``) and the directories of its prior and question files besides the
    shared data directory; its worker processes (``run_workers(spec, workers)``) are given the same URLs
    and model directories. Services reached with ``--nats`` get nothing of this: their operator configured them.
    """
    worker_args: list[str] = []
    for ref in (spec.agent_model, spec.observer_model, spec.embedding_model):
        if ref.url.strip() and ref.backend in endpoints.REMOTE_BACKENDS:
            with contextlib.suppress(ValidationError):  # not a URL: CreateWorld says so in one line
                endpoints.trust(ref.url, ref.backend)
                worker_args += ["--trust-url", f"{ref.backend}={ref.url}"]
        if ref.backend == "hf" and ref.model.strip():
            models.trust_model_dir(ref.model)
            worker_args += ["--trust-model-dir", ref.model]
    roots = [str(data_dir())]
    for path in (spec.prior_path, spec.questions_path):
        if path.strip():
            roots.append(str(Path(path).expanduser().resolve().parent))
    return EmbeddedStack(overrides={"world": {"world_data_roots": tuple(dict.fromkeys(roots))}},
                         workers=run_workers(spec, workers), worker_args=worker_args)
