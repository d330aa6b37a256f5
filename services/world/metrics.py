"""Prometheus metrics of the world service; no world id labels (that set is unbounded)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from stablealign.metrics import LATENCY_BUCKETS

INTERACTIONS = Counter(
    "stablealign_world_interactions_total",
    "Interactions by outcome: published, retry (an attempt failed and is retried), failed (gave up).",
    ["outcome"],
)
INTERACTION_SECONDS = Histogram(
    "stablealign_world_interaction_duration_seconds",
    "Wall time of one interaction (embed, draft, feedback + ratings, revise, ratings, publish).",
    buckets=LATENCY_BUCKETS,
)
ROUND_SECONDS = Histogram(
    "stablealign_world_round_duration_seconds",
    "Wall time of one round of a world.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
ROUNDS_COMPLETED = Counter(
    "stablealign_world_rounds_completed_total",
    "Rounds completed, over all worlds.",
)
ALIGNMENT_SCORE = Gauge(
    "stablealign_world_alignment_score",
    "Population mean observer alignment rating (1-7) of the last completed round, by stage (before|after).",
    ["stage"],
)
SETUP_SECONDS = Histogram(
    "stablealign_world_setup_duration_seconds",
    "Time to seed the prior memories of a world.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
WORLDS_RUNNING = Gauge(
    "stablealign_world_worlds_running",
    "Worlds this replica is running now.",
)
