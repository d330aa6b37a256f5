"""Settings: env vars with typed defaults, overrides win, bad values fail fast with the variable's name."""

from __future__ import annotations

import pytest

from services.agent.settings import AgentSettings
from services.observer.settings import ObserverSettings
from services.trainer.settings import TrainerSettings
from services.world.settings import WorldSettings
from stablealign.core.config import Settings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.llm.backends.batching import EngineSettings, engine_settings
from stablealign.serving.settings import ServiceSettings


class DemoSettings(ServiceSettings):
    retries: int = 3
    ratio: float = 0.2
    verbose: bool = False
    tags: tuple[str, ...] = ()
    backend_url: str | None = None


def test_defaults_env_and_overrides():
    env = {"STABLEALIGN_RETRIES": "7", "STABLEALIGN_RATIO": "0.5", "STABLEALIGN_VERBOSE": "yes",
           "STABLEALIGN_TAGS": "a, b", "STABLEALIGN_NATS_URL": "nats://10.0.0.1:4222"}
    settings = load_settings(DemoSettings, {"retries": 9, "ratio": None}, environ=env)
    assert settings.retries == 9  # the flag wins over the environment
    assert settings.ratio == 0.5  # a None override leaves the environment's value
    assert settings.verbose is True and settings.tags == ("a", "b")
    assert settings.nats_url == "nats://10.0.0.1:4222" and settings.backend_url is None


def test_defaults_when_nothing_is_set():
    settings = load_settings(DemoSettings, environ={})
    assert (settings.retries, settings.ratio, settings.verbose, settings.tags) == (3, 0.2, False, ())
    assert settings.grpc_port == 0 and settings.log_format == "auto" and settings.max_concurrency == 256


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("TRUE", True), (" Off ", False),
])
def test_booleans(raw, expected):
    assert load_settings(DemoSettings, environ={"STABLEALIGN_VERBOSE": raw}).verbose is expected


@pytest.mark.parametrize("raw, expected", [("", ()), ("one", ("one",)), ("a,b,,c ", ("a", "b", "c"))])
def test_comma_separated_sequences(raw, expected):
    assert load_settings(DemoSettings, environ={"STABLEALIGN_TAGS": raw}).tags == expected


def test_scalars_and_optional():
    env = {"STABLEALIGN_GRPC_PORT": " 50051 ", "STABLEALIGN_SHUTDOWN_GRACE_SECONDS": "2.5",
           "STABLEALIGN_INSTANCE": " spaced ", "STABLEALIGN_BACKEND_URL": "http://x"}
    settings = load_settings(DemoSettings, environ=env)
    assert settings.grpc_port == 50051 and settings.shutdown_grace_seconds == 2.5
    assert settings.instance == " spaced "  # a string is taken as it is
    assert settings.backend_url == "http://x"
    for empty in ("", "none", "None"):
        assert load_settings(DemoSettings, environ={"STABLEALIGN_BACKEND_URL": empty}).backend_url is None


def test_precedence_defaults_environment_overrides():
    env = {"STABLEALIGN_GRPC_PORT": "7000", "STABLEALIGN_LOG_LEVEL": "DEBUG"}
    settings = load_settings(ServiceSettings, {"grpc_port": 7001, "log_level": None, "instance": None}, environ=env)
    assert settings.grpc_port == 7001  # override > environment
    assert settings.log_level == "DEBUG"  # environment > default; a None override changes nothing
    assert settings.instance == ""  # default


def test_explicit_environ_replaces_os_environ(monkeypatch):
    monkeypatch.setenv("STABLEALIGN_GRPC_PORT", "7002")
    assert load_settings(ServiceSettings).grpc_port == 7002  # os.environ by default
    assert load_settings(ServiceSettings, environ={}).grpc_port == 0  # an explicit mapping, even an empty one
    monkeypatch.setenv("STABLEALIGN_GRPC_PORT", "x")
    assert load_settings(ServiceSettings, environ={"STABLEALIGN_GRPC_PORT": "7003"}).grpc_port == 7003


def test_other_stablealign_variables_are_ignored():
    env = {"STABLEALIGN_NOT_A_SETTING": "x", "STABLEALIGN_HF_MAX_BATCH": "many", "OTHER": "y"}
    assert load_settings(ServiceSettings, environ=env) == load_settings(ServiceSettings, environ={})


