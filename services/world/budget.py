"""A world's failure budget: how long it rides out missing replicas and failing LLMs before FAILED.

Every failed try of an interaction is sorted (``failure_kind``):

- **final**: a retry cannot fix it (400 validation, 404 unknown world or agent, 409, 413, and an LLM
  server's own 4xx — 400/401/403/404/422..., not 408/409/429 — which reaches the world as 424,
  ``LLMRequestError``): the interaction — and so the world — fails at once, with the status and reason;
- **absent**: a service the step needs is not there (no responders, no reply in time, unavailable,
  NATS reconnecting): another replica may come, or this one may restart;
- **error**: anything else, typically an LLM backend that still failed after its own retries (502).

An interaction is tried ``interaction_attempts`` times whatever the (non-final) failure; after that
it is tried again, with capped full-jitter exponential backoff, while its budget lasts: an absent
dependency for up to ``absent_budget_seconds``, errors up to ``error_budget_consecutive`` failed tries
in a row. Both count only while no interaction of the world succeeds: a success anywhere starts
every interaction's count afresh, so a world that makes progress never fails because one
interaction was unlucky, and a world of thousands of interactions in flight does not exhaust its
budget faster than a world of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors

from stablealign.core import errors

FINAL, ABSENT, ERROR = "final", "absent", "error"
# ConnectionClosedError: this process closed its own NATS connection (it stops); it never comes back.
FINAL_ERRORS = (errors.ValidationError, errors.NotFoundError, errors.ConflictError, errors.PayloadTooLargeError,
                errors.ConfigError, errors.LLMRequestError, nats.errors.ConnectionClosedError)
ABSENT_ERRORS = (errors.UnavailableError, TimeoutError, nats.errors.Error, ConnectionError)


def unwrap(exc: BaseException) -> BaseException:
    """The error behind a StepError (``.error``), else ``exc`` itself."""
    return getattr(exc, "error", None) or exc


def failure_kind(exc: BaseException) -> str:
    """final | absent | error (see the module's docstring)."""
    error = unwrap(exc)
    if isinstance(error, FINAL_ERRORS):
        return FINAL
    if isinstance(error, ABSENT_ERRORS):
        return ABSENT
    return ERROR


def reason(exc: BaseException) -> str:
    """An error for a log line or a world's error: our own errors say enough by themselves."""
    return str(exc) if isinstance(exc, errors.StableAlignError) else f"{type(exc).__name__}: {exc}"


class FailureBudget:
    """One per running world, shared by its interactions; each interaction keeps a ``Streak``."""

    def __init__(self, *, min_attempts: int, absent_seconds: float, errors_in_a_row: int,
                 halted: Callable[[], bool] = lambda: False) -> None:
        self.min_attempts = min_attempts
        self.halted = halted  # true once the world is cancelled or its replica stops: no more tries
        self.absent_seconds = absent_seconds
        self.errors_in_a_row = errors_in_a_row
        self.successes = 0  # interactions of this world that succeeded (here)
        self.retries = 0  # failed tries that were tried again
        self.waiting = ""  # what the world waits for now; "" once an interaction succeeds

    def streak(self) -> Streak:
        return Streak(self)

    def succeeded(self) -> None:
        self.successes += 1
        self.waiting = ""


class Streak:
    """One interaction's failed tries since the world's last success."""

    def __init__(self, budget: FailureBudget) -> None:
        self.budget = budget
        self.seen = budget.successes
        self.attempts = 0  # tries that failed, in all
        self.absent_since: float | None = None
        self.errors = 0
        self.kind = ""
        self.verdict = ""  # why the last failure ends the interaction; "" while it may go on

    @property
    def absent_for(self) -> float:
        return 0.0 if self.absent_since is None else time.monotonic() - self.absent_since

    def allows(self, exc: BaseException) -> bool:
        """Whether another try may follow the failure ``exc``; when not, ``verdict`` says why."""
        budget = self.budget
        self.attempts += 1
        if budget.successes != self.seen:  # the world made progress since this interaction's last failure
            self.seen, self.absent_since, self.errors = budget.successes, None, 0
        self.kind = failure_kind(exc)
        if self.kind == FINAL:
            self.verdict = "not retryable"
            return False
        if budget.halted():
            self.verdict = "the world is stopping"
            return False
        if self.kind == ABSENT:
            if self.absent_since is None:
                self.absent_since = time.monotonic()
            spent = self.absent_for >= budget.absent_seconds
            self.verdict = (f"unreachable for {self.absent_for:.1f}s with no progress "
                            f"(absent budget {budget.absent_seconds:g}s)")
        else:
            self.errors += 1
            spent = self.errors >= budget.errors_in_a_row
            self.verdict = (f"{self.errors} failed tries in a row with no progress "
                            f"(error budget {budget.errors_in_a_row})")
        if self.attempts < budget.min_attempts or not spent:
            budget.retries += 1
            budget.waiting = f"{reason(exc)[:300]} [{self.kind}: {self.verdict}]"
            self.verdict = ""
            return True
        return False
