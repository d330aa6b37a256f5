"""Backends from a ModelRef: defaults, clear errors, one shared instance per event loop."""

from __future__ import annotations

import pytest

from stablealign.core.errors import ConfigError, ValidationError
from stablealign.llm.backends import (
    close_backends,
    get_chat_backend,
    get_embedder,
    make_chat_backend,
    make_embedder,
)
from stablealign.llm.backends.base import ChatMessage
from stablealign.llm.backends.embeddings import HashingEmbedder, MiniLMEmbedder
from stablealign.llm.backends.hf import HFChatBackend
from stablealign.llm.backends.offline import OfflineChatBackend
from stablealign.llm.backends.openai_backend import OpenAIChatBackend, OpenAIEmbedder
from stablealign.llm.backends.tgi import TGIChatBackend
from stablealign.llm.models import forget_trusted_models, trust_model_dir
from stablealign.llm.prompt_format import STOP_SEQUENCES, cut_at_stop, render_prompt
from stablealign.v1 import common_pb2
from tests.support.endpoints import allow_endpoints


def ref(backend: str, model: str = "", url: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(backend=backend, model=model, url=url)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValidationError, match="offline, openai, tgi, hf"):
        make_chat_backend(ref("gpt5"))


def test_defaults_and_settings(monkeypatch):
    assert isinstance(make_chat_backend(ref("offline")), OfflineChatBackend)
    assert make_chat_backend(ref("offline")).model == "offline-deterministic"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        make_chat_backend(ref("openai"))
    with pytest.raises(ValidationError, match="not a configured openai endpoint"):
        make_chat_backend(ref("openai", url="http://127.0.0.1:9/v1"))  # only an operator's endpoints
    allow_endpoints(monkeypatch, "http://127.0.0.1:9/v1", "http://127.0.0.1:9")
    local = make_chat_backend(ref("openai", url="http://127.0.0.1:9/v1"))  # a local server needs no key
    assert isinstance(local, OpenAIChatBackend) and local.model == "gpt-4o-mini"
    monkeypatch.setenv("STABLEALIGN_OPENAI_CHAT_MODEL", "my-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert make_chat_backend(ref("openai")).model == "my-model"
    tgi = make_chat_backend(ref("tgi", url="http://127.0.0.1:9"))
    assert isinstance(tgi, TGIChatBackend) and tgi.model == "tgi"
    with pytest.raises(ValidationError, match="needs the server's url"):
        make_chat_backend(ref("tgi"))
    with pytest.raises(ConfigError, match="hf backend needs a model path"):
        make_chat_backend(ref("hf"))
    monkeypatch.setenv("STABLEALIGN_MODEL_ROOTS", "/nonexistent")
    with pytest.raises(ConfigError, match="not a directory"):
        make_chat_backend(ref("hf", model="/nonexistent/model"))


def test_an_hf_model_named_in_a_request_loads_only_inside_the_model_roots(monkeypatch, tmp_path):
    """A world spec's hf model path: ``..``, an absolute path elsewhere or a symlink out of the roots is
    refused naming the field and the setting; nothing is loaded (the backend loads on first use)."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    for model in (root / "mine", outside):  # what check_model_dir looks for; the weights load on first use
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("STABLEALIGN_MODEL_ROOTS", f"{tmp_path / 'elsewhere'},{root}")
    backend = make_chat_backend(ref("hf", model=str(root / "mine")))
    assert isinstance(backend, HFChatBackend) and backend.path == (root / "mine").resolve()
    for bad in (str(root / ".." / "outside"), str(outside), str(root / "escape"), "/etc"):
        with pytest.raises(ValidationError, match=r"^model '.+' is outside the allowed directories "
                                                  r"\(STABLEALIGN_MODEL_ROOTS\): "):
            make_chat_backend(ref("hf", model=bad))
    # Unset: the models directory of `stable-align model pull` (what `make run` loads from).
    monkeypatch.delenv("STABLEALIGN_MODEL_ROOTS")
    monkeypatch.setenv("STABLEALIGN_MODELS_DIR", str(root))
    assert make_chat_backend(ref("hf", model=str(root / "mine"))).path == (root / "mine").resolve()
    with pytest.raises(ValidationError, match="outside the allowed directories"):
        make_chat_backend(ref("hf", model=str(outside)))
    # A command's own user may name one (an embedded `stable-align run`, `eval`): that directory only.
    try:
        trust_model_dir(outside)
        assert make_chat_backend(ref("hf", model=str(outside))).path == outside.resolve()
        with pytest.raises(ValidationError, match="outside the allowed directories"):
            make_chat_backend(ref("hf", model=str(tmp_path)))
    finally:
        forget_trusted_models()


def test_embedders_by_ref(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert isinstance(make_embedder(ref("offline")), MiniLMEmbedder)
    assert isinstance(make_embedder(ref("tgi", model="hashing")), HashingEmbedder)
    openai_embedder = make_embedder(ref("openai"))
    assert isinstance(openai_embedder, OpenAIEmbedder) and openai_embedder.model == "text-embedding-3-small"
    assert isinstance(make_embedder(ref("openai", model="hashing")), HashingEmbedder)


async def test_cache_shares_one_instance_per_ref_and_closes():
    a = get_chat_backend(ref("offline"))
    assert get_chat_backend(ref("offline")) is a
    assert get_chat_backend(ref("offline", model="other")) is not a
    e = get_embedder(ref("offline", model="hashing"))
    assert get_embedder(ref("offline", model="hashing")) is e
    await close_backends()
    assert get_chat_backend(ref("offline")) is not a


def test_template_matches_the_trainer_format():
    from stablealign.training.template import format_prompt

    question = "How do I bake bread?"
    assert render_prompt([ChatMessage("user", question)]) == format_prompt(question)
    conversation = render_prompt([ChatMessage("system", "Be kind."), ChatMessage("user", "Hi"),
                                  ChatMessage("assistant", "Hello!"), ChatMessage("user", "Bye")])
    assert conversation == "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    assert cut_at_stop(" Sure thing.\nHuman: and then?", STOP_SEQUENCES) == "Sure thing."


async def test_concurrency_limit_from_the_environment(monkeypatch):
    from stablealign.llm.backends import default_max_concurrency

    monkeypatch.delenv("STABLEALIGN_LLM_MAX_CONCURRENCY", raising=False)
    assert default_max_concurrency() == 1024 and default_max_concurrency("openai") == 1024
    assert default_max_concurrency("hf") == 64  # two batches of the batcher (max_batch 32)
    monkeypatch.setenv("STABLEALIGN_LLM_MAX_CONCURRENCY", "300")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backend = get_chat_backend(ref("openai", model="concurrency-test"))
    # The bound of the adaptive limit, which starts small and learns the endpoint's capacity (limiter.py).
    assert backend.limiter.max_limit == 300 and backend.limiter.adaptive is not None
    assert backend.limiter.allowed == 2
    await close_backends()
    monkeypatch.setenv("STABLEALIGN_LLM_MAX_CONCURRENCY", "zero")
    with pytest.raises(ConfigError, match="expected an integer"):
        default_max_concurrency()
