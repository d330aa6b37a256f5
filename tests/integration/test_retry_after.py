"""A server's Retry-After is honoured by the openai and tgi backends, measured on the server's side.

Real HTTP servers (tests/support/devservers.py) reply 429/503 with a Retry-After header; the time
between the failed request's arrival and the next one is at least that long (up to the backend's
``max_retry_after``), in seconds or as an HTTP date. The SDK's own retries stay off: every attempt
is one request that the server counts.
"""

from __future__ import annotations

import email.utils
import time

import pytest

from stablealign.core.errors import BackendError
from stablealign.llm.backends.base import ChatMessage, ChatRequest, RetryPolicy
from stablealign.llm.backends.openai_backend import OpenAIChatBackend
from stablealign.llm.backends.tgi import TGIChatBackend
from tests.support.devservers import FakeOpenAIServer, FakeTGIServer

pytestmark = pytest.mark.timeout(60)

# Backoff of a few milliseconds: any longer wait is the server's Retry-After.
FAST = RetryPolicy(attempts=3, base_delay=0.005, max_delay=0.01, timeout=10.0)
QUESTION = ChatRequest(messages=[ChatMessage("user", "Question: Why is the sky blue?\nAnswer:")], seed=1)


def backend(kind: str, server, **kwargs):
    kwargs.setdefault("retry", FAST)
    if kind == "openai":
        return OpenAIChatBackend("fake-gpt", base_url=server.base_url, api_key="sk-test", **kwargs)
    return TGIChatBackend(server.base_url, **kwargs)


SERVERS = {"openai": FakeOpenAIServer, "tgi": FakeTGIServer}


def gaps(server) -> list[float]:
    times = [arrived for arrived, _, _ in server.request_log]
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("kind", ["openai", "tgi"])
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_waited_before_the_next_attempt(kind, status):
    async with SERVERS[kind](fail_statuses=[status], retry_after="1") as server:
        chat = backend(kind, server)
        try:
            reply = await chat.chat(QUESTION)
        finally:
            await chat.aclose()
    assert reply.text and reply.attempts == 2
    assert [s for _, _, s in server.request_log] == [status, 200]
    assert gaps(server)[0] >= 1.0, gaps(server)


@pytest.mark.parametrize("kind", ["openai", "tgi"])
async def test_retry_after_as_an_http_date(kind):
    # Whole seconds: a date 2 s ahead is 1-2 s away when the reply is read.
    async with SERVERS[kind](fail_statuses=[429]) as server:
        server.retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)
        chat = backend(kind, server)
        try:
            reply = await chat.chat(QUESTION)
        finally:
            await chat.aclose()
    assert reply.attempts == 2
    assert 0.9 <= gaps(server)[0] <= 5.0, gaps(server)


@pytest.mark.parametrize("kind", ["openai", "tgi"])
async def test_a_long_retry_after_is_capped(kind):
    async with SERVERS[kind](fail_statuses=[429], retry_after="120") as server:
        chat = backend(kind, server, max_retry_after=0.3)
        try:
            reply = await chat.chat(QUESTION)
        finally:
            await chat.aclose()
    assert reply.attempts == 2
    assert 0.3 <= gaps(server)[0] < 5.0, gaps(server)


async def test_no_retry_inside_a_retry_the_sdk_sends_each_attempt_once():
    """Our attempts are the only ones: 3 attempts are 3 requests, then the call gives up (bounded)."""
    async with FakeOpenAIServer(fail_statuses=[429, 500, 429, 500], retry_after="0.2") as server:
        chat = backend("openai", server)
        try:
            with pytest.raises(BackendError, match="gave up after 3 attempts"):
                await chat.chat(QUESTION)
        finally:
            await chat.aclose()
    assert server.requests_total == 3
    assert [s for _, _, s in server.request_log] == [429, 500, 429]
    first, second = gaps(server)
    assert first >= 0.2 and second < 0.2  # the 500 carried no Retry-After: plain backoff
