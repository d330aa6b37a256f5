"""WorldSpec validation and defaults: what CreateWorld stores for the agent and observer services."""

from __future__ import annotations

import pytest

from services.world.settings import WorldSettings
from services.world.spec import resolve_spec
from stablealign.core.errors import ConfigError, ValidationError
from stablealign.sandbox.data import data_dir
from stablealign.v1 import common_pb2, world_pb2
from tests.support.endpoints import allow_endpoints

GOOD, BAD = common_pb2.PERSONA_GOOD, common_pb2.PERSONA_BAD


def spec(**kw) -> world_pb2.WorldSpec:
    base = dict(size=3, rounds=2, seed=1)
    base.update(kw)
    return world_pb2.WorldSpec(**base)


def test_defaults_are_resolved():
    out = resolve_spec(spec())  # prior_size unset: the default 50 (an explicit 0 means no prior)
    assert out.world_id.startswith("w-") and len(out.world_id) <= 64
    assert out.setting == "half_half"
    assert list(out.labels) == [GOOD, GOOD, GOOD, BAD, GOOD, BAD, BAD, BAD, BAD]
    assert out.radius == 1.0  # 3 // 2
    assert out.partners == 4
    assert out.prior_size == 50
    # Local sentence embeddings get the wider threshold; OpenAI embeddings the original's 0.3.
    assert out.retrieval_k == 3 and out.retrieval_threshold == pytest.approx(0.75)
    openai_embedded = resolve_spec(spec(embedding_model=common_pb2.ModelRef(backend="openai")))
    assert openai_embedded.retrieval_threshold == pytest.approx(0.3)
    assert resolve_spec(spec(prior_size=-1)).prior_size == 50
    assert (out.agent_model.backend, out.agent_model.model) == ("offline", "offline-deterministic")
    assert (out.observer_model.backend, out.observer_model.model) == ("offline", "offline-deterministic")
    assert (out.embedding_model.backend, out.embedding_model.model) == ("offline", "all-MiniLM-L6-v2")
    assert out.concurrency == 0


def test_explicit_values_are_kept():
    out = resolve_spec(
        spec(
            world_id="my_world-1",
            size=10,
            radius=2.5,
            partners=2,
            prior_size=0,
            retrieval_k=5,
            retrieval_threshold=0.5,
            setting="all_bad",
            global_partner_probability=0.25,
            agent_model=common_pb2.ModelRef(backend="openai"),
            embedding_model=common_pb2.ModelRef(backend="offline", model="hashing"),
        )
    )
    assert out.world_id == "my_world-1" and out.radius == 2.5 and out.partners == 2 and out.prior_size == 0
    assert out.retrieval_k == 5 and out.retrieval_threshold == 0.5
    assert set(out.labels) == {BAD} and len(out.labels) == 100
    assert out.agent_model.model == "gpt-4o-mini"
    assert out.embedding_model.model == "hashing"


def test_default_backends_come_from_settings(monkeypatch):
    with pytest.raises(ConfigError, match="STABLEALIGN_AGENT_URL: agent.url http://127.0.0.1:1 is not a configured"):
        WorldSettings(agent_backend="tgi", agent_url="http://127.0.0.1:1")  # no agent would call it: fail at start
    allow_endpoints(monkeypatch, "http://127.0.0.1:1", backend="tgi")
    settings = WorldSettings(agent_backend="tgi", agent_url="http://127.0.0.1:1", embedding_backend="openai")
    out = resolve_spec(spec(), settings)
    assert (out.agent_model.backend, out.agent_model.url) == ("tgi", "http://127.0.0.1:1")
    assert out.embedding_model.model == "text-embedding-3-small"


def test_labels_mean_custom():
    labels = [GOOD] * 8 + [BAD]
    out = resolve_spec(spec(labels=labels))
    assert out.setting == "custom" and list(out.labels) == labels


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(size=0), "size"),
        (dict(size=1001), "size"),
        (dict(rounds=0), "rounds"),
        (dict(world_id="bad id"), "world_id"),
        (dict(world_id="a.b"), "world_id"),
        (dict(world_id="x" * 65), "world_id"),
        (dict(setting="quarter"), "unknown setting"),
        (dict(setting="custom"), "needs 9 labels"),
        (dict(setting="custom", labels=[GOOD] * 8), "needs 9 labels"),
        (dict(setting="all_good", labels=[BAD] * 9), "only allowed with setting custom"),
        (dict(radius=-1), "radius"),
        (dict(radius=float("nan")), "radius"),
        (dict(global_partner_probability=1.5), "global_partner_probability"),
        (dict(global_partner_probability=-0.1), "global_partner_probability"),
        (dict(partners=-1), "partners"),
        (dict(concurrency=-1), "concurrency"),
        (dict(prior_size=-2), "prior_size"),
        (dict(prior_size=10**6), "exceeds"),
        (dict(retrieval_k=-1), "retrieval_k"),
        (dict(retrieval_threshold=3.0), "retrieval_threshold"),
        (dict(agent_model=common_pb2.ModelRef(backend="llama")), "agent_model.backend"),
        (dict(observer_model=common_pb2.ModelRef(backend="hf")), "model path"),
        (dict(observer_model=common_pb2.ModelRef(backend="tgi")), "url"),
        (dict(embedding_model=common_pb2.ModelRef(backend="nope")), "embedding_model.backend"),
        (dict(prior_path=str(data_dir() / "nonexistent" / "prior.jsonl")), "prior file not found"),
        (dict(questions_path=str(data_dir() / "nonexistent" / "q.txt")), "question pool not found"),
        (dict(questions_path="/etc/passwd"), "questions_path '/etc/passwd' is outside the allowed directories"),
    ],
)
def test_invalid_specs(fields, match):
    with pytest.raises(ValidationError, match=match):
        resolve_spec(spec(**fields))