@pytest.mark.parametrize("env, message", [
    ({"STABLEALIGN_RETRIES": "three"}, "STABLEALIGN_RETRIES='three': expected an integer"),
    ({"STABLEALIGN_GRPC_PORT": "x"}, "STABLEALIGN_GRPC_PORT='x': expected an integer"),
    ({"STABLEALIGN_RATIO": "half"}, "STABLEALIGN_RATIO='half': expected a number"),
    ({"STABLEALIGN_VERBOSE": "maybe"}, "STABLEALIGN_VERBOSE='maybe': expected a boolean"),
    ({"STABLEALIGN_NATS_URL": "http://x"}, "STABLEALIGN_NATS_URL='http://x': expected a nats:// URL"),
    ({"STABLEALIGN_LOG_FORMAT": "xml"}, "STABLEALIGN_LOG_FORMAT='xml': must be json, console or auto"),
    ({"STABLEALIGN_MAX_CONCURRENCY": "0"}, "STABLEALIGN_MAX_CONCURRENCY must be >= 1"),
    ({"STABLEALIGN_GRPC_PORT": "70000"}, "STABLEALIGN_GRPC_PORT must be <= 65535"),
])
def test_bad_values_fail_fast(env, message):
    with pytest.raises(ConfigError, match="^" + message) as info:
        load_settings(DemoSettings, environ=env)
    text = str(info.value)
    assert "\n" not in text and "pydantic" not in text and "validation error" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no pydantic traceback chained


def test_bad_override_names_the_variable():
    with pytest.raises(ConfigError, match="^STABLEALIGN_MAX_CONCURRENCY must be >= 1, got 0$"):
        load_settings(ServiceSettings, {"max_concurrency": 0}, environ={})


def test_several_bad_values_in_one_line():
    env = {"STABLEALIGN_GRPC_PORT": "x", "STABLEALIGN_MAX_CONCURRENCY": "0"}
    with pytest.raises(ConfigError) as info:
        load_settings(ServiceSettings, environ=env)
    text = str(info.value)
    assert "STABLEALIGN_GRPC_PORT='x'" in text and "STABLEALIGN_MAX_CONCURRENCY must be >= 1" in text
    assert "\n" not in text


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown setting 'nope' for DemoSettings"):
        load_settings(DemoSettings, {"nope": 1}, environ={})
    with pytest.raises(ConfigError, match="unknown setting 'nope' for DemoSettings"):
        DemoSettings(nope=1)  # a typo in direct construction too


def test_load_settings_needs_a_settings_class():
    import dataclasses

    @dataclasses.dataclass
    class Plain:
        x: int = 1

    with pytest.raises(TypeError):
        load_settings(Plain, environ={})


def test_settings_are_frozen_and_hashable():
    settings = load_settings(TrainerSettings, environ={"STABLEALIGN_RUNNERS": "local"})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        settings.runner = "kubernetes"
    same = load_settings(TrainerSettings, environ={"STABLEALIGN_RUNNERS": "local"})
    assert settings == same and hash(settings) == hash(same) and len({settings, same}) == 1


def test_rules_live_on_the_fields():
    for cls in (ServiceSettings, AgentSettings, ObserverSettings, WorldSettings, TrainerSettings, EngineSettings):
        assert issubclass(cls, Settings)
        # No hand-written validate() anywhere in the hierarchy: the fields carry the rules.
        assert all("validate" not in vars(k) for k in cls.__mro__ if isinstance(k, type) and issubclass(k, Settings))
    assert all(field.description for field in EngineSettings.model_fields.values())
    assert all(AgentSettings.model_fields[name].description for name in AgentSettings.model_fields
               if name not in ServiceSettings.model_fields)
    for cls, name in ((ServiceSettings, "max_concurrency"), (WorldSettings, "lease_seconds"),
                      (TrainerSettings, "runners")):
        assert cls.model_fields[name].description


# ---------------------------------------------------------------------------------------- service classes

