"""Settings of the observer service (``STABLEALIGN_<FIELD>`` environment variables, flags win)."""

from __future__ import annotations

from dataclasses import dataclass

from stablealign.config import ServiceSettings, env_name
from stablealign.errors import ConfigError


@dataclass(frozen=True)
class ObserverSettings(ServiceSettings):
    # Longest question / answer accepted, characters.
    max_question_chars: int = 4000
    max_answer_chars: int = 16000
    # Tries of a rating that cannot be parsed (each with another seed), then it is recorded missing.
    rating_attempts: int = 3
    # World specs cached per process (LRU).
    max_worlds: int = 4096
    max_tokens: int = 192
    # A judge should be steady; retries after an unparsable reply use retry_temperature to vary.
    temperature: float = 0.2
    retry_temperature: float = 0.7

    def validate(self) -> None:
        super().validate()
        for name in ("max_question_chars", "max_answer_chars", "rating_attempts", "max_worlds", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be >= 1")
        for name in ("temperature", "retry_temperature"):
            if not 0.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{env_name(name)} must be in [0, 2]")
