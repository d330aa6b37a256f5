"""Settings of the agent service (``STABLEALIGN_<FIELD>`` environment variables, flags win)."""

from __future__ import annotations

from pydantic import Field

from stablealign.serving.settings import ServiceSettings


class AgentSettings(ServiceSettings):
    max_concurrency: int = Field(1024, ge=1, description=(
        "Requests in flight at once per process (NATS handlers and gRPC calls). A world keeps up to 1024 "
        "interactions in flight and the feedback step asks k partners each at once (a 100-agent round with 4-6 "
        "partners: 400-600 requests), so the agents and observers admit a whole such round; the LLM backend "
        "bounds the calls that reach the model (backends.default_max_concurrency)."))
    max_question_chars: int = Field(4000, ge=1, description="Longest question accepted, characters (a longer "
                                                            "one is a client bug, not a prompt).")
    max_answer_chars: int = Field(16000, ge=1, description="Longest draft / answer accepted in Feedback and "
                                                           "Revise, characters.")
    max_feedback_items: int = Field(64, ge=1, description="Most feedback items one Revise may carry.")
    rating_attempts: int = Field(3, ge=1, description="Tries of a partner's feedback whose rating cannot be "
                                                      "parsed (each with another seed).")
    answer_attempts: int = Field(3, ge=1, description="Tries of a draft or revision that comes back empty or "
                                                      "echoes its prompt (each with another seed).")
    retry_non_answers: bool = Field(False, description="Also ask again (within answer_attempts) a draft or "
                                    "revision that loops or speaks of an answer instead of answering; after the "
                                    "last attempt it is kept, and data build scores it 1.")
    max_memory_agents: int = Field(10000, ge=1, description="Agents whose memory one process keeps decoded "
                                                            "(LRU); the rest are re-read from JetStream.")
    max_worlds: int = Field(4096, ge=1, description="World specs cached per process (LRU).")
    # Generation limits per step.
    draft_max_tokens: int = Field(256, ge=1, description="Token budget of a draft.")
    feedback_max_tokens: int = Field(192, ge=1, description="Token budget of a feedback reply.")
    revise_max_tokens: int = Field(320, ge=1, description="Token budget of a revision.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature of every step.")
