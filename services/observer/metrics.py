"""Prometheus metrics of the observer service."""

from __future__ import annotations

from prometheus_client import Counter

RATINGS = Counter(
    "stablealign_observer_ratings_total",
    "Ratings by aspect (alignment|engagement) and outcome: probabilities (argmax of the model's P(1..7)), "
    "parsed (1..7 read from text), probe (the alignment probe's rating) or missing (unparsable after retries).",
    ["aspect", "outcome"],
)
RATING_ATTEMPTS = Counter(
    "stablealign_observer_rating_attempts_total",
    "Model calls made for ratings, retries of unparsable replies included.",
    ["aspect"],
)
