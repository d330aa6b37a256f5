"""LLM endpoints an operator configured, keys only to their own URL, 4xx refusals final and said as such.

Real parts only: a real nats-server, the agent, observer and world services in-process, and the
devservers' OpenAI/TGI servers — one of them playing an attacker who names itself in a world spec
(or forges the world straight into the SANDBOX_WORLDS bucket, as anyone on the bus could) to
collect the service's ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import logging
import time

import pytest
from aiohttp import web

from stablealign.core.errors import BackendError, ConflictError, LLMRequestError, ValidationError
from stablealign.core.logs import ConsoleFormatter, JsonFormatter
from stablealign.core.redaction import redact_text
from stablealign.core.retry import RetryPolicy
from stablealign.llm.backends import close_backends, make_chat_backend
from stablealign.llm.backends.base import ChatMessage, ChatRequest
from stablealign.llm.backends.openai_backend import OpenAIChatBackend
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.v1 import agent_pb2, common_pb2, world_pb2
from tests.integration.test_agent_service import put_world
from tests.integration.test_world_service import small_spec, start, wait_final
from tests.support.devservers import FakeOpenAIServer, FakeTGIServer
from tests.support.endpoints import allow_endpoints

REAL_KEY = "sk-the-services-real-key-0123456789"
QUESTION = "Is it fine to borrow a friend's bike without asking?"


async def create(nc, spec: world_pb2.WorldSpec) -> world_pb2.World:
    return await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec), world_pb2.World,
                             timeout=30, attempts=1)


def draft_request(world_id: str) -> agent_pb2.DraftRequest:
    return agent_pb2.DraftRequest(world_id=world_id, agent_id=0, round=0, question=QUESTION,
                                  question_embedding=[0.1] * 16)


def no_real_key_reached(server: FakeOpenAIServer) -> bool:
    return not any(REAL_KEY in header for header in server.authorizations)


async def test_the_services_key_goes_only_to_the_url_it_was_configured_for(nats_url, nc, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    async with FakeOpenAIServer() as legit, FakeOpenAIServer() as attacker:
        monkeypatch.setenv("OPENAI_BASE_URL", legit.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", REAL_KEY)
        monkeypatch.delenv("STABLEALIGN_LLM_ENDPOINTS", raising=False)
        services = [await start("agent", nats_url), await start("world", nats_url)]
        try:
            evil = common_pb2.ModelRef(backend="openai", model="fake-gpt", url=attacker.base_url)
            # 1. CreateWorld naming the attacker: refused (INVALID_ARGUMENT), nothing sent anywhere.
            with pytest.raises(ValidationError, match=r"agent_model\.url http://127\.0\.0\.1:\d+/v1 is not a "
                                                      r"configured openai endpoint"):
                await create(nc, small_spec("evil", agent_model=evil))
            # 2. The bus forged: the world written straight into the bucket, a draft asked of the agents.
            #    The agent, which holds the key, refuses to build a client for the URL.
            await put_world(nc, "forged", agent_model=evil)
            with pytest.raises(ConflictError, match="not a configured openai endpoint"):
                await nats_client.request(nc, subjects.AGENT_DRAFT, draft_request("forged"), agent_pb2.DraftResponse,
                                  timeout=20, attempts=1)
            assert attacker.requests_total == 0
            # 3. The operator's own server (OPENAI_BASE_URL) gets the key.
            await put_world(nc, "legit", agent_model=common_pb2.ModelRef(backend="openai", model="fake-gpt"))
            reply = await nats_client.request(nc, subjects.AGENT_DRAFT, draft_request("legit"), agent_pb2.DraftResponse,
                                      timeout=20, attempts=1)
            assert reply.answer and legit.authorizations[f"Bearer {REAL_KEY}"] >= 1
            # 4. An endpoint the operator adds without a key is called, without the service's key.
            allow_endpoints(monkeypatch, attacker.base_url)
            reply = await nats_client.request(nc, subjects.AGENT_DRAFT, draft_request("forged"), agent_pb2.DraftResponse,
                                      timeout=20, attempts=1)
            assert reply.answer and attacker.requests_total >= 1 and no_real_key_reached(attacker)
            # 5. ... and with its own key (key_env) it gets that key, still never the service's.
            monkeypatch.setenv("ATTACKER_ENDPOINT_KEY", "sk-its-own-key-for-that-server")
            allow_endpoints(monkeypatch, attacker.base_url, key_env="ATTACKER_ENDPOINT_KEY")
            await put_world(nc, "keyed", agent_model=common_pb2.ModelRef(backend="openai", model="other-model",
                                                                         url=attacker.base_url))
            await nats_client.request(nc, subjects.AGENT_DRAFT, draft_request("keyed"), agent_pb2.DraftResponse, timeout=20,
                              attempts=1)
            assert attacker.authorizations["Bearer sk-its-own-key-for-that-server"] >= 1
            assert no_real_key_reached(attacker)
        finally:
            for service in reversed(services):
                await service.stop(grace=1.0)
            await close_backends()
    assert REAL_KEY not in caplog.text


@pytest.mark.parametrize(("status", "said"), [
    (401, "refused the API key (401)"),
    (403, "refused the API key (403)"),
    (404, "refused the request (HTTP 404, not retried)"),
    (422, "refused the request (HTTP 422, not retried)"),
])
async def test_an_llm_4xx_fails_the_world_at_once_with_status_and_reason(nats_url, nc, monkeypatch, status, said):
    """Issue 9's leftover: a 4xx used to count against the error budget (20 tries in a row) and be retried
    until it was spent; now the step fails at once, the world FAILED naming the step, status and endpoint."""
    async with FakeOpenAIServer(error_rate=1.0, error_statuses=(status,)) as llm:
        monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", REAL_KEY)
        model = common_pb2.ModelRef(backend="openai", model="fake-gpt")
        services = [await start("agent", nats_url), await start("observer", nats_url),
                    await start("world", nats_url, error_budget_consecutive=20, failure_backoff_max_seconds=0.2)]
        try:
            started = time.monotonic()
            await create(nc, small_spec("refused", size=2, rounds=1, agent_model=model, observer_model=model))
            world = await wait_final(nc, "refused", timeout=20)
            assert world.state == world_pb2.WORLD_STATE_FAILED
            assert time.monotonic() - started < 10
            assert "draft" in world.error and said in world.error, world.error
            assert f"the openai endpoint at {llm.base_url}" in world.error and REAL_KEY not in world.error
            # One call per interaction (4 agents, in flight together), none retried.
            assert llm.requests_total <= 4 and world.interaction_retries == 0
        finally:
            for service in reversed(services):
                await service.stop(grace=1.0)
            await close_backends()


async def test_retryable_4xx_are_still_retried_and_others_are_not():
    fast = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, timeout=5.0)
    request = ChatRequest(messages=[ChatMessage("user", QUESTION)], max_tokens=8)
    async with FakeOpenAIServer() as llm:
        backend = OpenAIChatBackend("fake-gpt", base_url=llm.base_url, api_key="sk-x", retry=fast)
        try:
            llm.fail_next(408, 409)  # a timeout and a conflict: worth another attempt
            assert (await backend.chat(request)).attempts == 3
            llm.fail_next(400)
            before = llm.requests_total
            with pytest.raises(LLMRequestError, match=r"HTTP 400, not retried") as caught:
                await backend.chat(request)
            assert llm.requests_total == before + 1 and caught.value.status == 400
        finally:
            await backend.aclose()


async def test_tgi_refusals_and_a_per_endpoint_key(monkeypatch):
    async with FakeTGIServer(fail_statuses=(401,)) as tgi:
        monkeypatch.setenv("TGI_PROXY_TOKEN", "hf_proxy-token-abcdef")
        allow_endpoints(monkeypatch, tgi.base_url, key_env="TGI_PROXY_TOKEN", backend="tgi")
        backend = make_chat_backend(common_pb2.ModelRef(backend="tgi", url=tgi.base_url))
        request = ChatRequest(messages=[ChatMessage("user", QUESTION)], max_tokens=8)
        try:
            with pytest.raises(LLMRequestError, match=r"the tgi endpoint at http://127.0.0.1:\d+ refused the API "
                                                      r"key \(401\)"):
                await backend.chat(request)
            assert tgi.requests_total == 1  # not retried
            assert (await backend.chat(request)).text
            assert tgi.authorizations["Bearer hf_proxy-token-abcdef"] == 2
        finally:
            await backend.aclose()


async def test_an_hf_model_path_forged_into_a_spec_is_not_loaded_by_the_agent(nats_url, nc, monkeypatch, tmp_path):
    """A world written straight into SANDBOX_WORLDS naming an hf "model" outside STABLEALIGN_MODEL_ROOTS
    (``..`` out of a root, an absolute path elsewhere, a symlink out): the agent, which would load it,
    refuses, naming the field and the setting; nothing is read from the path."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")  # looks like a model directory: only the roots keep it out
    (root / "escape").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("STABLEALIGN_MODEL_ROOTS", str(root))
    services = [await start("agent", nats_url), await start("world", nats_url)]
    try:
        for world_id, path in (("climb", f"{root}/../outside"), ("absolute", str(outside)),
                               ("symlink", str(root / "escape"))):
            await put_world(nc, world_id, agent_model=common_pb2.ModelRef(backend="hf", model=path))
            with pytest.raises(ConflictError, match=r"model '.+' is outside the allowed directories "
                                                    r"\(STABLEALIGN_MODEL_ROOTS\)"):
                await nats_client.request(nc, subjects.AGENT_DRAFT, draft_request(world_id), agent_pb2.DraftResponse,
                                  timeout=20, attempts=1)
    finally:
        for service in reversed(services):
            await service.stop(grace=1.0)
        await close_backends()


