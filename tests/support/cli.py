"""Fixtures for tests that run `stable-align` commands in-process: a clean environment, logging restored."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No STABLEALIGN_* of the test process's environment reaches a command."""
    for name in list(os.environ):
        if name.startswith("STABLEALIGN_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """The commands set up the root logger (and lock it): later tests get the logging they had."""
    import logging

    from stablealign.core import logs

    root = logging.getLogger()
    handlers = root.handlers[:]
    levels = {name: logging.getLogger(name).level for name in ("", "httpx", "httpcore", "openai", "urllib3",
                                                               "filelock", "asyncio", "nats")}
    monkeypatch.setattr(logs, "_locked", logs._locked)
    monkeypatch.setattr(logs, "_current", logs._current)
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
