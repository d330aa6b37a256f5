"""The LLM endpoints this process may call, and the one API key each of them gets.

Why here, in the shared library, and not only in the world service: a world spec names a backend and
a URL, and the agent and observer services build their clients from what the world (or anyone who
can publish on the bus) sends them. The check must hold in the process that holds the key, so
every backend is built through ``resolve_endpoint`` (``stablealign.llm.backends.make_chat_backend`` /
``make_embedder``), and the world applies the same rule at CreateWorld to refuse a bad spec early.

The rule:

- Backends: only those in ``STABLEALIGN_LLM_BACKENDS`` (comma-separated; default: all of
  offline, openai, tgi, hf).
- URLs: a ModelRef's ``url`` must be one of the configured endpoints, compared in canonical form
  (scheme and host lower-case, default port and trailing ``/`` dropped). Configured are:
  the OpenAI SDK's own ``OPENAI_BASE_URL`` (``https://api.openai.com/v1`` when unset), which is also
  what an empty ``url`` of the openai backend means; the endpoints of ``STABLEALIGN_LLM_ENDPOINTS``;
  and the ones the application trusted for its own in-process services (``trust``: `stable-align run`
  without ``--nats``, where the person on the command line is the operator).
- Keys: ``OPENAI_API_KEY`` goes only to ``OPENAI_BASE_URL`` (the SDK's own pairing); an endpoint of
  ``STABLEALIGN_LLM_ENDPOINTS`` gets the key in the variable its ``key_env`` names, or none.

``STABLEALIGN_LLM_ENDPOINTS`` is JSON: an object of name -> endpoint, or a list of endpoints with a
``name``; an endpoint is ``{"url": "http://tgi", "backend": "tgi", "key_env": "TGI_TOKEN"}``
(``backend`` optional: any remote backend; ``key_env`` optional: no key). A bad value is a one-line
ConfigError naming the variable.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, model_validator

from stablealign.core.errors import ConfigError, ValidationError
from stablealign.core.redaction import redact_url
from stablealign.core.settings import process_environ

ENDPOINTS_ENV = "STABLEALIGN_LLM_ENDPOINTS"
BACKENDS_ENV = "STABLEALIGN_LLM_BACKENDS"
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
ALL_BACKENDS = ("offline", "openai", "tgi", "hf")
# Backends that call a server (and so need an allowed URL); the others run in this process.
REMOTE_BACKENDS = frozenset({"openai", "tgi"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Endpoint:
    """One LLM server the operator allows: its canonical URL, the backend that speaks to it, its key."""

    name: str
    url: str
    backend: str = ""  # "" : any remote backend
    key_env: str = ""  # the environment variable holding this endpoint's API key; "" : no key

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        if not self.key_env:
            return None
        return process_environ(environ).get(self.key_env) or None


def canonical_url(url: str) -> str:
    """``HTTP://Host:80/v1/`` -> ``http://host/v1``; ValueError for anything but an http(s) URL with a host."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{redact_url(text)!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{redact_url(text)!r} is not an http(s) URL with a host")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def _same(a: str, b: str) -> bool:
    try:
        return canonical_url(a) == canonical_url(b)
    except ValueError:
        return False


_TRUSTED: list[Endpoint] = []
_LOCK = threading.Lock()


def trust(url: str, backend: str = "", name: str = "command-line") -> None:
    """Allows ``url`` (without a key) for this process: the application's own in-process services only.

    `stable-align run` without ``--nats`` runs the services inside the command, so the URL its user gave
    is the operator's choice. Never called for services that serve a bus others can write to.
    """
    try:
        endpoint = Endpoint(name=name, url=canonical_url(url), backend=backend)
    except ValueError as exc:
        raise ValidationError(f"{backend or 'LLM'} url: {exc}") from None
    with _LOCK:
        if endpoint not in _TRUSTED:
            _TRUSTED.append(endpoint)


def forget_trusted() -> None:
    """Drops what ``trust`` added (tests; the end of an embedded run)."""
    with _LOCK:
        _TRUSTED.clear()


def openai_default_url(environ: Mapping[str, str] | None = None) -> str:
    """The URL ``OPENAI_API_KEY`` belongs to: ``OPENAI_BASE_URL``, else OpenAI's own API."""
    env = process_environ(environ)
    return (env.get(OPENAI_BASE_URL_ENV) or "").strip() or OPENAI_DEFAULT_URL


