"""One way to time a step: ``with timed(latency, "draft"): ...`` puts the seconds the block took in
``latency["draft"]``.

Code that reports how long its steps took (an interaction's ``latency_seconds``, a training step's
tokens per second, a round's interactions) names each step once, at the block that does it, instead of
pairing ``perf_counter()`` calls by hand around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager


@contextmanager
def timed(into: MutableMapping[str, float], name: str) -> Iterator[None]:
    """Stores the wall-clock seconds of the block in ``into[name]`` when it completes (not when it raises:
    a failed step has no duration to report)."""
    started = time.perf_counter()
    yield
    into[name] = time.perf_counter() - started
