"""The one retry helper (stablealign.core.retry) and the backend retry built on it."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from stablealign.core.errors import BackendError, ValidationError
from stablealign.core.retry import AttemptTimeoutError, Failure, RetryPolicy, retry_async
from stablealign.llm.backends.base import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    Completion,
    RetryableBackendError,
)

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.004, timeout=None)


class Flaky(Exception):
    """A retryable failure in these tests."""


def is_flaky(exc: Exception) -> bool:
    return isinstance(exc, Flaky)


def failing(times: int, result: str = "ok", error: type[Exception] = Flaky):
    """An operation that fails ``times`` times, then returns ``result``; records the attempt numbers."""
    seen: list[int] = []

    async def operation(attempt: int) -> str:
        seen.append(attempt)
        if len(seen) <= times:
            raise error(f"failure {len(seen)}")
        return result

    return operation, seen


async def test_retries_then_succeeds():
    operation, seen = failing(2)
    failures: list[Failure] = []
    result = await retry_async(operation, FAST, retryable=is_flaky, on_failure=failures.append)
    assert result == "ok"
    assert seen == [1, 2, 3]
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.delay is not None and not f.final and f.attempts == 3 for f in failures)
    assert [str(f.error) for f in failures] == ["failure 1", "failure 2"]


async def test_final_errors_are_not_retried():
    operation, seen = failing(5, error=ValueError)
    failures: list[Failure] = []
    gave_up: list[Failure] = []

    def give_up(failure: Failure) -> BaseException:
        gave_up.append(failure)
        return RuntimeError("gave up")

    with pytest.raises(ValueError, match="failure 1"):
        await retry_async(operation, FAST, retryable=is_flaky, on_failure=failures.append, give_up=give_up)
    assert seen == [1]
    assert failures == [] and gave_up == []


async def test_exhausted_attempts_raise_the_give_up_error_from_the_last_one():
    operation, seen = failing(10)
    failures: list[Failure] = []
    with pytest.raises(RuntimeError, match="gave up after 3 attempts: failure 3") as info:
        await retry_async(
            operation, FAST, retryable=is_flaky, on_failure=failures.append,
            give_up=lambda f: RuntimeError(f"gave up after {f.attempts} attempts: {f.error}"),
        )
    assert seen == [1, 2, 3]
    assert isinstance(info.value.__cause__, Flaky)
    assert [f.attempt for f in failures] == [1, 2, 3]
    assert [f.final for f in failures] == [False, False, True]


async def test_exhausted_attempts_without_give_up_raise_the_last_error():
    operation, seen = failing(10)
    with pytest.raises(Flaky, match="failure 2"):
        await retry_async(operation, RetryPolicy(attempts=2, base_delay=0.001, timeout=None), retryable=is_flaky)
    assert seen == [1, 2]


async def test_per_attempt_timeout_is_a_retryable_failure():
    seen: list[int] = []

    async def operation(attempt: int) -> str:
        seen.append(attempt)
        if attempt == 1:
            await asyncio.sleep(30)
        return "second"

    failures: list[Failure] = []
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001, timeout=0.05)
    started = time.perf_counter()
    # retryable says no to everything: the timeout is retried all the same
    result = await retry_async(operation, policy, retryable=lambda exc: False, on_failure=failures.append)
    assert result == "second" and seen == [1, 2]
    assert time.perf_counter() - started < 5
    assert len(failures) == 1 and isinstance(failures[0].error, AttemptTimeoutError)
    assert isinstance(failures[0].error, TimeoutError)


async def test_timeouts_on_every_attempt_give_up():
    async def operation(attempt: int) -> str:
        await asyncio.sleep(30)
        return "never"

    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001, timeout=0.02)
    with pytest.raises(AttemptTimeoutError, match="timed out after 0.02s"):
        await asyncio.wait_for(retry_async(operation, policy, retryable=lambda exc: False), timeout=10)


async def test_an_operations_own_timeout_error_goes_to_the_predicate():
    operation, seen = failing(5, error=TimeoutError)
    policy = RetryPolicy(attempts=3, base_delay=0.001, timeout=10.0)
    with pytest.raises(TimeoutError) as info:
        await retry_async(operation, policy, retryable=lambda exc: False)
    assert not isinstance(info.value, AttemptTimeoutError)
    assert seen == [1]


@pytest.mark.parametrize("jitter", ["full", "proportional", "none"])
def test_backoff_delays_are_bounded(jitter):
    policy = RetryPolicy(attempts=10, base_delay=0.5, max_delay=4.0, jitter=jitter)
    for attempt in range(10):
        ceiling = min(4.0, 0.5 * 2 ** attempt)
        delays = [policy.delay(attempt) for _ in range(200)]
        if jitter == "full":
            assert all(0.0 <= d <= ceiling for d in delays)
        elif jitter == "proportional":
            assert all(0.5 * ceiling <= d <= 1.5 * ceiling for d in delays)
        else:
            assert delays == [ceiling] * 200


async def test_waits_between_attempts_follow_the_policy():
    operation, seen = failing(10)
    failures: list[Failure] = []
    policy = RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.004, timeout=None)
    started = time.perf_counter()
    with pytest.raises(Flaky):
        await retry_async(operation, policy, retryable=is_flaky, on_failure=failures.append)
    assert seen == [1, 2, 3, 4, 5, 6]
    delays = [f.delay for f in failures[:-1]]
    assert all(d is not None and 0.0 <= d <= min(0.004, 0.001 * 2 ** n) for n, d in enumerate(delays))
    assert failures[-1].delay is None
    assert time.perf_counter() - started < 5


async def test_cancelled_error_propagates_at_once():
    operation, seen = failing(5, error=asyncio.CancelledError)
    failures: list[Failure] = []
    with pytest.raises(asyncio.CancelledError):
        await retry_async(operation, FAST, retryable=lambda exc: True, on_failure=failures.append,
                          give_up=lambda f: RuntimeError("must not give up"))
    assert seen == [1] and failures == []


async def test_cancelling_the_caller_during_an_attempt_or_a_wait_stops_at_once():
    started_attempt = asyncio.Event()
    seen: list[int] = []

    async def hangs(attempt: int) -> str:
        seen.append(attempt)
        started_attempt.set()
        await asyncio.sleep(30)
        return "never"

    task = asyncio.create_task(retry_async(hangs, RetryPolicy(attempts=3, timeout=20.0), retryable=lambda exc: True))
    await asyncio.wait_for(started_attempt.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert seen == [1]

    # Cancelled while waiting before the second attempt (a long backoff): no second attempt.
    operation, seen = failing(5)
    failures: list[Failure] = []
    slow = RetryPolicy(attempts=3, base_delay=30.0, max_delay=30.0, timeout=None, jitter="none")
    task = asyncio.create_task(retry_async(operation, slow, retryable=is_flaky, on_failure=failures.append))
    for _ in range(100):
        if failures:
            break
        await asyncio.sleep(0.01)
    assert len(failures) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert seen == [1]


def test_policy_needs_an_attempt_and_a_known_jitter():
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter="sometimes")  # type: ignore[arg-type]


# --- ChatBackend's retries, on the helper ----------------------------------------------------


class ScriptedBackend(ChatBackend):
    """Raises the scripted errors one attempt after another, then answers."""

    def __init__(self, name: str, errors: list[BaseException], retry: RetryPolicy) -> None:
        super().__init__("scripted-model", retry=retry)
        self.name = name
        self.errors = list(errors)
        self.calls = 0

    async def _chat_once(self, request: ChatRequest) -> Completion:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return Completion(text="hello", model="", prompt_tokens=3, completion_tokens=1)


def ask() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", "hi")])


def llm_count(backend: str, outcome: str) -> float:
    labels = {"backend": backend, "operation": "chat", "outcome": outcome}
    return REGISTRY.get_sample_value("stablealign_llm_requests_total", labels) or 0.0


BACKEND_RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002, timeout=5.0)


async def test_backend_retries_transient_failures_and_counts_attempts():
    backend = ScriptedBackend("scripted-ok", [RetryableBackendError("HTTP 503"), TimeoutError()], BACKEND_RETRY)
    completion = await backend.chat(ask())
    assert completion.text == "hello" and completion.model == "scripted-model"
    assert completion.attempts == 3 and backend.calls == 3
    assert llm_count("scripted-ok", "retry") == 2
    assert llm_count("scripted-ok", "ok") == 1
    assert llm_count("scripted-ok", "error") == 0


@pytest.mark.parametrize("error", [BackendError("HTTP 400: bad"), ValidationError("bad request")])
async def test_backend_final_errors_are_not_retried(error):
    name = f"scripted-final-{type(error).__name__}"
    backend = ScriptedBackend(name, [error, error], BACKEND_RETRY)
    with pytest.raises(type(error)):
        await backend.chat(ask())
    assert backend.calls == 1
    assert llm_count(name, "error") == 1 and llm_count(name, "retry") == 0


async def test_backend_wraps_unclassified_errors():
    backend = ScriptedBackend("scripted-odd", [KeyError("odd")], BACKEND_RETRY)
    with pytest.raises(BackendError, match="scripted-odd: KeyError"):
        await backend.chat(ask())
    assert backend.calls == 1


async def test_backend_gives_up_after_its_attempts():
    backend = ScriptedBackend("scripted-down", [RetryableBackendError(f"HTTP 503 #{i}") for i in range(5)],
                              BACKEND_RETRY)
    with pytest.raises(BackendError, match="scripted-down: gave up after 3 attempts: HTTP 503 #2"):
        await backend.chat(ask())
    assert backend.calls == 3
    assert llm_count("scripted-down", "retry") == 3 and llm_count("scripted-down", "error") == 1


async def test_backend_does_not_retry_cancellation():
    backend = ScriptedBackend("scripted-cancel", [asyncio.CancelledError()], BACKEND_RETRY)
    with pytest.raises(asyncio.CancelledError):
        await backend.chat(ask())
    assert backend.calls == 1
    assert llm_count("scripted-cancel", "retry") == 0 and llm_count("scripted-cancel", "error") == 0


# --- create_world: "unavailable" tried again, a conflict after a retry is our own world -------


async def test_create_world_retries_unavailable_and_finds_its_own_world(monkeypatch):
    from services.world.client import WorldClient
    from stablealign.core.errors import ConflictError, UnavailableError
    from stablealign.nats import client as nats_client
    from stablealign.nats import subjects
    from stablealign.v1 import world_pb2

    replies: list[BaseException | world_pb2.World] = [UnavailableError("no reply"), ConflictError("exists")]
    sent: list[str] = []

    async def fake_request(nc, subject, message, response_type, **kwargs):
        sent.append(subject)
        if subject == subjects.WORLD_GET:
            return world_pb2.World(spec=world_pb2.WorldSpec(world_id=message.world_id))
        reply = replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    monkeypatch.setattr(nats_client, "request", fake_request)
    world = await WorldClient(None).create_world(world_pb2.WorldSpec(world_id="w-mine"))
    assert world.spec.world_id == "w-mine"
    assert sent == [subjects.WORLD_CREATE, subjects.WORLD_CREATE, subjects.WORLD_GET]

    sent.clear()
    replies[:] = [ConflictError("taken")]  # on the first try a conflict is a real one
    with pytest.raises(ConflictError):
        await WorldClient(None).create_world(world_pb2.WorldSpec(world_id="w-taken"))
    assert sent == [subjects.WORLD_CREATE]

    sent.clear()
    replies[:] = [UnavailableError(f"no reply {i}") for i in range(5)]
    with pytest.raises(UnavailableError, match="no reply 2"):
        await WorldClient(None).create_world(world_pb2.WorldSpec(world_id="w-down"))
    assert sent == [subjects.WORLD_CREATE] * 3
