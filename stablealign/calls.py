"""What the LLM-calling services (agent, observer) share around one request: input checks and
the accounting of the model calls behind one reply (retries of unparsable replies included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stablealign.errors import ConfigError, ConflictError, ValidationError
from stablealign.ratings import RATING_SCALE, ParsedRating, parse_rating
from stablealign.v1 import common_pb2, world_pb2


@dataclass
class CallTally:
    """Sums ``Completion`` accounting over the calls behind one reply, into a ``CallStats``."""

    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_seconds: float = 0.0
    attempts: int = 0

    def add(self, completion: Any) -> None:
        self.model = completion.model or self.model
        self.prompt_tokens += int(completion.prompt_tokens)
        self.completion_tokens += int(completion.completion_tokens)
        self.latency_seconds += float(completion.latency_seconds)
        self.attempts += int(completion.attempts)

    def stats(self) -> common_pb2.CallStats:
        return common_pb2.CallStats(model=self.model, prompt_tokens=self.prompt_tokens,
                                    completion_tokens=self.completion_tokens,
                                    latency_seconds=self.latency_seconds, attempts=self.attempts)


async def chat_until_rated(backend: Any, tally: CallTally, attempts: int,
                           request_for: Callable[[int], Any]) -> tuple[str, ParsedRating]:
    """Asks for a ``Rating: <n> ### Reason: <text>`` reply until one parses, at most ``attempts`` times.

    ``request_for(attempt)`` builds each attempt's ChatRequest (a new seed each time, so a retry is
    not the same sample). Returns the last reply and its parse; the score stays None when no reply
    could be read — the caller records it as missing, never as a number.
    """
    text, parsed = "", ParsedRating(None, "")
    for attempt in range(attempts):
        completion = await backend.chat(request_for(attempt))
        tally.add(completion)
        text = completion.text.strip()
        parsed = parse_rating(text, RATING_SCALE)
        if parsed.score is not None:
            break
    return text, parsed


def check_text(value: str, name: str, limit: int) -> str:
    """The stripped text; ValidationError when it is empty or longer than ``limit`` characters."""
    if len(value) > limit:
        raise ValidationError(f"{name} has {len(value)} characters, more than the limit of {limit}")
    text = value.strip()
    if not text:
        raise ValidationError(f"{name} must not be empty")
    return text


def check_round(round_: int) -> None:
    if round_ < 0:
        raise ValidationError(f"round must be >= 0, got {round_}")


def world_chat_backend(world: world_pb2.World, role: str, ref: common_pb2.ModelRef):
    """The chat backend a world names for ``role``; an unusable one is the world's problem (ConflictError)."""
    from stablealign.backends import get_chat_backend  # late: backends pull optional heavy modules

    try:
        return get_chat_backend(ref)
    except (ConfigError, ValidationError) as exc:
        raise ConflictError(f"world {world.spec.world_id}: {role} model {ref.backend or '?'}:"
                            f"{ref.model or ''} is unusable: {exc}") from exc
