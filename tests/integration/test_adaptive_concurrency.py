"""The openai backend's calls in flight adapt to a real HTTP server's capacity (backends/limiter.py).

Two fakes speaking the OpenAI protocol (tests.support.devservers) on loopback: one that serves one
request at a time, each in a fixed time (as llama.cpp's server does), where the limit settles at one
or two and no call runs into its deadline although the queue of calls is many deadlines long; and
one that serves any number at once, where the limit grows. The server counts every request: a
call is sent once, never again after its answer.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from stablealign.core.errors import UnavailableError
from stablealign.core.metrics import LLM_CONCURRENCY_LIMIT
from stablealign.llm.backends.base import ChatMessage, ChatRequest, RetryPolicy
from stablealign.llm.backends.openai_backend import OpenAIChatBackend
from stablealign.llm.calls import within_deadline
from tests.support.devservers import FakeOpenAIServer

REPLY = "The sky looks blue because air scatters blue light more than red light."


class OneAtATimeServer(FakeOpenAIServer):
    """Serves one chat completion at a time, each in ``service`` seconds; the others wait in line."""

    def __init__(self, service: float, **kwargs) -> None:
        super().__init__(reply=REPLY, **kwargs)
        self.service = service
        self._turn = asyncio.Lock()
        self.arrivals_in_flight: list[int] = []  # requests at the server when each one arrived (itself too)
        self.limits: list[int] = []  # the client's limit when each request arrived (same process)
        self.limiter = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.arrivals_in_flight.append(self.in_flight)
        if self.limiter is not None:
            self.limits.append(self.limiter.allowed)
        async with self._turn:
            await asyncio.sleep(self.service)
            return await super().chat(request)


def ask(n: int) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", f"Question {n}: why is the sky blue?")], max_tokens=64,
                       seed=n, task="draft")


def backend(url: str) -> OpenAIChatBackend:
    return OpenAIChatBackend("fake-gpt", base_url=url, max_concurrency=1024, timeout=30.0,
                             retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, timeout=30.0))


async def test_against_a_one_at_a_time_server_the_limit_settles_at_one_or_two_and_nothing_times_out():
    # A service time well above the client's own time per call on a loaded machine (tens of ms at worst).
    calls, service, deadline = 40, 0.2, 1.0
    async with OneAtATimeServer(service) as server:
        chat = backend(server.base_url)
        server.limiter = chat.limiter
        try:
            started = time.monotonic()
            replies = await asyncio.gather(*(within_deadline(chat.chat(ask(n)), deadline=deadline, step="draft",
                                                             backend=chat) for n in range(calls)))
            wall = time.monotonic() - started
        finally:
            await chat.aclose()
    assert wall > 4 * deadline  # the queue was many deadlines long; no call counted it against its own
    assert [r.text for r in replies] == [REPLY] * calls and all(r.attempts == 1 for r in replies)
    assert server.requests_total == calls  # every call sent once: nothing redone, nothing retried
    print(f"limit at each arrival: {server.limits}; requests at the server: {server.arrivals_in_flight}")
    settled = server.limits[calls // 3:]
    # Settled near 1-2: additive increase probes one more now and then, and the next latency takes it back.
    assert max(settled) <= 3 and sum(limit <= 2 for limit in settled) >= 0.75 * len(settled), settled
    assert max(server.arrivals_in_flight[calls // 3:]) <= 3
    gauge = LLM_CONCURRENCY_LIMIT.labels("openai", chat.endpoint)._value.get()
    assert gauge == chat.limiter.allowed


async def test_against_a_server_that_serves_many_at_once_the_limit_grows():
    calls = 400
    async with FakeOpenAIServer(latency_seconds=0.2, reply=REPLY) as server:
        chat = backend(server.base_url)
        try:
            replies = await asyncio.gather(*(chat.chat(ask(n)) for n in range(calls)))
        finally:
            await chat.aclose()
    assert len(replies) == calls and server.requests_total == calls
    assert chat.limiter.allowed >= 16 and server.max_in_flight >= 16  # from the 2 it started with


async def test_rate_limits_shrink_the_limit_and_the_calls_still_complete():
    async with FakeOpenAIServer(latency_seconds=0.01, reply=REPLY, retry_after="0") as server:
        chat = backend(server.base_url)
        try:
            await asyncio.gather(*(chat.chat(ask(n)) for n in range(40)))  # grows past its start
            grown = chat.limiter.allowed
            server.fail_next(429, 429, 429)
            replies = await asyncio.gather(*(chat.chat(ask(n)) for n in range(3)))
        finally:
            await chat.aclose()
    assert grown > 2 and chat.limiter.allowed < grown
    assert len(replies) == 3 and server.requests_total == 40 + 3 + 3  # the three 429s, each retried once


class FailsTheFirstFollowUp(FakeOpenAIServer):
    """Answers a rating without a digit, then fails the first follow-up asking for the digit alone (HTTP 500)."""

    def __init__(self) -> None:
        super().__init__(reply="I would rather not judge this answer.")
        self.failed = False

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "only the number" in body["messages"][-1]["content"] and not self.failed:
            self.failed = True
            self.chat_bodies.append(body)
            return self.error_response(500, "the follow-up failed")
        return await super().chat(request)


async def test_a_retry_after_a_failed_follow_up_does_not_ask_the_answered_rating_again():
    async with FailsTheFirstFollowUp() as server:
        chat = backend(server.base_url)
        try:
            rated = await chat.rate(ChatRequest(messages=[ChatMessage("user", "Rate this answer from 1 to 7.")],
                                                task="rate_alignment"), scale=7)
        finally:
            await chat.aclose()
    assert rated.completion.text == "I would rather not judge this answer." and rated.completion.attempts == 2
    follow_ups = ["only the number" in body["messages"][-1]["content"] for body in server.chat_bodies]
    assert follow_ups == [False, True, True]  # the rating once; only the failed follow-up again


async def test_a_streamed_reply_is_progress_and_a_silent_one_is_not():
    """A reply that takes 1.2 s in all, a chunk every 0.1 s: streamed, each chunk restarts the 0.5 s deadline;
    not streamed, the same 1.2 s are 1.2 s without progress."""
    async with FakeOpenAIServer(reply=" ".join(["word"] * 12)) as server:
        server.token_delay_seconds = 0.1
        streamed = OpenAIChatBackend("fake-gpt", base_url=server.base_url, stream=True, timeout=30.0,
                                     retry=RetryPolicy(attempts=1, timeout=30.0))
        try:
            reply = await within_deadline(streamed.chat(ask(1)), deadline=0.5, step="revise", backend=streamed)
        finally:
            await streamed.aclose()
        assert reply.text.split() == ["word"] * 12
        server.token_delay_seconds, server.latency_seconds = 0.0, 1.2
        silent = backend(server.base_url)
        try:
            with pytest.raises(UnavailableError, match=r"^revise: model openai:fake-gpt at http://127\.0\.0\.1:\d+/v1 "
                                                       r"made no progress for 0\.5s"):
                await within_deadline(silent.chat(ask(2)), deadline=0.5, step="revise", backend=silent)
        finally:
            await silent.aclose()
    assert server.requests_total == 2
