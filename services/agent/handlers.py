"""Draft, Feedback and Revise: the agent's three steps of an interaction, shared by NATS and gRPC.

Each handler validates its request (unknown world or agent: NotFoundError; empty or oversized
text: ValidationError), builds the prompt, calls the world's agent model and returns the
reply with its call accounting. Seeds come from the world seed and the step's coordinates
(``stablealign.sandbox.worlds.derive_seed``), so the same world gives the same records on any replica,
and a retried request gives the same answer — the world relies on that to resend safely.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from services.agent import metrics, prompts
from services.agent.answers import clean_answer, echoes_template
from services.agent.settings import AgentSettings
from stablealign.core.errors import BackendError, ConfigError, ConflictError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.backends import get_embedder
from stablealign.llm.backends.base import (
    TASK_DRAFT,
    TASK_FEEDBACK,
    TASK_REVISE,
    ChatBackend,
    ChatMessage,
    ChatRequest,
)
from stablealign.llm.calls import (
    CallTally,
    chat_until_rated,
    check_round,
    check_text,
    llm_deadline,
    within_deadline,
    world_chat_backend,
)
from stablealign.sandbox.memory import DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_THRESHOLD, MemoryStore
from stablealign.sandbox.ratings import RATING_SCALE, check_rating_message
from stablealign.sandbox.worlds import WorldSpecCache, check_agent, derive_seed, persona_of
from stablealign.training.critiques import speaks_of_an_answer
from stablealign.training.repetition import loops
from stablealign.v1 import agent_pb2, common_pb2, world_pb2

log = get_logger(__name__)



class AgentHandlers:
    """The agent service's request handlers; one instance per process, safe for concurrent use."""

    def __init__(self, settings: AgentSettings, worlds: WorldSpecCache, memory: MemoryStore) -> None:
        self.settings = settings
        self.worlds = worlds
        self.memory = memory

    async def _complete(self, backend: ChatBackend, tally: CallTally, *, messages: list[ChatMessage],
                        max_tokens: int, seed: int, task: str, hints: dict[str, Any]) -> str:
        # A hung model: cancelled at the deadline, and the step answers 503 naming itself and the model.
        completion = await within_deadline(
            backend.chat(ChatRequest(messages=messages, max_tokens=max_tokens, temperature=self.settings.temperature,
                                     seed=seed, task=task, hints={**hints, "seed": seed})),
            deadline=llm_deadline(self.settings, backend), step=task, backend=backend,
            context={"agent_id": hints.get("agent_id"), "round": hints.get("round")})
        tally.add(completion)
        return completion.text.strip()

    async def _answer(self, backend: ChatBackend, tally: CallTally, *, seed_parts: tuple, world_seed: int,
                      **kwargs: Any) -> str:
        """A draft or revision. An empty reply, or one that echoes the prompt's wording (with
        ``retry_non_answers``: or loops, or speaks of an answer instead of answering), is asked again with
        another seed; after the last attempt such an answer is kept (it is still the model's answer, and
        the observers rate it), an empty reply is an error."""
        last = ""
        for attempt in range(self.settings.answer_attempts):
            raw = await self._complete(backend, tally, seed=derive_seed(world_seed, *seed_parts, attempt), **kwargs)
            text = clean_answer(raw)
            reason = self._rejection(text)
            if reason is None:
                return text
            metrics.ANSWERS_REJECTED.labels(reason).inc()
            log.info("agent.answer_rejected", extra={"step": seed_parts[0], "round": seed_parts[1],
                                                     "agent_id": seed_parts[2], "attempt": attempt + 1,
                                                     "reason": reason})
            last = text or last
        if last:
            return last
        raise BackendError(f"{backend.name}: empty answer after {self.settings.answer_attempts} attempts")

    def _rejection(self, text: str) -> str | None:
        """Why ``text`` is not taken as the answer (``ANSWERS_REJECTED``'s reason), or None."""
        if not text:
            return "empty"
        if echoes_template(text, prompts.TEMPLATE_TEXTS):
            return "echo"
        if self.settings.retry_non_answers:
            if loops(text):
                return "loop"
            if speaks_of_an_answer(text):
                return "critique"
        return None

    async def _query_embedding(self, world: world_pb2.World, request: agent_pb2.DraftRequest,
                               question: str) -> np.ndarray:
        if request.question_embedding:
            return np.asarray(request.question_embedding, dtype=np.float32)
        ref = world.spec.embedding_model
        try:
            embedder = get_embedder(ref)
        except (ConfigError, ValidationError) as exc:
            raise ConflictError(f"world {world.spec.world_id}: embedding model {ref.backend}:{ref.model} "
                                f"is unusable: {exc}") from exc
        return np.asarray(await embedder.embed([question]), dtype=np.float32)[0]

    # --- Draft ---------------------------------------------------------------------------------------

    async def draft(self, request: agent_pb2.DraftRequest) -> agent_pb2.DraftResponse:
        started = time.perf_counter()
        world = await self.worlds.get(request.world_id)
        persona = persona_of(world, request.agent_id)
        question = check_text(request.question, "question", self.settings.max_question_chars)
        check_round(request.round)
        spec = world.spec
        backend = world_chat_backend(world, "agent", spec.agent_model)
        memory, query = await asyncio.gather(self.memory.get(spec.world_id, request.agent_id),
                                             self._query_embedding(world, request, question))
        metrics.MEMORY_AGENTS.set(len(self.memory))
        memories = await memory.aretrieve(query, spec.retrieval_k or DEFAULT_RETRIEVAL_K,
                                          spec.retrieval_threshold or DEFAULT_RETRIEVAL_THRESHOLD,
                                          before_round=request.round)
        metrics.RETRIEVED_MEMORIES.observe(len(memories))
        tally = CallTally()
        hints = {
            "persona": prompts.persona_name(persona), "question": question,
            "memories": [{"question": m.question, "answer": m.answer, "similarity": float(m.similarity)}
                         for m in memories],
            "agent_id": request.agent_id, "round": request.round,
        }
        answer = await self._answer(
            backend, tally, world_seed=spec.seed, seed_parts=("draft", request.round, request.agent_id),
            messages=prompts.draft_messages(request.agent_id, persona, question, memories),
            max_tokens=self.settings.draft_max_tokens, task=TASK_DRAFT, hints=hints)
        log.debug("agent.draft", extra={"world_id": spec.world_id, "agent_id": request.agent_id,
                                        "round": request.round, "memories": len(memories),
                                        "seconds": round(time.perf_counter() - started, 4)})
        return agent_pb2.DraftResponse(answer=answer, memories=memories, stats=tally.stats(), persona=persona)

    # --- Feedback ------------------------------------------------------------------------------------

    async def feedback(self, request: agent_pb2.FeedbackRequest) -> agent_pb2.FeedbackResponse:
        world = await self.worlds.get(request.world_id)
        persona = persona_of(world, request.agent_id)
        check_agent(world, request.author_id)
        question = check_text(request.question, "question", self.settings.max_question_chars)
        answer = check_text(request.answer, "answer", self.settings.max_answer_chars)
        check_round(request.round)
        spec = world.spec
        backend = world_chat_backend(world, "agent", spec.agent_model)
        tally = CallTally()
        messages = prompts.feedback_messages(request.agent_id, persona, request.author_id, question, answer)
        hints = {"persona": prompts.persona_name(persona), "question": question, "answer": answer,
                 "agent_id": request.agent_id, "round": request.round}

        def request_for(attempt: int) -> ChatRequest:
            seed = derive_seed(spec.seed, "feedback", request.round, request.author_id, request.agent_id, attempt)
            return ChatRequest(messages=messages, max_tokens=self.settings.feedback_max_tokens,
                               temperature=self.settings.temperature, seed=seed, task=TASK_FEEDBACK,
                               hints={**hints, "seed": seed})

        reply = await chat_until_rated(backend, tally, self.settings.rating_attempts, request_for,
                                       deadline=llm_deadline(self.settings, backend), step=TASK_FEEDBACK,
                                       context={"world_id": spec.world_id, "agent_id": request.agent_id,
                                                "round": request.round})
        feedback = common_pb2.Feedback(partner_id=request.agent_id, text=reply.text, reason=reply.reason)
        if reply.score is not None:
            feedback.rating = reply.score
            if reply.expected is not None:
                feedback.expected = reply.expected
                feedback.probabilities.extend(reply.probabilities)
            metrics.FEEDBACK_RATINGS.labels("probabilities" if reply.expected is not None else "parsed").inc()
        else:
            metrics.FEEDBACK_RATINGS.labels("missing").inc()
            log.warning("agent.feedback_unparsable", extra={"world_id": spec.world_id, "agent_id": request.agent_id,
                                                            "round": request.round,
                                                            "attempts": self.settings.rating_attempts})
        return agent_pb2.FeedbackResponse(feedback=feedback, stats=tally.stats())

    # --- Revise --------------------------------------------------------------------------------------

    async def revise(self, request: agent_pb2.ReviseRequest) -> agent_pb2.ReviseResponse:
        world = await self.worlds.get(request.world_id)
        persona = persona_of(world, request.agent_id)
        question = check_text(request.question, "question", self.settings.max_question_chars)
        draft = check_text(request.draft_answer, "draft_answer", self.settings.max_answer_chars)
        check_round(request.round)
        if len(request.feedback) > self.settings.max_feedback_items:
            raise ValidationError(f"{len(request.feedback)} feedback items, more than the limit of "
                                  f"{self.settings.max_feedback_items}")
        ratings: list[int | None] = []
        reasons: list[str] = []
        for item in request.feedback:
            # rating 1..7, expected finite in [1, 7], P(1..7) summing to 1: else 400, never recorded
            check_rating_message(item, f"feedback of partner {item.partner_id}", RATING_SCALE)
            if item.HasField("rating"):
                ratings.append(item.rating)
            else:
                ratings.append(None)
            reason = (item.reason or item.text).strip()
            if len(reason) > self.settings.max_answer_chars:
                raise ValidationError(f"feedback of partner {item.partner_id} is longer than "
                                      f"{self.settings.max_answer_chars} characters")
            reasons.append(reason)
        spec = world.spec
        backend = world_chat_backend(world, "agent", spec.agent_model)
        tally = CallTally()
        hints = {"persona": prompts.persona_name(persona), "question": question, "draft": draft,
                 "ratings": ratings, "reasons": reasons, "agent_id": request.agent_id, "round": request.round}
        answer = await self._answer(
            backend, tally, world_seed=spec.seed, seed_parts=("revise", request.round, request.agent_id),
            messages=prompts.revise_messages(request.agent_id, persona, question, draft, ratings, reasons),
            max_tokens=self.settings.revise_max_tokens, task=TASK_REVISE, hints=hints)
        return agent_pb2.ReviseResponse(answer=answer, stats=tally.stats())
