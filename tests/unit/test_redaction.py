"""Credentials never in logs or errors: URL and text redaction, the endpoints' configuration, refusals."""

from __future__ import annotations

import pytest

from stablealign.core.errors import ConfigError, LLMRequestError, ValidationError
from stablealign.core.redaction import redact_text, redact_url
from stablealign.llm.backends.base import refused
from stablealign.llm.endpoints import canonical_url, configured_endpoints, openai_key_for, resolve_endpoint


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:s3cret@llm.example.com/v1", "https://***@llm.example.com/v1"),
    ("nats://svc:pa55@nats:4222", "nats://***@nats:4222"),
    ("https://token-only@llm.example.com:8443/v1", "https://***@llm.example.com:8443/v1"),
    ("https://llm.example.com/v1?api_key=abc&model=m", "https://llm.example.com/v1?api_key=***&model=m"),
    ("http://tgi", "http://tgi"),
    ("not a url", "not a url"),
    ("", ""),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_masks_urls_keys_and_known_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "plainsecretvalue")
    text = ("cannot reach nats://a:b@h:4222; Incorrect API key provided: sk-proj-abcdefghijklmnop; "
            "header Authorization: Bearer abcdef123456; the key plainsecretvalue; hf_abcdefghijklmnop")
    out = redact_text(text, secrets=["extra-secret-1"])
    for secret in ("a:b@", "sk-proj-abcdefghijklmnop", "abcdef123456", "plainsecretvalue", "hf_abcdefghijklmnop"):
        assert secret not in out
    assert "nats://***@h:4222" in out and "Bearer ***" in out
    assert redact_text("extra-secret-1 here", secrets=["extra-secret-1"]) == "*** here"


def test_a_refused_key_is_said_as_such_without_the_key():
    error = refused("openai", "https://user:pw@llm.example.com/v1/", 401,
                    "Incorrect API key provided: sk-abcdefghijklmnopqrstuvwx. You can find your key at ...")
    assert isinstance(error, LLMRequestError) and error.status == 401 and error.code == 424
    assert str(error).startswith("the openai endpoint at https://***@llm.example.com/v1 refused the API key (401)")
    assert "sk-abcdefghijklmnopqrstuvwx" not in str(error) and "pw" not in str(error)
    assert "refused the request (HTTP 404, not retried)" in str(refused("tgi", "http://tgi", 404, "no route"))


def test_canonical_urls():
    assert canonical_url("HTTP://Host.Example:80/v1/") == "http://host.example/v1"
    assert canonical_url("https://h:443") == "https://h"
    assert canonical_url("http://h:8080/v1") == "http://h:8080/v1"
    for bad in ("ftp://h/x", "http://", "file:///etc/passwd", "http://h:notaport"):
        with pytest.raises(ValueError):
            canonical_url(bad)


def test_endpoints_configuration_fails_in_one_line(monkeypatch):
    for raw, match in [("{not json", "not JSON"), ('[42]', r'endpoint-0.*needs a "url"'),
                       ('{"a": {"url": "ftp://x"}}', "not an http"),
                       ('{"a": {"url": "http://x", "backend": "hf"}}', "backend must be one of"),
                       ('{"a": {"url": "http://x", "kee_env": "K"}}', "unknown field")]:
        monkeypatch.setenv("STABLEALIGN_LLM_ENDPOINTS", raw)
        with pytest.raises(ConfigError, match=match) as caught:
            configured_endpoints()
        assert "\n" not in str(caught.value) and str(caught.value).startswith("STABLEALIGN_LLM_ENDPOINTS")
    monkeypatch.setenv("STABLEALIGN_LLM_ENDPOINTS", '{"vllm": {"url": "http://vllm:8000/v1", "backend": "openai"}}')
    assert resolve_endpoint("openai", "http://VLLM:8000/v1/", field="agent_model").name == "vllm"
    with pytest.raises(ValidationError, match="not a configured tgi endpoint"):
        resolve_endpoint("tgi", "http://vllm:8000/v1", field="agent_model")  # configured for openai only
    monkeypatch.setenv("STABLEALIGN_LLM_BACKENDS", "offline,gpt9")
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_endpoint("offline", "")


def test_openai_api_key_belongs_to_openai_base_url(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert openai_key_for(None) == "sk-real" and openai_key_for("https://api.openai.com/v1/") == "sk-real"
    assert openai_key_for("http://127.0.0.1:9/v1") is None
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert openai_key_for("http://127.0.0.1:9/v1/") == "sk-real" and openai_key_for("https://api.openai.com/v1") is None
