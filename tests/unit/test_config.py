"""Settings: env vars with typed defaults, overrides win, bad values fail fast with the variable's name."""

from __future__ import annotations

import dataclasses

import pytest

from stablealign.config import ServiceSettings, load_settings
from stablealign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
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


@pytest.mark.parametrize("env, message", [
    ({"STABLEALIGN_RETRIES": "three"}, "STABLEALIGN_RETRIES='three': expected an integer"),
    ({"STABLEALIGN_VERBOSE": "maybe"}, "expected a boolean"),
    ({"STABLEALIGN_NATS_URL": "http://x"}, "expected a nats:// URL"),
    ({"STABLEALIGN_LOG_FORMAT": "xml"}, "json, console or auto"),
])
def test_bad_values_fail_fast(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(DemoSettings, environ=env)


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(DemoSettings, {"nope": 1}, environ={})