def test_resolving_twice_changes_nothing():
    once = resolve_spec(spec(setting="mixed_half_half"))
    assert resolve_spec(once) == once


def test_round_means_skip_missing_ratings_and_stay_unset_when_all_are_missing():
    from services.world.scheduler import summarize

    summary = summarize(0, [(2, None, 5, 6), (4, None, None, 6)], duration=1.0)
    assert summary.mean_alignment_before == pytest.approx(3.0)
    assert not summary.HasField("mean_alignment_after")  # never a placeholder 0.0 in the headline curve
    assert summary.mean_engagement_before == pytest.approx(5.0) and summary.missing_ratings == 3


def test_a_spec_names_only_the_operators_endpoints_and_backends(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    attacker = common_pb2.ModelRef(backend="openai", model="m", url="http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError, match=r"agent_model.url http://127.0.0.1:9/v1 is not a configured openai"):
        resolve_spec(spec(agent_model=attacker))
    with pytest.raises(ValidationError, match="observer_model.url"):
        resolve_spec(spec(observer_model=common_pb2.ModelRef(backend="tgi", url="http://evil.example")))
    with pytest.raises(ValidationError, match="embedding_model.url"):
        resolve_spec(spec(embedding_model=attacker))
    # Configured: accepted (trailing slash and default port do not matter).
    allow_endpoints(monkeypatch, "http://127.0.0.1:9/v1/")
    assert resolve_spec(spec(agent_model=attacker)).agent_model.url == "http://127.0.0.1:9/v1"
    # The SDK's own base URL is configured by itself; an empty url means it.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://LOCALHOST:80/v1")
    resolve_spec(spec(agent_model=common_pb2.ModelRef(backend="openai", url="http://localhost/v1")))
    resolve_spec(spec(agent_model=common_pb2.ModelRef(backend="openai")))
    monkeypatch.setenv("STABLEALIGN_LLM_BACKENDS", "offline")
    with pytest.raises(ValidationError, match="agent_model.backend 'openai' is not enabled"):
        resolve_spec(spec(agent_model=common_pb2.ModelRef(backend="openai")))
    resolve_spec(spec())  # the defaults (offline) still run


def test_question_and_prior_files_only_from_the_data_roots(tmp_path, monkeypatch):
    from stablealign.sandbox import data

    outside = tmp_path / "secret.txt"
    outside.write_text("the root password is hunter2\n")
    for field in ("questions_path", "prior_path"):
        with pytest.raises(ValidationError, match=f"{field} .* is outside the allowed directories"):
            resolve_spec(spec(**{field: str(outside)}))
    # `..` out of the data dir, and a symlink inside it pointing out, are refused the same way.
    sneaky = str(data.data_dir() / ".." / ".." / outside.relative_to("/"))
    with pytest.raises(ValidationError, match="questions_path"):
        resolve_spec(spec(questions_path=sneaky))
    root = tmp_path / "data"
    root.mkdir()
    (root / "link.txt").symlink_to(outside)
    settings = WorldSettings(world_data_roots=(str(root),))
    with pytest.raises(ValidationError, match=r"questions_path .*link.txt.*\(STABLEALIGN_WORLD_DATA_ROOTS\)"):
        resolve_spec(spec(questions_path=str(root / "link.txt")), settings)
    # A real file inside a configured root is fine; the default questions need no configuration.
    (root / "questions.txt").write_text("How do I make friends?\nWhat is a good gift?\n")
    resolve_spec(spec(questions_path=str(root / "questions.txt")), settings)
    resolve_spec(spec(questions_path=str(data.default_questions_path())))


def test_the_checked_path_is_the_one_stored_and_opened(tmp_path):
    """The resolved path is kept: a symlink swapped after CreateWorld does not move the world's file, and a
    stored spec naming a file outside the roots (the bucket written by someone else) is refused again."""
    from services.world.spec import confined_files

    root = tmp_path / "data"
    (root / "v1").mkdir(parents=True)
    (root / "v1" / "questions.txt").write_text("How do I make friends?\nWhat is a good gift?\n")
    (root / "current").symlink_to(root / "v1")
    settings = WorldSettings(world_data_roots=(str(root),))
    resolved = resolve_spec(spec(questions_path=str(root / "current" / "questions.txt")), settings)
    assert resolved.questions_path == str((root / "v1" / "questions.txt").resolve())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "questions.txt").write_text("the root password is hunter2\n")
    (root / "current").unlink()
    (root / "current").symlink_to(outside)  # swapped after the check
    assert confined_files(resolved, settings).questions_path == resolved.questions_path
    forged = world_pb2.WorldSpec()
    forged.CopyFrom(resolved)
    forged.questions_path = str(root / "current" / "questions.txt")
    with pytest.raises(ValidationError, match=r"questions_path .* is outside the allowed directories"):
        confined_files(forged, settings)
