"""The world's failure budget (services/world/budget.py), Retry-After parsing and retry_async's wait floor."""

from __future__ import annotations

import email.utils
import time

import nats.errors
import pytest

from services.world.budget import ABSENT, ERROR, FINAL, FailureBudget, failure_kind
from services.world.interaction import StepError
from services.world.settings import WorldSettings
from stablealign.core.config import load_settings
from stablealign.core.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from stablealign.core.retry import RetryPolicy, retry_async
from stablealign.llm.backends.base import parse_retry_after

NO_RESPONDERS = StepError("rate_before", "sandbox.observer.rate, backend offline",
                          UnavailableError("sandbox.observer.rate: no reply after 3 attempts (NoRespondersError)"))
LLM_DOWN = StepError("draft", "sandbox.agent.draft, backend openai", BackendError("openai: gave up after 5 attempts"))


def budget(*, attempts: int = 1, absent: float = 60.0, errors: int = 3) -> FailureBudget:
    return FailureBudget(min_attempts=attempts, absent_seconds=absent, errors_in_a_row=errors)


@pytest.mark.parametrize(("error", "kind"), [
    (ValidationError("bad"), FINAL), (NotFoundError("unknown world"), FINAL), (ConflictError("no persona"), FINAL),
    (UnavailableError("no reply"), ABSENT), (nats.errors.NoRespondersError(), ABSENT), (TimeoutError(), ABSENT),
    (BackendError("HTTP 500"), ERROR), (RuntimeError("bug"), ERROR),
    (StepError("draft", "x", NotFoundError("unknown world")), FINAL), (NO_RESPONDERS, ABSENT), (LLM_DOWN, ERROR),
])
def test_failures_are_sorted_by_what_another_try_can_fix(error, kind):
    assert failure_kind(error) == kind


def test_a_final_error_ends_the_interaction_at_once():
    streak = budget(attempts=5).streak()
    assert not streak.allows(StepError("draft", "sandbox.agent.draft", ValidationError("question too long")))
    assert streak.verdict == "not retryable" and streak.attempts == 1


def test_an_absent_service_is_waited_for_until_the_absent_budget_is_spent(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    b = budget(absent=30.0)
    streak = b.streak()
    for _ in range(50):  # many tries within 29 s: each may be followed by another
        assert streak.allows(NO_RESPONDERS)
        clock[0] += 29.0 / 50
    assert "sandbox.observer.rate" in b.waiting and "absent" in b.waiting and b.retries == 50
    clock[0] += 1.0
    assert not streak.allows(NO_RESPONDERS)
    assert "unreachable for 30.0s" in streak.verdict and "absent budget 30s" in streak.verdict


def test_errors_in_a_row_spend_the_error_budget_and_progress_anywhere_resets_it():
    b = budget(errors=3)
    streak = b.streak()
    assert streak.allows(LLM_DOWN) and streak.allows(LLM_DOWN)
    b.succeeded()  # another interaction of the world got through
    assert b.waiting == ""
    assert streak.allows(LLM_DOWN) and streak.allows(LLM_DOWN)
    assert not streak.allows(LLM_DOWN)
    assert "3 failed tries in a row" in streak.verdict and "error budget 3" in streak.verdict


def test_interaction_attempts_come_before_the_budget():
    streak = budget(attempts=3, absent=0.0, errors=0).streak()
    assert streak.allows(NO_RESPONDERS) and streak.allows(LLM_DOWN)
    assert not streak.allows(NO_RESPONDERS) and streak.attempts == 3


def test_the_budget_is_a_documented_setting():
    settings = load_settings(WorldSettings, {}, environ={"STABLEALIGN_ABSENT_BUDGET_SECONDS": "5",
                                                         "STABLEALIGN_ERROR_BUDGET_CONSECUTIVE": "7"})
    assert settings.absent_budget_seconds == 5.0 and settings.error_budget_consecutive == 7
    defaults = WorldSettings()
    assert defaults.absent_budget_seconds == 120.0 and defaults.error_budget_consecutive == 20
    for name in ("absent_budget_seconds", "error_budget_consecutive", "failure_backoff_max_seconds"):
        assert WorldSettings.model_fields[name].description


def test_retry_after_in_seconds_or_as_an_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after("1") == 1.0 and parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("-3") == 0.0
    for unusable in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(unusable) is None


async def test_a_failure_may_ask_for_a_longer_wait_than_the_backoff():
    stamps: list[float] = []

    class Slow(Exception):
        retry_after = 0.3

    async def operation(attempt: int) -> str:
        stamps.append(time.monotonic())
        if attempt == 1:
            raise Slow()
        return "ok"

    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001, timeout=None)
    result = await retry_async(operation, policy, retryable=lambda exc: True,
                               wait_at_least=lambda exc: getattr(exc, "retry_after", None))
    assert result == "ok" and stamps[1] - stamps[0] >= 0.3
    assert RetryPolicy(base_delay=1.0, max_delay=5.0, jitter="none").delay(100_000) == 5.0  # no overflow
