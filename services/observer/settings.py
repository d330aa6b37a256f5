"""Settings of the observer service (``STABLEALIGN_<FIELD>`` environment variables, flags win)."""

from __future__ import annotations

from pydantic import Field

from stablealign.serving.settings import ServiceSettings


class ObserverSettings(ServiceSettings):
    max_concurrency: int = Field(1024, ge=1, description=(
        "Requests in flight at once per process (NATS handlers and gRPC calls). A world keeps up to 1024 "
        "interactions in flight and the feedback step asks k partners each at once (a 100-agent round with 4-6 "
        "partners: 400-600 requests), so the agents and observers admit a whole such round; the LLM backend "
        "bounds the calls that reach the model (backends.default_max_concurrency)."))
    max_question_chars: int = Field(4000, ge=1, description="Longest question accepted, characters.")
    max_answer_chars: int = Field(16000, ge=1, description="Longest answer accepted, characters.")
    rating_attempts: int = Field(3, ge=1, description="Tries of a rating that cannot be parsed (each with "
                                                      "another seed), then it is recorded missing.")
    max_worlds: int = Field(4096, ge=1, description="World specs cached per process (LRU).")
    max_tokens: int = Field(192, ge=1, description="Token budget of a rating reply.")
    # A judge should be steady; retries after an unparsable reply use retry_temperature to vary.
    temperature: float = Field(0.2, ge=0.0, le=2.0, description="Sampling temperature of a first rating.")
    retry_temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature of a retried rating.")
    alignment_judge: str = Field("llm", pattern="^(llm|probe)$", description=(
        "Who rates alignment: llm (the world's observer model, asked with the rating prompt) or probe (the "
        "alignment probe fitted to human preference on the HH-RLHF prior split; its reason says so). The probe "
        "is for observer models too small to judge (`stable-align judge` measures both); engagement is always "
        "rated by the observer model."))
