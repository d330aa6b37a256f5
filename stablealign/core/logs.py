"""Structured logging: one line per event, JSON in containers, readable everywhere else.

Use ``log = get_logger(__name__)`` and ``log.info("world.round_done", extra={"world_id": w})``;
every ``extra`` key becomes a field. Secrets never go in ``extra``.

Formats: ``json`` (one object per line, figures exact), ``console`` (a human line, figures rounded:
3 significant digits, seconds to 0.1 s) and ``auto``: JSON in a Kubernetes pod
(``KUBERNETES_SERVICE_HOST`` is set; the image sets ``STABLEALIGN_LOG_FORMAT=json`` too), human lines
everywhere else, on a terminal or not (``make run > log`` stays readable). The command line sets it up
once (``stable-align --log-level/--log-format``); lines go to whatever ``sys.stderr`` is when they are
written, so a rich progress display (which redirects stderr while it runs) and tqdm bars print them
above the bar, never inside it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from stablealign.core.config import HostSettings, load_settings
from stablealign.core.redaction import scrub_secrets

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        # The keys this process holds never reach a line, whatever an exception or a field quoted.
        return scrub_secrets(json.dumps(payload, default=str))


def human(key: str, value: object) -> str:
    """A figure as a person reads it: 0.43512 -> 0.435, 2.34e-05 stays, seconds to 0.1 s."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if key.endswith(("seconds", "_s")):
        return f"{value:.1f}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={human(k, v)}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname[:4]} {record.name}: {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub_secrets(line)


class StderrHandler(logging.StreamHandler):
    """Writes each line to the ``sys.stderr`` of the moment (not the one at set-up): under a rich
    progress display that is its proxy, which prints the line above the bar; with tqdm bars on the
    screen the line goes through ``tqdm.write``, which clears and redraws them."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - whatever sys.stderr is
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler assigns it; the property ignores it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm_module = sys.modules.get("tqdm")
        bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
        if not bars:
            super().emit(record)
            return
        try:
            tqdm_module.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def in_container() -> bool:
    """A Kubernetes pod, where log collectors read JSON (the image also sets STABLEALIGN_LOG_FORMAT=json)."""
    return bool(load_settings(HostSettings).kubernetes_service_host)


def resolve_format(fmt: str) -> str:
    """``auto`` -> ``json`` in a container, ``console`` elsewhere (terminal or not)."""
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        return "json" if in_container() else "console"
    return fmt


_locked = False
_current = ("INFO", "auto")


def current_logging() -> tuple[str, str]:
    """(level, format) of the last configuration applied: what a child process should be given."""
    return _current


def setup_logging(level: str = "INFO", fmt: str = "auto", *, lock: bool = False) -> None:
    """Configures the root logger (idempotent).

    The command line calls it once with ``lock=True`` after reading ``--log-level``/``--log-format``;
    later calls without ``lock`` (a library or a command that sets up logging for its other callers)
    then change nothing, so the person's choice holds for the whole process.
    """
    global _locked, _current
    if _locked and not lock:
        return
    _locked = _locked or lock
    _current = (level.upper(), fmt.lower())
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if resolve_format(fmt) == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "openai", "urllib3", "filelock", "asyncio", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
