"""The deadline of one LLM call (stablealign.llm.calls): a hung model is cancelled and reported by step and model."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from services.agent.settings import AgentSettings
from services.observer.settings import ObserverSettings
from stablealign.core.errors import UnavailableError
from stablealign.llm.backends.base import ChatBackend, ChatMessage, ChatRequest, Completion, RetryPolicy
from stablealign.llm.calls import CallTally, chat_until_rated, llm_deadline, within_deadline


class HungBackend(ChatBackend):
    """Never answers; counts the attempts that started and those that were cancelled."""

    name = "openai"

    def __init__(self) -> None:
        super().__init__("gpt-hung", retry=RetryPolicy(attempts=5, base_delay=0.0, timeout=None))
        self.started = self.cancelled = 0

    async def _chat_once(self, request: ChatRequest) -> Completion:
        self.started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def test_the_deadline_of_a_local_model_is_the_local_one():
    settings = AgentSettings(llm_deadline_seconds=7, local_llm_deadline_seconds=70)
    local = type("Local", (), {"name": "hf"})()
    assert llm_deadline(settings, local) == 70
    assert llm_deadline(settings, HungBackend()) == 7
    assert ObserverSettings().llm_deadline_seconds <= 120  # a hung model is reported within two minutes


async def test_a_hung_call_is_cancelled_and_named_at_the_deadline():
    backend = HungBackend()
    request = ChatRequest(messages=[ChatMessage("user", "hi")])
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=r"^draft: model openai:gpt-hung made no progress for 0.3s"):
        await within_deadline(backend.chat(request), deadline=0.3, step="draft", backend=backend,
                              context={"agent_id": 1, "round": 0})
    assert 0.3 <= time.monotonic() - started < 2.0
    assert backend.started == backend.cancelled == 1  # no second attempt, none left running


async def test_the_calls_own_timeout_is_not_taken_for_the_deadline():
    async def times_out() -> None:
        raise TimeoutError("the client's own timeout")

    with pytest.raises(TimeoutError, match="client's own"):
        await within_deadline(times_out(), deadline=5.0, step="draft", backend=HungBackend())
    assert await within_deadline(asyncio.sleep(0, result=3), deadline=None, step="draft", backend=None) == 3


async def test_a_hung_rating_call_names_its_step():
    backend = HungBackend()

    def request_for(attempt: int) -> ChatRequest:
        return ChatRequest(messages=[ChatMessage("user", "rate")], seed=attempt)

    with pytest.raises(UnavailableError, match=r"^feedback: model openai:gpt-hung made no progress for 0.2s"):
        await chat_until_rated(backend, CallTally(), 3, request_for, deadline=0.2, step="feedback")
    assert backend.started == backend.cancelled == 1  # the unparsable-reply retries never started


class TakesTurns(ChatBackend):
    """Answers after ``service`` seconds, one call at a time (its limit: one place), optionally streaming:
    ``progressed()`` after each of ``chunks`` pieces of the answer."""

    name = "openai"

    def __init__(self, service: float, *, chunks: int = 1) -> None:
        super().__init__("gpt-turns", max_concurrency=1, endpoint="http://127.0.0.1:9/v1",
                         retry=RetryPolicy(attempts=1, timeout=None))
        self.service, self.chunks = service, chunks
        self.answered = 0

    async def _chat_once(self, request: ChatRequest) -> Completion:
        from stablealign.llm import progress

        for _ in range(self.chunks):
            await asyncio.sleep(self.service / self.chunks)
            progress.progressed()
        self.answered += 1
        return Completion("ok", self.model, 1, 1)


async def test_time_waiting_for_a_place_is_not_time_without_progress():
    backend = TakesTurns(0.1)
    request = ChatRequest(messages=[ChatMessage("user", "hi")])
    started = time.monotonic()
    replies = await asyncio.gather(*(within_deadline(backend.chat(request), deadline=0.25, step="draft",
                                                     backend=backend) for _ in range(5)))
    assert time.monotonic() - started >= 0.5  # the last call waited 0.4 s for its place, past the deadline
    assert [r.text for r in replies] == ["ok"] * 5 and backend.answered == 5


async def test_a_streamed_token_starts_the_clock_again():
    backend = TakesTurns(0.6, chunks=6)  # a token every 0.1 s, 0.6 s in all
    reply = await within_deadline(backend.chat(ChatRequest(messages=[ChatMessage("user", "hi")])), deadline=0.25,
                                  step="revise", backend=backend)
    assert reply.text == "ok"


async def test_the_error_says_what_which_endpoint_and_how_long():
    backend = TakesTurns(0.6)  # no token for 0.6 s
    calls = [within_deadline(backend.chat(ChatRequest(messages=[ChatMessage("user", "hi")])), deadline=0.25,
                             step="feedback", backend=backend) for _ in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, UnavailableError) for r in results)
    first, second = str(results[0]), str(results[1])
    assert re.match(r"feedback: model openai:gpt-turns at http://127\.0\.0\.1:9/v1 made no progress for 0\.25s "
                    r"\(llm_deadline_seconds; 0\.[23]s since the call began\); the call was cancelled$", first), first
    # The second waited for the first's place (0.25 s) before its own 0.25 s without progress.
    assert re.search(r"; 0\.[5-7]s since the call began, 0\.[23]s of it waiting for a place under the backend's "
                     r"concurrency limit\)", second), second
    assert backend.answered == 0 and backend.limiter.in_flight == 0


async def test_a_call_cancelled_at_its_deadline_lowers_an_adaptive_limit():
    class HungRemote(HungBackend):
        def __init__(self) -> None:
            ChatBackend.__init__(self, "gpt-hung", retry=RetryPolicy(attempts=1, timeout=None), adaptive=True,
                                 endpoint="http://127.0.0.1:9/v1")
            self.started = self.cancelled = 0

    backend = HungRemote()
    before = backend.limiter.adaptive.limit
    with pytest.raises(UnavailableError):
        await within_deadline(backend.chat(ChatRequest(messages=[ChatMessage("user", "hi")])), deadline=0.1,
                              step="draft", backend=backend)
    assert backend.limiter.adaptive.limit < before and backend.limiter.in_flight == 0
    task = asyncio.create_task(backend.chat(ChatRequest(messages=[ChatMessage("user", "hi")])))
    await asyncio.sleep(0.05)
    task.cancel()  # cancelled by someone else (a world stopping): says nothing of the server
    await asyncio.gather(task, return_exceptions=True)
    assert backend.limiter.adaptive.epoch == 1 and backend.limiter.in_flight == 0
