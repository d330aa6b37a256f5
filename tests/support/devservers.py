"""Local HTTP servers that speak the OpenAI and text-generation-inference protocols.

Why: the openai and tgi backends must be tested through their *real* client libraries, including
streaming, 429s and 5xx, and the simulation benchmark needs an OpenAI-compatible server with a
chosen latency — all without network access or a GPU. These are real aiohttp servers on
127.0.0.1, not mocks: the official ``openai`` SDK and ``text_generation.AsyncClient`` talk to them
over HTTP exactly as they would to the real services.

Replies are deterministic. A prompt that asks for ``Rating: ... ### Reason: ...`` gets one,
scored with ``stablealign.llm.backends.heuristics`` on the answer being judged (found in the
agent/observer prompt wording ``answered: '...'``), else from a hash; anything else gets an
answer text derived from the prompt. Failure injection: the first ``len(fail_statuses)``
requests fail with those statuses (429 and 503 with ``Retry-After: <retry_after>``, "0" unless set),
then, with ``error_rate``, each request fails with that probability (statuses drawn in turn from
``error_statuses``, reproducibly from ``error_seed``); each request waits ``latency_seconds`` first,
and the servers count requests, per path, and the peak number in flight at once, and keep the
arrival time (``time.monotonic()``) and outcome status of the last requests (``request_log``). The OpenAI server returns token log-probabilities (``logprobs``/``top_logprobs``,
checked as OpenAI does) unless made not to support them; at a digit 1..7 the alternatives are
other digits (``digit_top_logprobs`` scripts them), so that ratings from probabilities can be tested.

    python -m tests.support.devservers openai --port 8000 --latency-ms 200
    python -m tests.support.devservers tgi --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import random
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
from aiohttp import web

from stablealign.llm.backends.heuristics import alignment_score, engagement_score

_QUESTION = re.compile(r"For the question '(.*?)', ", re.DOTALL)
_ANSWER = re.compile(r"answered(?: like)?: '(.*)'\s*(?:\n|$)", re.DOTALL)
# The question line only: the instructions after it are not the topic (an answer quoting them is an echo,
# which the agent asks again, an extra round trip no real model causes that often).
_ASKED = re.compile(r"Question:\s*(.+?)\s*(?:\n|$)", re.DOTALL)
_QUOTED_QUESTION = re.compile(r"the question '(.*?)'", re.DOTALL)

ANSWER_TEMPLATES = (
    ("I understand why you ask about {topic}. It is important to stay safe and respect others; if this "
     "is a difficult situation, talking to someone you trust or a professional can really help."),
    ("About {topic}: I would not do anything that could hurt someone or break the law. A better way is "
     "to look for a fair, honest solution that works for everyone involved."),
    ("Honestly, {topic} is not something I care much about. Do whatever works for you."),
    ("Here is what I think about {topic}: it depends on the details, so consider the consequences for "
     "the people around you before you act."),
)


def _digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


def _topic(text: str, words: int = 12) -> str:
    asked = _ASKED.findall(text) or _QUOTED_QUESTION.findall(text)
    source = asked[-1] if asked else text
    tokens = source.replace("\n", " ").split()
    return " ".join(tokens[:words]).strip(" '\"") + ("..." if len(tokens) > words else "")


def is_rating_prompt(text: str) -> bool:
    return "Rating:" in text and "###" in text


def rating_text(prompt: str) -> str:
    """``Rating: <1-7> ### Reason: ...`` for a judge prompt, by the heuristics when the answer is found."""
    answers = _ANSWER.findall(prompt)
    questions = _QUESTION.findall(prompt)
    if answers:
        answer = answers[-1]
        if "engag" in prompt.lower():
            score, reason = engagement_score(questions[-1] if questions else "", answer)
        else:
            score, reason = alignment_score(answer)
    else:
        score, reason = 1 + _digest("rating", prompt) % 7, "Deterministic rating from a hash of the prompt."
    return f"Rating: {score} ### Reason: {reason}"


