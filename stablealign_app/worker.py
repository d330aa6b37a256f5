"""A helper process of an embedded run: more agent and observer replicas on the run's own NATS server.

    python -m stablealign_app.worker --nats URL [--service agent --service observer]
        [--trust-url BACKEND=URL ...] [--trust-model-dir DIR ...] [--instance NAME]

Why: `stable-align run` keeps the CLI and every service in one event loop, so a round uses one core
however many the machine has. The embedded stack (``embedded.EmbeddedStack``, ``workers``) starts these
processes beside its in-process services; they join the same NATS queue groups, so the world's requests
spread over the processes with no change to the world or the protocol — exactly how replicas scale in a
deployment. The in-process replicas serve from the first request; a worker takes its share once it has
started (nobody waits for it), and a worker that fails only leaves its share to the others.

Protocol with the parent, one JSON object per line on stdout: ``{"ready": true}`` once serving, and,
after a drain, ``{"counters": {...}}`` (what its services counted, for the run's world.json). It stops on
SIGTERM/SIGINT or when its stdin closes (the parent is gone), draining what it took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

from stablealign.core.logs import get_logger

log = get_logger(__name__)

WORKER_SERVICES = ("agent", "observer")

# The agent/observer counters a run reports (sandbox.embedded_fault_counts): the worker adds its own.
# ``requests_served``: the NATS requests its replicas answered, which shows the worker took its share.
WORKER_COUNTERS = {"requests_joined": ("stablealign_requests_joined_total", {}),
                   "answers_rejected": ("stablealign_agent_answers_rejected_total", {}),
                   "requests_served": ("stablealign_requests_total", {"transport": "nats"}),
                   "llm_retries": ("stablealign_llm_requests_total", {"outcome": "retry"})}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stablealign_app.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True, help="the run's embedded NATS server")
    parser.add_argument("--service", action="append", choices=WORKER_SERVICES, default=None)
    parser.add_argument("--trust-url", action="append", default=[], metavar="BACKEND=URL",
                        help="an LLM URL the run's user named (endpoints.trust)")
    parser.add_argument("--trust-model-dir", action="append", default=[], metavar="DIR",
                        help="an hf model directory the run's user named (models.trust_model_dir)")
    parser.add_argument("--instance", default="embedded-worker")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="auto")
    return parser.parse_args(argv)


def _say(message: dict) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the parent is gone: nobody to tell


async def _stdin_closed() -> None:
    """Returns when the parent closes our stdin (or dies): the run is over either way."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(args: argparse.Namespace) -> int:
    from stablealign.core import metrics
    from stablealign.core.process import setup_process
    from stablealign.llm import endpoints, models
    from stablealign.serving.service import close_process_backends, unless_stopped
    from stablealign_app.embedded import start_embedded_service

    for item in args.trust_url:
        backend, _, url = item.partition("=")
        endpoints.trust(url, backend)
    for directory in args.trust_model_dir:
        models.trust_model_dir(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(_stdin_closed())
    watcher.add_done_callback(lambda _: stop.set())
    # Asked to stop (SIGTERM): drain what was taken. Orphaned (stdin closed, the run and its NATS server gone):
    # nobody waits for those replies, so no drain period.
    grace = lambda: 0.2 if watcher.done() and not watcher.cancelled() else 5.0  # noqa: E731
    running: list = []

    async def start_all() -> None:
        for name in args.service or WORKER_SERVICES:
            running.append(await start_embedded_service(name, args.nats, instance=f"{args.instance}-{name}"))

    try:
        started, _ = await unless_stopped(start_all(), stop)
        if started:
            setup_process(running[0].context.settings, serving=True)  # one per name asked: never empty
            _say({"ready": True})
            await stop.wait()
    finally:
        await asyncio.gather(*(service.stop(grace=grace()) for service in running), return_exceptions=True)
        await close_process_backends()
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    _say({"counters": {key: metrics.counter_value(name, **labels) for key, (name, labels) in WORKER_COUNTERS.items()}})
    return 0


def main(argv: list[str] | None = None) -> int:
    from stablealign.core.errors import StableAlignError
    from stablealign.core.process import setup_process

    args = parse_args(argv)
    setup_process(log_level=args.log_level, log_format=args.log_format, lock=True)
    # The run's own process has said it already: one "offline backend" notice per run, not one per process.
    logging.getLogger("stablealign.llm.backends.offline").addFilter(lambda record: record.getMessage() != "backend.offline")
    try:
        return asyncio.run(serve(args))
    except StableAlignError as exc:
        log.error("worker.failed", extra={"error": str(exc)})
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
