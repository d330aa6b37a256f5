"""Allowing LLM endpoints in tests: what an operator does with ``STABLEALIGN_LLM_ENDPOINTS``.

Services build LLM clients only for configured endpoints (``stablealign.llm.endpoints``), so a test that
points a world at a local fake server configures it first, exactly as a deployment would.
"""

from __future__ import annotations

import json

import pytest

from stablealign.llm.endpoints import ENDPOINTS_ENV


def endpoints_json(*urls: str, key_env: str = "", backend: str = "") -> str:
    """The ``STABLEALIGN_LLM_ENDPOINTS`` value allowing ``urls`` (each with ``key_env``'s key, if given)."""
    return json.dumps({f"test-{i}": {"url": url, "backend": backend, "key_env": key_env}
                       for i, url in enumerate(urls)})


def allow_endpoints(monkeypatch: pytest.MonkeyPatch, *urls: str, key_env: str = "", backend: str = "") -> None:
    """Sets ``STABLEALIGN_LLM_ENDPOINTS`` for this test (in-process services read it when they build a client)."""
    monkeypatch.setenv(ENDPOINTS_ENV, endpoints_json(*urls, key_env=key_env, backend=backend))
