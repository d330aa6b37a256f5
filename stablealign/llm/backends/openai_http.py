"""The openai backend's hot path: one aiohttp POST per chat completion, with the SDK client's settings.

Why: a simulation makes many chat calls per interaction, and on a few cores the client's CPU per
call, not the model's latency, bounds a round. Profiled against the local OpenAI-compatible server
(`tests.support.devservers`), the SDK's generic request machinery — building the request (httpx URL
merging and parsing, header validation), auth hooks, and constructing typed pydantic models of the
reply (every logprob entry of a rating) — costs several times the CPU of the same POST and JSON
decoding done directly over aiohttp (the HTTP client the SDK itself uses here), more than the rest
of a call path (figures: docs/benchmarks.md).

What stays the SDK's: the URL, the key and the headers come from the ``AsyncOpenAI`` client the
backend built from ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` (so any OpenAI-compatible server works
unchanged); TLS and proxies are what the SDK's own aiohttp transport uses (``httpx2.create_ssl_context``:
certifi or ``SSL_CERT_FILE``; ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and ``NO_PROXY``); and failures
are raised as the SDK's own exceptions (``APIStatusError`` subclasses made by the client from the
response, ``APITimeoutError``, ``APIConnectionError``), so the backend sorts them with the same
``classify`` as SDK calls. Streaming, embeddings, and clients whose auth is not a
fixed key (workload identity, key providers, provider runtimes) go through the SDK as before
(``DirectChatCompletions.supports``).

The reply is decoded with ``json.loads`` into ``ReplyFields``: dicts read by attribute, a missing
field being None, which is how the backend reads the SDK's models (``reply.choices[0].message.content``).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

CHAT_PATH = "/chat/completions"


class ReplyFields(dict):
    """A JSON object of a reply, read by attribute like the SDK's models (a missing field is None)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


class DirectChatCompletions:
    """Non-streamed ``POST {base_url}/chat/completions`` over one aiohttp session per event loop."""

    def __init__(self, client: openai.AsyncOpenAI, *, timeout: float, max_connections: int) -> None:
        self.client = client
        self.url = str(client.base_url).rstrip("/") + CHAT_PATH
        # As the SDK's httpx timeout: each phase (connect, each read) may take ``timeout`` seconds.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout, sock_read=timeout)
        self._read_timeout = timeout
        # Keep-alive for every connection the backend may use at once (its concurrency limit), so a
        # round of hundreds of concurrent calls re-uses sockets instead of re-opening them per call.
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] | None = None
        self._proxy: str | None = None

    @staticmethod
    def supports(client: Any) -> bool:
        """Whether the client's auth is a fixed key the direct path can send as the SDK would."""
        return (isinstance(getattr(client, "api_key", None), str)
                and getattr(client, "_provider_runtime", None) is None
                and getattr(client, "workload_identity", None) is None
                and getattr(client, "_api_key_provider", None) is None
                and getattr(client, "custom_auth", None) is None
                and not getattr(client, "default_query", None))

    def _request_headers(self) -> dict[str, str]:
        """The SDK's headers for this client (its defaults, the key, its per-request extras), built once
        inside the event loop (``X-Stainless-Async`` names the loop's library)."""
        headers = {k: v for k, v in self.client.default_headers.items() if isinstance(v, str)}
        headers.update(self.client.auth_headers)
        headers["Content-Type"] = "application/json"
        headers["x-stainless-retry-count"] = "0"  # the SDK's own retries are off (max_retries=0)
        headers["x-stainless-read-timeout"] = str(self._read_timeout)
        return headers

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A TLS context only for an https server: building one loads the CA bundle (~30-40 ms of CPU), on
            # the first call of a round.
            tls = httpx2.create_ssl_context(trust_env=True) if self.url.lower().startswith("https:") else False
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300,
                                             keepalive_timeout=60.0, ssl=tls)
            # No default headers of aiohttp's own beyond what HTTP needs: ours are the SDK's.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  skip_auto_headers=("User-Agent",))
            self._headers = self._request_headers()
            self._proxy = env_proxy(self.url)
        return self._session

    async def post(self, body: dict[str, Any]) -> ReplyFields:
        """One completion; SDK exceptions on failure (status errors carry the response and its headers)."""
        session = self._open()
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            async with session.post(self.url, data=payload, headers=self._headers, proxy=self._proxy) as response:
                data = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError and connect timeouts are TimeoutErrors
            raise openai.APITimeoutError(request=self._request()) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise openai.APIConnectionError(message=f"Connection error: {exc}", request=self._request()) from exc
        if not 200 <= status < 300:
            raise self.client._make_status_error_from_response(  # noqa: SLF001 - the SDK's own error for a status
                httpx2.Response(status, headers=list(headers.items()), content=data, request=self._request()))
        try:
            return json.loads(data, object_hook=ReplyFields)
        except ValueError as exc:
            raise openai.APIResponseValidationError(
                response=httpx2.Response(status, headers=list(headers.items()), content=data,
                                         request=self._request()),
                body=data[:200].decode("utf-8", "replace"), message=f"reply is not JSON: {exc}") from exc

    def _request(self) -> httpx2.Request:
        """The request an SDK exception refers to (built only on a failure)."""
        return httpx2.Request("POST", self.url)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, unless
    ``NO_PROXY`` exempts its host), as the SDK's client (``trust_env``) would use; read once per session."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parts.scheme) or proxies.get("all") or None
