"""Settings of the agent service (``STABLEALIGN_<FIELD>`` environment variables, flags win)."""

from __future__ import annotations

from dataclasses import dataclass

from stablealign.config import ServiceSettings, env_name
from stablealign.errors import ConfigError


@dataclass(frozen=True)
class AgentSettings(ServiceSettings):
    # Longest question accepted, characters (a longer one is a client bug, not a prompt).
    max_question_chars: int = 4000
    # Longest draft / answer accepted in Feedback and Revise, characters.
    max_answer_chars: int = 16000
    # Most feedback items one Revise may carry.
    max_feedback_items: int = 64
    # Tries of a partner's feedback whose rating cannot be parsed (each with another seed).
    rating_attempts: int = 3
    # Tries of a draft or revision that comes back empty or echoes its prompt (each with another seed).
    answer_attempts: int = 3
    # Agents whose memory one process keeps decoded (LRU); the rest are re-read from JetStream.
    max_memory_agents: int = 10000
    # World specs cached per process (LRU).
    max_worlds: int = 4096
    # Generation limits per step.
    draft_max_tokens: int = 256
    feedback_max_tokens: int = 192
    revise_max_tokens: int = 320
    temperature: float = 0.7

    def validate(self) -> None:
        super().validate()
        for name in ("max_question_chars", "max_answer_chars", "max_feedback_items", "rating_attempts",
                     "answer_attempts", "max_memory_agents", "max_worlds", "draft_max_tokens",
                     "feedback_max_tokens", "revise_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"{env_name('temperature')} must be in [0, 2]")