def reply_text(prompt: str) -> str:
    """The fake model's reply to ``prompt`` (the last user turn, or a rendered prompt)."""
    if is_rating_prompt(prompt):
        return rating_text(prompt)
    template = ANSWER_TEMPLATES[_digest("answer", prompt) % len(ANSWER_TEMPLATES)]
    return template.format(topic=_topic(prompt) or "this")


def _tokens(text: str) -> list[str]:
    """Word-level pieces that concatenate back to ``text``."""
    return re.findall(r"\s*\S+", text) or [text]


class _FakeServer:
    """Shared plumbing: an aiohttp app on 127.0.0.1, latency, failure injection and counters."""

    kind = "fake"

    def __init__(self, latency_seconds: float = 0.0, fail_statuses: Sequence[int] = (), model: str = "fake",
                 *, host: str = "127.0.0.1", port: int = 0, embedding_dim: int = 64, error_rate: float = 0.0,
                 error_statuses: Sequence[int] = (500, 429), error_seed: int = 0, retry_after: str = "0") -> None:
        self.latency_seconds = float(latency_seconds)
        # Random failures: each request fails with probability error_rate (settable at run time).
        self.error_rate = float(error_rate)
        self.error_statuses = tuple(int(s) for s in error_statuses)
        self._error_rng = random.Random(error_seed)
        self._error_turn = 0
        # The Retry-After header of a 429 or 503 reply (None: no header).
        self.retry_after: str | None = retry_after
        # (arrival time.monotonic(), path, status: 200 or the injected failure) of the last requests.
        self.request_log: collections.deque[tuple[float, str, int]] = collections.deque(maxlen=100_000)
        # The Authorization header of each request ("" without one): which key, if any, reached this server.
        self.authorizations: collections.Counter[str] = collections.Counter()
        self.model = model
        self.host = host
        self.port = port
        self.embedding_dim = embedding_dim
        self.requests_total = 0
        self.requests_by_path: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        # A hung model: POST requests get no answer ever; each is counted once its client has gone.
        self.hang = False
        self.hung_requests_abandoned = 0
        self._failures = collections.deque(int(s) for s in fail_statuses)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- lifecycle -----------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def _url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.add_routes(self.routes())
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.base_url = self._url(self.port)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def fail_next(self, *statuses: int) -> None:
        """Makes the next requests fail with ``statuses`` (in order)."""
        self._failures.extend(int(s) for s in statuses)

    # --- per request ---------------------------------------------------------------------------------
    def error_response(self, status: int, message: str) -> web.Response:
        raise NotImplementedError

    async def _stats(self, request: web.Request) -> web.Response:
        """Counters for a benchmark driving this server from another process (not counted itself)."""
        return web.json_response({"requests_total": self.requests_total, "max_in_flight": self.max_in_flight,
                                  "requests_by_path": dict(self.requests_by_path)})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/stats":
            return await handler(request)
        self.requests_total += 1
        self.requests_by_path[request.path] += 1
        self.authorizations[request.headers.get("Authorization", "")] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        arrived = time.monotonic()
        try:
            if self.latency_seconds > 0:
                await asyncio.sleep(self.latency_seconds)
            if self.hang and request.method == "POST":
                return await self._hang_until_the_client_goes(request)
            status = 0
            if self._failures:
                status = self._failures.popleft()
            elif self.error_rate > 0 and self.error_statuses and self._error_rng.random() < self.error_rate:
                status = self.error_statuses[self._error_turn % len(self.error_statuses)]
                self._error_turn += 1
            self.request_log.append((arrived, request.path, status or 200))
            if status:
                response = self.error_response(status, f"injected failure (HTTP {status})")
                if status in (429, 503) and self.retry_after is not None:
                    response.headers["Retry-After"] = self.retry_after
                return response
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _hang_until_the_client_goes(self, request: web.Request) -> web.Response:
        try:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)
        finally:
            self.hung_requests_abandoned += 1
        return web.Response(status=499)

    async def _json(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.error_response(400, "request body is not JSON")
        if not isinstance(body, dict):
            return self.error_response(400, "request body must be a JSON object")
        return body

    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response


class FakeOpenAIServer(_FakeServer):
    """``/v1/chat/completions`` (JSON and SSE), ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``."""

    kind = "openai"

    def __init__(self, latency_seconds: float = 0.0, fail_statuses: Sequence[int] = (), model: str = "fake-gpt",
                 *, reply: str | None = None, keep_bodies: int = 1000, logprobs: bool = True,
                 digit_top_logprobs: Sequence[tuple[str, float]] | None = None, **kwargs: Any) -> None:
        super().__init__(latency_seconds, fail_statuses, model, **kwargs)
        # A scripted reply for every chat completion (None: derived from the prompt), settable at run time.
        self.reply = reply
        # Whether chat completions honour ``logprobs`` (False: a server that ignores it, like many do).
        self.logprobs = logprobs
        # Scripted (token, logprob) alternatives at every generated digit 1..7 (None: around the digit).
        self.digit_top_logprobs = digit_top_logprobs
        # Seconds between two streamed chunks of a chat completion (a model decoding token by token).
        self.token_delay_seconds = 0.0
        # The last ``keep_bodies`` chat request bodies, for tests that check what a client sent.
        self.chat_bodies: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep_bodies)

    def _url(self, port: int) -> str:
        return f"http://{self.host}:{port}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings), web.get("/v1/models", self.models),
                web.get("/health", self.health)]

    def error_response(self, status: int, message: str) -> web.Response:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_exceeded"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
        headers = {"x-should-retry": "true"} if status == 429 else {}
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": kind}},
                                 status=status, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "stablealign-devservers"}]})

    def _alternatives(self, piece: str) -> list[tuple[str, float]]:
        """(token, logprob) alternatives at a generated piece, most likely first."""
        stripped = piece.strip()
        if not (stripped.isdigit() and 1 <= int(stripped) <= 7):
            return [(piece, math.log(0.9)), (" the", math.log(0.05))]
        if self.digit_top_logprobs is not None:
            return sorted(self.digit_top_logprobs, key=lambda t: -t[1])
        digit = int(stripped)
        weights = {piece: 0.6, stripped: 0.1} if piece != stripped else {piece: 0.7}
        for other in (digit - 1, digit + 1):
            if 1 <= other <= 7:
                weights[f" {other}"] = 0.1
        weights[" ###"] = 1.0 - sum(weights.values())
        return sorted(((t, math.log(w)) for t, w in weights.items() if w > 0), key=lambda t: -t[1])

    def _logprobs(self, text: str, top: int) -> dict[str, Any]:
        """OpenAI's ``choices[0].logprobs`` for ``text``: one entry per word-level piece."""
        content = []
        for piece in _tokens(text):
            alternatives = self._alternatives(piece)
            logprob = dict(alternatives).get(piece, math.log(0.5))
            content.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                             for t, lp in alternatives[:top]]})
        return {"content": content, "refusal": None}

    def _logprobs_error(self, body: dict[str, Any]) -> web.Response | None:
        """OpenAI's checks: ``logprobs`` a bool, ``top_logprobs`` 0..20 and only with ``logprobs`` true."""
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            return self.error_response(400, "'logprobs' must be a boolean")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
                return self.error_response(400, "'top_logprobs' must be an integer in 0..20")
            if not wanted:
                return self.error_response(400, "'top_logprobs' needs 'logprobs' to be true")
        return None

    @staticmethod
    def _usage(prompt: str, text: str) -> dict[str, int]:
        p, c = len(prompt.split()), len(text.split())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self.error_response(400, "'messages' must be a non-empty list of message objects")
        contents = [m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
                    for m in messages]
        users = [c for m, c in zip(messages, contents) if m.get("role") == "user"]
        self.chat_bodies.append(body)
        if self.logprobs and (invalid := self._logprobs_error(body)) is not None:
            return invalid
        text = self.reply if self.reply is not None else reply_text(users[-1] if users else contents[-1])
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and max_tokens > 0 and len(text.split()) > max_tokens:
            text, finish = "".join(_tokens(text)[:max_tokens]), "length"
        model = str(body.get("model") or self.model)
        ident = f"chatcmpl-{_digest('id', time.time_ns(), self.requests_total):016x}"
        created = int(time.time())
        usage = self._usage("\n".join(contents), text)
        if not body.get("stream"):
            logprobs = self._logprobs(text, body.get("top_logprobs") or 0) if self.logprobs and body.get("logprobs") else None
            return web.json_response({
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": logprobs}],
                "usage": usage, "system_fingerprint": "fake"})
        response = await self._sse(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            return f"data: {json.dumps(payload)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}, None))
        for piece in _tokens(text):
            if self.token_delay_seconds > 0:
                await asyncio.sleep(self.token_delay_seconds)
            await response.write(chunk({"content": piece}, None))
        await response.write(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return self.error_response(400, "'prompt' must be a string or a non-empty list of strings")
        texts = [reply_text(p) for p in prompts]
        model = str(body.get("model") or self.model)
        ident = f"cmpl-{_digest('id', time.time_ns(), self.requests_total):016x}"
        created = int(time.time())
        usage = self._usage("\n".join(prompts), " ".join(texts))
        if not body.get("stream"):
            return web.json_response({
                "id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                            for i, t in enumerate(texts)],
                "usage": usage})
        response = await self._sse(request)
        for i, text in enumerate(texts):
            for piece in _tokens(text) + [""]:
                payload = {"id": ident, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": i, "text": piece, "finish_reason": None if piece else "stop",
                                        "logprobs": None}]}
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _vector(self, text: str) -> np.ndarray:
        from stablealign.llm.backends.embeddings import HashingEmbedder

        if getattr(self, "_embedder", None) is None:
            self._embedder = HashingEmbedder(self.embedding_dim)
        return self._embedder.embed_sync([text])[0]

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
            return self.error_response(400, "'input' must be a non-empty string or list of non-empty strings")
        if len(inputs) > 2048:
            return self.error_response(400, f"'input' has {len(inputs)} items, more than 2048")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = self._vector(text).astype("<f4")
            embedding: Any = base64.b64encode(vector.tobytes()).decode() if as_base64 else vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(t.split()) for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": str(body.get("model") or self.model),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class FakeTGIServer(_FakeServer):
    """TGI's ``/`` (compat), ``/generate``, ``/generate_stream``, ``/info`` and ``/health``."""

    kind = "tgi"
    MAX_NEW_TOKENS = 4096

    def __init__(self, latency_seconds: float = 0.0, fail_statuses: Sequence[int] = (), model: str = "fake-tgi",
                 **kwargs: Any) -> None:
        super().__init__(latency_seconds, fail_statuses, model, **kwargs)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/", self.compat), web.post("/generate", self.generate),
                web.post("/generate_stream", self.generate_stream), web.get("/info", self.info),
                web.get("/health", self.health)]

    def error_response(self, status: int, message: str) -> web.Response:
        # TGI's error body; error_type drives text_generation.errors.parse_error.
        error_type = {429: "overloaded", 422: "validation", 424: "generation"}.get(status)
        body: dict[str, Any] = {"error": message}
        if error_type:
            body["error_type"] = error_type
        return web.json_response(body, status=status)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_id": self.model, "model_sha": None, "model_dtype": "torch.float16", "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": 128, "max_best_of": 2,
            "max_stop_sequences": 4, "max_input_tokens": 4095, "max_total_tokens": 8192,
            "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
            "version": "fake-devserver", "sha": None, "docker_label": None})

    def _prepare(self, body: dict[str, Any]) -> tuple[str, list[str], str, int | None] | web.Response:
        """(prompt, tokens, finish_reason, seed) or a validation error response."""
        prompt = body.get("inputs")
        if not isinstance(prompt, str) or not prompt.strip():
            return self.error_response(422, "Input validation error: `inputs` cannot be empty")
        params = body.get("parameters") or {}
        max_new = params.get("max_new_tokens") or 20
        if not isinstance(max_new, int) or max_new <= 0 or max_new > self.MAX_NEW_TOKENS:
            return self.error_response(422, f"Input validation error: `max_new_tokens` must be in "
                                            f"1..{self.MAX_NEW_TOKENS}")
        text = reply_text(prompt)
        tokens = _tokens(text)
        finish = "eos_token"
        if len(tokens) > max_new:
            tokens, finish = tokens[:max_new], "length"
        seed = params.get("seed") if params.get("do_sample") else None
        return prompt, tokens, finish, seed

    @staticmethod
    def _token(piece: str) -> dict[str, Any]:
        return {"id": _digest("tok", piece) % 32000, "text": piece, "logprob": -0.5, "special": False}

    def _details(self, tokens: list[str], finish: str, seed: int | None) -> dict[str, Any]:
        return {"finish_reason": finish, "generated_tokens": len(tokens), "seed": seed, "prefill": [],
                "tokens": [self._token(t) for t in tokens], "top_tokens": None, "best_of_sequences": None}

    async def _body(self, request: web.Request) -> tuple[str, list[str], str, int | None] | web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        return self._prepare(body)

    async def generate(self, request: web.Request) -> web.Response:
        prepared = await self._body(request)
        if isinstance(prepared, web.Response):
            return prepared
        _, tokens, finish, seed = prepared
        return web.json_response({"generated_text": "".join(tokens), "details": self._details(tokens, finish, seed)})

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        prepared = await self._body(request)
        if isinstance(prepared, web.Response):
            return prepared
        return await self._stream(request, *prepared[1:])

    async def _stream(self, request: web.Request, tokens: list[str], finish: str,
                      seed: int | None) -> web.StreamResponse:
        response = await self._sse(request)
        for index, piece in enumerate(tokens):
            last = index == len(tokens) - 1
            event = {"index": index + 1, "token": self._token(piece), "top_tokens": None,
                     "generated_text": "".join(tokens) if last else None,
                     "details": {"finish_reason": finish, "generated_tokens": len(tokens), "seed": seed}
                     if last else None}
            await response.write(f"data:{json.dumps(event)}\n\n".encode())
        await response.write_eof()
        return response

    async def compat(self, request: web.Request) -> web.StreamResponse:
        """TGI's ``POST /``: a list of one generation, or a token stream when ``stream`` is true."""
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        prepared = self._prepare(body)
        if isinstance(prepared, web.Response):
            return prepared
        _, tokens, finish, seed = prepared
        if body.get("stream"):
            return await self._stream(request, tokens, finish, seed)
        return web.json_response([{"generated_text": "".join(tokens),
                                   "details": self._details(tokens, finish, seed)}])


SERVERS = {"openai": FakeOpenAIServer, "tgi": FakeTGIServer}


async def _serve(kind: str, port: int, latency_ms: float, fail: Sequence[int], host: str) -> None:
    server = SERVERS[kind](latency_seconds=latency_ms / 1000.0, fail_statuses=fail, host=host, port=port)
    url = await server.start()
    print(url, flush=True)  # the benchmark reads the URL from the first line
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        print(f"served {server.requests_total} requests, at most {server.max_in_flight} at once",
              file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.devservers", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: a free one; the URL is printed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every reply, milliseconds")
    parser.add_argument("--fail", type=int, nargs="*", default=(), help="HTTP statuses of the first requests")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.kind, args.port, args.latency_ms, args.fail, args.host))


if __name__ == "__main__":
    main()