def openai_key_for(url: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``OPENAI_API_KEY`` when ``url`` (None: the SDK's default) is the URL it was configured for, else None."""
    env = process_environ(environ)
    key = env.get(OPENAI_KEY_ENV) or None
    if key is None:
        return None
    return key if _same(url or openai_default_url(env), openai_default_url(env)) else None


def _parse_endpoints(raw: str) -> list[Endpoint]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENDPOINTS_ENV}: not JSON ({exc.msg} at character {exc.pos})") from None
    items: list[tuple[str, object]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(v.get("name", f"endpoint-{i}")) if isinstance(v, dict) else f"endpoint-{i}", v)
                 for i, v in enumerate(value)]
    else:
        raise ConfigError(f"{ENDPOINTS_ENV}: expected a JSON object (name -> endpoint) or a list of endpoints")
    endpoints = []
    for name, spec in items:
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise ConfigError(f"{ENDPOINTS_ENV}: endpoint {name!r} needs a \"url\" string")
        unknown = set(spec) - {"url", "backend", "key_env", "name"}
        if unknown:
            raise ConfigError(f"{ENDPOINTS_ENV}: endpoint {name!r} has unknown field(s) {sorted(unknown)}; "
                              "allowed: url, backend, key_env")
        backend = str(spec.get("backend") or "").strip().lower()
        if backend and backend not in REMOTE_BACKENDS:
            raise ConfigError(f"{ENDPOINTS_ENV}: endpoint {name!r}: backend must be one of "
                              f"{sorted(REMOTE_BACKENDS)}, got {backend!r}")
        try:
            url = canonical_url(spec["url"])
        except ValueError as exc:
            raise ConfigError(f"{ENDPOINTS_ENV}: endpoint {name!r}: {exc}") from None
        endpoints.append(Endpoint(name=str(name), url=url, backend=backend,
                                  key_env=str(spec.get("key_env") or "").strip()))
    return endpoints


def configured_endpoints(environ: Mapping[str, str] | None = None) -> tuple[Endpoint, ...]:
    """The OpenAI SDK's default endpoint, then ``STABLEALIGN_LLM_ENDPOINTS``, then what ``trust`` added."""
    env = process_environ(environ)
    default = Endpoint(name="openai", url=canonical_url(openai_default_url(env)), backend="openai",
                       key_env=OPENAI_KEY_ENV)
    raw = (env.get(ENDPOINTS_ENV) or "").strip()
    with _LOCK:
        trusted = list(_TRUSTED)
    return (default, *(_parse_endpoints(raw) if raw else ()), *trusted)


def allowed_backends(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``STABLEALIGN_LLM_BACKENDS`` (comma-separated), default every backend."""
    raw = (process_environ(environ).get(BACKENDS_ENV) or "").strip()
    if not raw:
        return ALL_BACKENDS
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise ConfigError(f"{BACKENDS_ENV}={raw!r}: unknown backend(s) {unknown}; known: {', '.join(ALL_BACKENDS)}")
    return names


def resolve_endpoint(backend: str, url: str, *, field: str = "model",
                     environ: Mapping[str, str] | None = None) -> Endpoint | None:
    """The configured endpoint a ModelRef's (backend, url) names; None for a backend without a server.

    ValidationError (INVALID_ARGUMENT, naming ``field``) for a backend that is not enabled, or a URL
    that is not configured for that backend; the URL in the message is redacted.
    """
    name = (backend or "").strip().lower()
    enabled = allowed_backends(environ)
    if name not in enabled:
        raise ValidationError(f"{field}.backend {backend!r} is not enabled on this service "
                              f"({BACKENDS_ENV}: {', '.join(enabled)})")
    text = (url or "").strip()
    if name not in REMOTE_BACKENDS:
        return None
    if not text:
        if name == "openai":
            return configured_endpoints(environ)[0]
        raise ValidationError(f"{field}: the {name} backend needs the server's url")
    try:
        wanted = canonical_url(text)
    except ValueError as exc:
        raise ValidationError(f"{field}.url: {exc}") from None
    candidates = [e for e in configured_endpoints(environ) if not e.backend or e.backend == name]
    for endpoint in candidates:
        if endpoint.url == wanted:
            return endpoint
    names = ", ".join(dict.fromkeys(e.name for e in candidates)) or "none"
    raise ValidationError(f"{field}.url {redact_url(text)} is not a configured {name} endpoint (configured: "
                          f"{names}; an operator adds one in {ENDPOINTS_ENV})")


class LLMEndpointSettings(BaseModel):
    """``STABLEALIGN_LLM_ENDPOINTS`` and ``STABLEALIGN_LLM_BACKENDS`` as settings of every service (mixed
    into ``ServiceSettings``): a bad value fails the start in one line naming the variable, and the
    manifests' variables are known settings. The LLM clients read the same variables of the process
    environment when they are built (``resolve_endpoint``), so set them in the environment."""

    llm_endpoints: str = Field("", description=(
        "LLM servers a world spec may name and this process may call, as JSON: {name: {url, backend, key_env}} "
        "(besides OPENAI_BASE_URL, which is allowed by itself and the only URL that gets OPENAI_API_KEY; an "
        "endpoint gets the key in its key_env variable, or none). Read from the environment."))
    llm_backends: str = Field("", description=(
        "Backends a world spec may name, comma-separated (default: offline,openai,tgi,hf). Read from the "
        "environment."))
    model_roots: str = Field("", description=(
        "Directories whose models (hf backend) a world spec may name, comma-separated (default: the models "
        "directory of `stable-align model pull`, $STABLEALIGN_MODELS_DIR or models/). Read from the environment "
        "(stablealign.llm.models.confined_model_path)."))

    @model_validator(mode="after")
    def _endpoints_parse(self) -> LLMEndpointSettings:
        try:
            if self.llm_endpoints.strip():
                _parse_endpoints(self.llm_endpoints)
            allowed_backends({BACKENDS_ENV: self.llm_backends})
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self
