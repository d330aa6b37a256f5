"""One set-up for any process of the product: its log lines and its cycle collector.

Every entry point (the command line, ``serve``, a worker, a training job) calls ``setup_process`` with
what it knows: its flags or its settings, else the ``STABLEALIGN_LOG_*`` variables (``ProcessSettings``).
It is called twice in a service's life because the two halves need different moments: logging before
anything logs, the collector once the services run (what is alive then lives as long as the process).
"""

from __future__ import annotations

import gc

from stablealign.core.config import ProcessSettings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.logs import setup_logging


def settle_heap(gen0_threshold: int = 0) -> None:
    """Moves every object alive now into the permanent GC generation (``gc.freeze``), once a process has
    started its services, and spaces the young-generation collections ``gen0_threshold`` allocations
    apart (0: the interpreter's 700).

    Why: what is alive then (imported modules, classes, settings, connections) lives as long as the
    process, yet every full collection traversed it again, a large share of a round's CPU (gen-2
    collections triggered by the round's own allocations). Frozen objects are still freed by reference
    counting; only the cycle collector skips them. After the freeze a round still triggered many young
    collections: a request allocates thousands of short-lived containers that reference counting frees
    anyway, so collecting every 700 allocations mostly scans live in-flight work; spacing them apart
    keeps that work out of the rounds (figures: docs/benchmarks.md). Cyclic garbage still goes at the
    next young collection; the older generations keep their thresholds, so nothing waits for a rare
    full pass.
    """
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)


def setup_process(settings: ProcessSettings | None = None, *, log_level: str | None = None,
                  log_format: str | None = None, lock: bool = False, serving: bool = False) -> None:
    """Applies the process settings: ``log_level``/``log_format`` given (a command's flags), else
    ``settings``, else ``ProcessSettings`` from the environment.

    At start (``serving`` false): the root logger; ``lock`` as in ``stablealign.core.logs.setup_logging`` (the
    command line's choice holds against later calls). Once the process's services run (``serving``, with
    a service's ``settings``): the cycle collector (``settle_heap`` with ``gc_gen0_threshold``), logging left
    as it is. A bad level is a ConfigError naming ``STABLEALIGN_LOG_LEVEL``.
    """
    if serving:
        # A service's settings (stablealign.serving.settings.ServiceSettings, a room above this one) carry it.
        threshold = getattr(settings, "gc_gen0_threshold", None)
        if not isinstance(threshold, int):
            raise TypeError("setup_process(serving=True) takes the settings of a service it runs")
        settle_heap(threshold)
        return
    if log_level is None or log_format is None:
        settings = settings or load_settings(ProcessSettings)
        log_level, log_format = log_level or settings.log_level or "INFO", log_format or settings.log_format
    try:
        setup_logging(log_level, log_format, lock=lock)
    except ValueError:
        raise ConfigError(f"STABLEALIGN_LOG_LEVEL={log_level!r} is not a log level") from None
