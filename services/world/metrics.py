"""Prometheus metrics of the world service; world_id labels only on the per-world gauges of running worlds."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from stablealign.core.metrics import LATENCY_BUCKETS

INTERACTIONS = Counter(
    "stablealign_world_interactions_total",
    "Interactions by outcome: published, retry (an attempt failed and is retried), failed (gave up).",
    ["outcome"],
)
FAILURE_WAITS = Counter(
    "stablealign_world_failure_waits_total",
    "Failed interaction tries that wait (capped, jittered backoff) and try again within the world's failure budget, "
    "by step (draft|feedback|rate_before|revise|rate_after|embed|persist|other) and kind (absent: no responders, "
    "timeouts, unavailable; error: e.g. an LLM backend that failed after its own retries).",
    ["step", "kind"],
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
# Per-world gauges: a label per world that this replica runs *now* (removed when the world ends or moves),
# so the set stays as small as the number of running worlds — the dashboard's per-world row.
WORLD_PROGRESS = Gauge(
    "stablealign_world_progress_ratio",
    "Share of a running world's interactions (size² × rounds) whose records are published, by world_id.",
    ["world_id"],
)
WORLD_RECORDS = Gauge(
    "stablealign_world_records_published",
    "Records a running world has published so far, by world_id.",
    ["world_id"],
)


def set_world_progress(world_id: str, published: int, expected: int) -> None:
    WORLD_RECORDS.labels(world_id).set(published)
    WORLD_PROGRESS.labels(world_id).set(published / expected if expected else 0.0)


def forget_world(world_id: str) -> None:
    """Drops a world's per-world series (the world ended here, or another replica took it over)."""
    for gauge in (WORLD_PROGRESS, WORLD_RECORDS):
        try:
            gauge.remove(world_id)
        except KeyError:
            pass
