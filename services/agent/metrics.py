"""Prometheus metrics of the agent service (no world or agent id labels: those sets are unbounded)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MEMORY_AGENTS = Gauge(
    "stablealign_agent_memory_agents",
    "Agents whose memory this process holds decoded in its cache.",
)
MEMORY_READS = Counter(
    "stablealign_agent_memory_reads_total",
    "Reads of agent memory from JetStream: full (cache miss) or incremental (newer batches on a hit).",
    ["kind"],
)
RETRIEVED_MEMORIES = Histogram(
    "stablealign_agent_retrieved_memories",
    "Memories put into one draft prompt (after the similarity threshold).",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21),
)
ANSWERS_REJECTED = Counter(
    "stablealign_agent_answers_rejected_total",
    "Drafts and revisions asked again, by reason: empty, echo (repeats the prompt's wording), and with "
    "retry_non_answers loop or critique (speaks of an answer instead of answering).",
    ["reason"],
)
FEEDBACK_RATINGS = Counter(
    "stablealign_agent_feedback_ratings_total",
    "Partner feedback by outcome: probabilities (argmax of the model's P(1..7)), parsed (a 1..7 rating read "
    "from text) or missing (unparsable after retries).",
    ["outcome"],
)
