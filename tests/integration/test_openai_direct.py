"""The openai backend's direct POST (backends/openai_http.py) sends what the SDK would: its URL, key and
headers, through the environment's proxy unless NO_PROXY exempts the host; a client whose auth is not a
fixed key stays on the SDK."""

from __future__ import annotations

import openai
import pytest
from aiohttp import web

from stablealign.core.errors import BackendError
from stablealign.core.metrics import free_port
from stablealign.llm.backends.base import ChatMessage, ChatRequest, RetryPolicy
from stablealign.llm.backends.openai_backend import OpenAIChatBackend
from stablealign.llm.backends.openai_http import DirectChatCompletions
from tests.support.devservers import FakeOpenAIServer

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, timeout=10.0)


class HeaderRecordingServer(FakeOpenAIServer):
    """The fake OpenAI server, keeping the headers of every chat request."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.headers: list[dict[str, str]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return await super().chat(request)


def ask() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", "Question: Why is the sky blue?")], seed=1)


async def test_the_direct_post_sends_the_sdks_url_key_and_headers(monkeypatch):
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    async with HeaderRecordingServer() as server:
        backend = OpenAIChatBackend("fake-gpt", base_url=server.base_url, api_key="sk-direct", retry=FAST_RETRY)
        try:
            assert backend._direct is not None  # noqa: SLF001 - the path under test
            reply = await backend.chat(ask())
            sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-direct", max_retries=0)
            await sdk.chat.completions.create(model="fake-gpt", messages=[{"role": "user", "content": "hi"}])
            await sdk.close()
        finally:
            await backend.aclose()
    assert reply.text and reply.model == "fake-gpt"
    direct, through_sdk = server.headers
    assert direct["authorization"] == "Bearer sk-direct"
    for name in ("user-agent", "x-stainless-lang", "x-stainless-package-version", "content-type", "accept"):
        assert direct[name] == through_sdk[name], name


async def test_the_environments_proxy_is_used_unless_no_proxy_exempts_the_host(monkeypatch):
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request through it cannot connect
    async with FakeOpenAIServer() as server:
        monkeypatch.setenv("HTTP_PROXY", dead_proxy)
        monkeypatch.setenv("NO_PROXY", "")
        backend = OpenAIChatBackend("fake-gpt", base_url=server.base_url, api_key="sk-test", retry=FAST_RETRY)
        try:
            with pytest.raises(BackendError, match="[Cc]onnect"):
                await backend.chat(ask())
        finally:
            await backend.aclose()
        assert server.requests_total == 0
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        backend = OpenAIChatBackend("fake-gpt", base_url=server.base_url, api_key="sk-test", retry=FAST_RETRY)
        try:
            assert (await backend.chat(ask())).text
        finally:
            await backend.aclose()


def test_a_client_with_a_key_provider_stays_on_the_sdk():
    async def key() -> str:
        return "sk-rotating"

    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key=key, max_retries=0)
    assert not DirectChatCompletions.supports(client)
    assert DirectChatCompletions.supports(openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-fixed"))
