"""Credentials out of logs and error messages: one helper for URLs, one for free text.

A URL may carry a password (``https://user:secret@llm.example/v1``, ``nats://svc:pass@nats:4222``)
or a key in its query (``?api_key=...``); an LLM SDK's error message may quote the key it was
given ("Incorrect API key provided: sk-..."). Anything that is logged or sent back to a caller
(a world's error, a NATS error header, a gRPC status) goes through ``redact_url`` or
``redact_text`` first, so a secret never leaves the process that holds it.

What stays: scheme, host, port and path — an operator still sees *which* endpoint failed.

Known secrets are the values of ``SECRET_ENV_VARS`` and of every variable an endpoint of
``STABLEALIGN_LLM_ENDPOINTS`` names as its ``key_env``, read when a message is redacted: an
operator adds endpoints and keys without a code change, and a server that echoes a key of any shape
(a 401 body quoting the ``Authorization`` header) must not carry it into a world's error or a log
line. The log formatters (``stablealign.core.logs``) scrub the same values from every line, tracebacks
included.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from stablealign.core.settings import process_environ

MASK = "***"
# Query parameters that hold a credential (compared lower-case, '-' as '_').
SECRET_QUERY_KEYS = frozenset({"key", "api_key", "apikey", "token", "access_token", "auth", "password", "pass",
                               "secret", "sig", "signature", "x_api_key", "code"})
# Environment variables whose values are secrets wherever they appear in a message.
SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# The endpoints' variable (``stablealign.llm.endpoints.ENDPOINTS_ENV``; that module imports this one).
ENDPOINTS_ENV = "STABLEALIGN_LLM_ENDPOINTS"
_MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# Bearer tokens and the usual API-key shapes (OpenAI sk-..., Hugging Face hf_...).
_TOKENS = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}|\b(?:sk|hf|rk|pk)[-_][A-Za-z0-9_-]{8,}")


def redact_url(url: str) -> str:
    """``url`` with its user-info replaced by ``***`` and credential query values masked.

    ``https://user:pw@host:8443/v1?api_key=x&model=m`` -> ``https://***@host:8443/v1?api_key=***&model=m``.
    Text that is not a URL with a host comes back unchanged (nothing to hide, nothing to break).
    """
    if not url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed netloc (e.g. a bad port): mask everything before the host
        return re.sub(r"://[^/@]*@", f"://{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    elif host is None:
        return url
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower().replace("-", "_") in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower().replace("-", "_") in SECRET_QUERY_KEYS else v)
                               for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@functools.lru_cache(maxsize=8)
def endpoint_key_vars(raw: str) -> tuple[str, ...]:
    """The ``key_env`` names in a ``STABLEALIGN_LLM_ENDPOINTS`` value, read leniently (a bad value is
    ``stablealign.llm.endpoints``' error to report, not a reason to leak a key here)."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return ()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    names = (item.get("key_env") for item in items if isinstance(item, dict))
    return tuple(dict.fromkeys(n.strip() for n in names if isinstance(n, str) and n.strip()))


def known_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    """``extra`` and the secret values this process holds in its environment, longest first."""
    environ = process_environ()
    names = (*SECRET_ENV_VARS, *endpoint_key_vars(environ.get(ENDPOINTS_ENV, "")))
    values = [*extra, *(environ.get(name) for name in names)]
    return sorted({v for v in values if v and len(v) >= _MIN_SECRET_CHARS}, key=len, reverse=True)


def scrub_secrets(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with every known secret (``known_secrets``) replaced by ``***``; nothing else touched."""
    if not text:
        return text
    for secret in known_secrets(extra):
        text = text.replace(secret, MASK)
    return text


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every URL redacted (``redact_url``), bearer tokens and key-shaped words masked,
    and the given ``secrets`` — plus every secret this process holds (``known_secrets``) — removed."""
    if not text:
        return text
    out = scrub_secrets(text, secrets)  # first: a key may look like a URL's user-info or a token
    out = _URL.sub(lambda m: redact_url(m.group(0)), out)
    return _TOKENS.sub(lambda m: (m.group(1) or "") + MASK, out)
