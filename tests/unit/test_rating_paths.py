"""chat_until_rated: token probabilities where a backend has them, the text parser otherwise."""

from __future__ import annotations

import math

from stablealign.llm.backends.base import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    Completion,
    DigitDistribution,
    RatedCompletion,
)
from stablealign.llm.calls import CallTally, chat_until_rated


class ScriptedBackend(ChatBackend):
    """Replies from a script; with ``digits`` it reads 'probabilities' like a local model."""

    name = "scripted"

    def __init__(self, replies: list[str], digits: list[DigitDistribution | None] | None = None) -> None:
        super().__init__("scripted")
        self.replies, self.digits, self.calls = list(replies), list(digits or []), 0
        self.rates_from_probabilities = digits is not None

    async def _chat_once(self, request: ChatRequest) -> Completion:
        self.calls += 1
        return Completion(self.replies.pop(0), self.model)

    async def _rate_once(self, request: ChatRequest, scale: int) -> RatedCompletion:
        completion = await self._chat_once(request)
        return RatedCompletion(completion, self.digits.pop(0))


def request_for(attempt: int) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", "rate")], seed=attempt)


def test_digit_distribution():
    dist = DigitDistribution.from_logprobs({1: math.log(0.1), 3: math.log(0.3), 7: math.log(0.6), 9: 0.0}, 7)
    assert dist.score == 7
    assert math.isclose(sum(dist.probabilities), 1.0)
    assert math.isclose(dist.expected, 0.1 * 1 + 0.3 * 3 + 0.6 * 7)
    assert DigitDistribution.from_logprobs({8: 0.0}, 7) is None
    tie = DigitDistribution((0.5, 0.5, 0, 0, 0, 0, 0))
    assert tie.score == 1  # the first of equal maxima, like the loss's best response


async def test_probabilities_give_a_rating_on_the_first_attempt():
    dist = DigitDistribution((0.0, 0.1, 0.2, 0.6, 0.1, 0.0, 0.0))
    backend = ScriptedBackend(["Rating: 4 ### Reason: fair enough"], [dist])
    tally = CallTally()
    reply = await chat_until_rated(backend, tally, 3, request_for)
    assert (reply.score, reply.reason) == (4, "fair enough")
    assert math.isclose(reply.expected, dist.expected) and reply.probabilities == dist.probabilities
    assert backend.calls == 1 and tally.attempts == 1


async def test_text_is_parsed_and_retried_without_probabilities():
    backend = ScriptedBackend(["I cannot say.", "Rating: five ### Reason: ok"])
    reply = await chat_until_rated(backend, CallTally(), 3, request_for)
    assert (reply.score, reply.expected, reply.probabilities) == (5, None, ())
    assert backend.calls == 2


async def test_a_probability_backend_without_digits_falls_back_to_the_text():
    backend = ScriptedBackend(["no digits here", "Rating: 2 ### Reason: rude"], [None, None])
    reply = await chat_until_rated(backend, CallTally(), 3, request_for)
    assert (reply.score, reply.reason, reply.expected) == (2, "rude", None)


async def test_missing_after_all_attempts_is_none():
    backend = ScriptedBackend(["?", "??", "???"])
    reply = await chat_until_rated(backend, CallTally(), 3, request_for)
    assert reply.score is None and reply.text == "???"