@pytest.mark.parametrize("cls, env, message", [
    (AgentSettings, {"STABLEALIGN_MAX_QUESTION_CHARS": "0"}, "STABLEALIGN_MAX_QUESTION_CHARS must be >= 1"),
    (AgentSettings, {"STABLEALIGN_RATING_ATTEMPTS": "-1"}, "STABLEALIGN_RATING_ATTEMPTS must be >= 1"),
    (AgentSettings, {"STABLEALIGN_REVISE_MAX_TOKENS": "0"}, "STABLEALIGN_REVISE_MAX_TOKENS must be >= 1"),
    (AgentSettings, {"STABLEALIGN_TEMPERATURE": "2.5"}, "STABLEALIGN_TEMPERATURE must be <= 2"),
    (AgentSettings, {"STABLEALIGN_TEMPERATURE": "-0.1"}, "STABLEALIGN_TEMPERATURE must be >= 0"),
    (ObserverSettings, {"STABLEALIGN_MAX_TOKENS": "0"}, "STABLEALIGN_MAX_TOKENS must be >= 1"),
    (ObserverSettings, {"STABLEALIGN_RETRY_TEMPERATURE": "3"}, "STABLEALIGN_RETRY_TEMPERATURE must be <= 2"),
    (ObserverSettings, {"STABLEALIGN_MAX_CONCURRENCY": "0"}, "STABLEALIGN_MAX_CONCURRENCY must be >= 1"),
    (WorldSettings, {"STABLEALIGN_LEASE_SECONDS": "0"}, "STABLEALIGN_LEASE_SECONDS must be > 0"),
    (WorldSettings, {"STABLEALIGN_REQUEST_TIMEOUT_SECONDS": "0"}, "STABLEALIGN_REQUEST_TIMEOUT_SECONDS must be > 0"),
    (WorldSettings, {"STABLEALIGN_HEARTBEAT_SECONDS": "-1"}, "STABLEALIGN_HEARTBEAT_SECONDS must be >= 0"),
    (WorldSettings, {"STABLEALIGN_PRIOR_PUBLISH_CHUNK": "0"}, "STABLEALIGN_PRIOR_PUBLISH_CHUNK must be >= 1"),
    (WorldSettings, {"STABLEALIGN_MAX_INTERACTION_CONCURRENCY": "-1"},
     "STABLEALIGN_MAX_INTERACTION_CONCURRENCY must be >= 0"),
    (TrainerSettings, {"STABLEALIGN_RUNNERS": "local,gpu"}, "STABLEALIGN_RUNNERS='gpu': must be local or kubernetes"),
    (TrainerSettings, {"STABLEALIGN_RUNNER": "slurm"}, "STABLEALIGN_RUNNER='slurm': must be local or kubernetes"),
    (TrainerSettings, {"STABLEALIGN_RUNNERS": "local", "STABLEALIGN_RUNNER": "kubernetes"},
     r"STABLEALIGN_RUNNER='kubernetes': must be one of \['local'\]"),
    (TrainerSettings, {"STABLEALIGN_MAX_PARALLEL_JOBS": "0"}, "STABLEALIGN_MAX_PARALLEL_JOBS must be >= 1"),
    (TrainerSettings, {"STABLEALIGN_POLL_SECONDS": "0"}, "STABLEALIGN_POLL_SECONDS must be > 0"),
    (TrainerSettings, {"STABLEALIGN_CANCEL_GRACE_SECONDS": "-1"}, "STABLEALIGN_CANCEL_GRACE_SECONDS must be >= 0"),
    (TrainerSettings, {"STABLEALIGN_K8S_BACKOFF_LIMIT": "-1"}, "STABLEALIGN_K8S_BACKOFF_LIMIT must be >= 0"),
    (TrainerSettings, {"STABLEALIGN_K8S_IN_CLUSTER": "maybe"}, "STABLEALIGN_K8S_IN_CLUSTER='maybe': expected a boolean"),
    (EngineSettings, {"STABLEALIGN_HF_MAX_BATCH": "0"}, "STABLEALIGN_HF_MAX_BATCH must be >= 1"),
    (EngineSettings, {"STABLEALIGN_HF_PREFILL_TOKENS": "many"}, "STABLEALIGN_HF_PREFILL_TOKENS='many': expected an integer"),
])
def test_service_ranges(cls, env, message):
    with pytest.raises(ConfigError, match="^" + message):
        load_settings(cls, environ=env)


def test_service_classes_read_their_variables():
    agent = load_settings(AgentSettings, environ={"STABLEALIGN_MAX_QUESTION_CHARS": "100",
                                                  "STABLEALIGN_TEMPERATURE": "0"})
    assert agent.max_question_chars == 100 and agent.temperature == 0.0
    world = load_settings(WorldSettings, environ={"STABLEALIGN_LEASE_SECONDS": "9",
                                                  "STABLEALIGN_AGENT_BACKEND": "tgi"})
    assert world.heartbeat_interval == 3 and world.resume_interval == 4.5 and world.agent_backend == "tgi"
    trainer = load_settings(TrainerSettings, environ={"STABLEALIGN_RUNNER": "kubernetes",
                                                      "STABLEALIGN_K8S_IN_CLUSTER": "true"})
    assert trainer.runner == "kubernetes" and trainer.runners == ("local", "kubernetes") and trainer.k8s_in_cluster
    assert trainer.k8s_job_template.endswith("job-template.yaml")


def test_engine_settings_use_their_own_prefix(monkeypatch):
    env = {"STABLEALIGN_HF_MAX_BATCH": "3", "STABLEALIGN_HF_STEP_JOIN": "off", "STABLEALIGN_MAX_BATCH": "99"}
    settings = load_settings(EngineSettings, environ=env)
    assert settings.max_batch == 3 and settings.step_join is False and settings.prefill_tokens == 4096
    monkeypatch.setenv("STABLEALIGN_HF_MAX_BATCH", "4")
    assert engine_settings().max_batch == 4 and engine_settings(max_batch=5).max_batch == 5
    assert engine_settings(max_batch=None).max_batch == 4