# A custom endpoint's key of no known shape (not sk-/hf_...): only "it is configured" can hide it.
CUSTOM_KEY = "proxy-Zq81mV0x-custom-key"


class KeyEchoingServer:
    """A real HTTP server on 127.0.0.1 that refuses every request with ``status`` and quotes the key it was
    sent, bare, in its error body — as some proxies and misconfigured servers do."""

    def __init__(self) -> None:
        self.status = 401
        self.keys_seen: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _any(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        self.keys_seen.append(key)
        message = f"the key {key} is not valid for this server"
        return web.json_response({"error": {"message": message, "type": "invalid_request_error"}, "message": message},
                                 status=self.status)

    async def __aenter__(self) -> KeyEchoingServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize("backend", ["openai", "tgi"])
async def test_a_custom_endpoint_key_echoed_by_the_server_is_in_no_error_and_no_log(monkeypatch, caplog, backend):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CUSTOM_PROXY_KEY", CUSTOM_KEY)
    request = ChatRequest(messages=[ChatMessage("user", QUESTION)], max_tokens=8)
    async with KeyEchoingServer() as server:
        url = server.base_url + ("/v1" if backend == "openai" else "")
        allow_endpoints(monkeypatch, url, key_env="CUSTOM_PROXY_KEY", backend=backend)
        client = make_chat_backend(common_pb2.ModelRef(backend=backend, model="m", url=url))
        client.retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, timeout=5.0)
        try:
            for status in (401, 500):
                server.status = status
                with pytest.raises(BackendError) as caught:
                    await client.chat(request)
                error = caught.value
                assert server.keys_seen[-1] == CUSTOM_KEY  # the server had the key and quoted it ...
                chain, cause = [], error.__cause__
                while cause is not None:
                    chain.append(str(cause))
                    cause = cause.__cause__ or cause.__context__
                assert any(CUSTOM_KEY in text for text in chain), (status, chain)  # ... the raw error holds it
                assert CUSTOM_KEY not in str(error), (status, str(error))
                assert ("refused the API key (401)" in str(error)) == (status == 401), str(error)
                # A log line with the whole traceback (the raw cause included) does not carry it either.
                record = logging.LogRecord("t", logging.ERROR, __file__, 1, "llm.failed", None,
                                           (type(error), error, error.__traceback__))
                record.error = str(error.__cause__)
                for formatter in (JsonFormatter(), ConsoleFormatter()):
                    line = formatter.format(record)
                    assert "llm.failed" in line and CUSTOM_KEY not in line
        finally:
            await client.aclose()
    assert len(server.keys_seen) >= 3  # 401 once (final), 500 retried
    assert CUSTOM_KEY not in caplog.text
    assert redact_text(f"x {CUSTOM_KEY} y") == "x *** y"
