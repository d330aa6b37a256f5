"""Rate: one observer rating of one answer on one aspect, shared by NATS and gRPC.

An unparsable reply is asked again with another seed (and a warmer temperature) up to
``rating_attempts`` times; after that the rating is returned *missing* — ``score`` unset, never
a sentinel number — with the reason saying so, and the world records it as ``null``.
"""

from __future__ import annotations

from services.observer import metrics
from services.observer.settings import ObserverSettings
from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm import rating_prompts as prompts
from stablealign.llm.backends.base import TASK_RATE_ALIGNMENT, TASK_RATE_ENGAGEMENT, ChatRequest
from stablealign.llm.backends.embeddings import MiniLMEmbedder
from stablealign.llm.backends.probe import ProbeJudge
from stablealign.llm.calls import (
    CallTally,
    chat_until_rated,
    check_round,
    check_text,
    llm_deadline,
    world_chat_backend,
)
from stablealign.sandbox.worlds import WorldSpecCache, check_agent, derive_seed
from stablealign.v1 import common_pb2, observer_pb2

log = get_logger(__name__)

# aspect -> (metric label, backend task, prompt builder)
ASPECTS = {
    observer_pb2.RATING_ASPECT_ALIGNMENT: ("alignment", TASK_RATE_ALIGNMENT, prompts.alignment_messages),
    observer_pb2.RATING_ASPECT_ENGAGEMENT: ("engagement", TASK_RATE_ENGAGEMENT, prompts.engagement_messages),
}


class ObserverHandlers:
    def __init__(self, settings: ObserverSettings, worlds: WorldSpecCache) -> None:
        self.settings = settings
        self.worlds = worlds
        self._probe: ProbeJudge | None = None

    async def _rate_by_probe(self, question: str, answer: str) -> observer_pb2.RateResponse:
        """The alignment probe's rating (fitted, or read from its cache, at the first call)."""
        if self._probe is None:
            self._probe = ProbeJudge(MiniLMEmbedder())
        digits, reason = await self._probe.rate(question, answer)
        rating = common_pb2.Rating(score=digits.score, reason=reason, expected=digits.expected)
        rating.probabilities.extend(digits.probabilities)
        metrics.RATINGS.labels("alignment", "probe").inc()
        return observer_pb2.RateResponse(rating=rating, raw=f"Rating: {digits.score} ### Reason: {reason}")

    async def rate(self, request: observer_pb2.RateRequest) -> observer_pb2.RateResponse:
        if request.aspect not in ASPECTS:
            raise ValidationError("aspect must be RATING_ASPECT_ALIGNMENT or RATING_ASPECT_ENGAGEMENT")
        if len(request.stage) > 32:
            raise ValidationError("stage is informative ('before' or 'after'); at most 32 characters")
        world = await self.worlds.get(request.world_id)
        check_agent(world, request.agent_id)
        question = check_text(request.question, "question", self.settings.max_question_chars)
        answer = check_text(request.answer, "answer", self.settings.max_answer_chars)
        check_round(request.round)
        aspect, task, build_messages = ASPECTS[request.aspect]
        spec = world.spec
        if aspect == "alignment" and self.settings.alignment_judge == "probe":
            return await self._rate_by_probe(question, answer)
        backend = world_chat_backend(world, "observer", spec.observer_model)
        messages = build_messages(question, answer)
        tally = CallTally()

        def request_for(attempt: int) -> ChatRequest:
            seed = derive_seed(spec.seed, "rate", aspect, request.stage, request.round, request.agent_id, attempt)
            temperature = self.settings.temperature if attempt == 0 else self.settings.retry_temperature
            metrics.RATING_ATTEMPTS.labels(aspect).inc()
            return ChatRequest(messages=messages, max_tokens=self.settings.max_tokens, temperature=temperature,
                               seed=seed, task=task, hints={"question": question, "answer": answer, "seed": seed})

        reply = await chat_until_rated(backend, tally, self.settings.rating_attempts, request_for,
                                       deadline=llm_deadline(self.settings, backend),
                                       step=f"rate {aspect} {request.stage}".strip(),
                                       context={"world_id": spec.world_id, "agent_id": request.agent_id,
                                                "round": request.round})
        rating = common_pb2.Rating()
        if reply.score is not None:
            rating.score = reply.score
            rating.reason = reply.reason
            if reply.expected is not None:
                rating.expected = reply.expected
                rating.probabilities.extend(reply.probabilities)
            metrics.RATINGS.labels(aspect, "probabilities" if reply.expected is not None else "parsed").inc()
        else:
            rating.reason = f"unparsable rating after {self.settings.rating_attempts} attempts"
            metrics.RATINGS.labels(aspect, "missing").inc()
            log.warning("observer.rating_unparsable", extra={
                "world_id": spec.world_id, "agent_id": request.agent_id, "round": request.round,
                "aspect": aspect, "stage": request.stage, "attempts": self.settings.rating_attempts})
        return observer_pb2.RateResponse(rating=rating, raw=reply.text, stats=tally.stats())
