"""How much memory a world will need, estimated before it is accepted (CreateWorld).

A world is refused with a ValidationError (400 / INVALID_ARGUMENT) naming the limit when its
estimate exceeds ``WorldSettings.max_world_memory_mb``, instead of being accepted and then
growing a process until it is killed (a very large world used to exhaust memory while still
PENDING). The estimate covers all processes of a run together — nats-server, the agent, observer
and world services and ``stable-align run``'s export of records.jsonl — and is linear:

    BASE + agents x (PER_AGENT + 4 x M) + agents x rounds x PER_RECORD + the shared prior pool

The constants are measured by ``python -m bench.scale`` (one-round worlds on the offline backend
through NATS, peak RSS of all processes summed); the figures they come from, and which worlds the
default limit accepts, are in docs/benchmarks.md ("Memory estimate of a world").
The default limit is the world pod's memory limit (deploy/k8s/base/world.yaml): the estimate of
all processes together staying below it keeps the world pod's own share below it too. The same
limit bounds the worlds one replica runs at once (``WorldManager.check_room``).
"""

from __future__ import annotations

from stablealign.core.errors import ValidationError
from stablealign.v1 import world_pb2

MB = 1 << 20
# Processes of a run at rest (interpreters, imported libraries, nats-server).
BASE_BYTES = 512 * MB
# Per agent, whatever the rounds: the world's draws, scores and labels, nats-server's per-subject state of
# the memory stream, and an agent replica's cached memory (a pool reference, M indices, an object).
PER_AGENT_BYTES = 6 * 1024
PER_PRIOR_ENTRY_BYTES = 4  # one int32 pool index per prior memory of an agent
# Per interaction record of the whole world: `stable-align run` reads all of them back to write
# records.jsonl, nats-server caches stream blocks, and the agent's cached memory grows by one revision.
PER_RECORD_BYTES = 18 * 1024
# Per embedding row of the shared pool (float32) and per pool entry (texts, index).
EMBEDDING_DIM = 384
PER_POOL_ENTRY_BYTES = 2 * 1024


def estimate_world_bytes(spec: world_pb2.WorldSpec, prior_pairs: int | None = None) -> int:
    """Estimated peak memory of running ``spec`` (resolved), all processes together."""
    agents = spec.size * spec.size
    prior = max(0, spec.prior_size)
    if prior_pairs is not None:
        prior = min(prior, prior_pairs)
    # The pool holds each (pair, persona) entry the world's agents use once: at most 2 x pairs, at most agents x M.
    entries = min(agents * prior, 2 * prior_pairs) if prior_pairs is not None else agents * prior
    pool = entries * (PER_POOL_ENTRY_BYTES + EMBEDDING_DIM * 4)
    return (BASE_BYTES + agents * (PER_AGENT_BYTES + PER_PRIOR_ENTRY_BYTES * prior)
            + agents * max(1, spec.rounds) * PER_RECORD_BYTES + pool)


def check_world_memory(spec: world_pb2.WorldSpec, limit_mb: float, prior_pairs: int | None = None) -> int:
    """Raises ValidationError when the world's estimate exceeds ``limit_mb`` (0: no limit); returns the estimate."""
    estimate = estimate_world_bytes(spec, prior_pairs)
    if limit_mb and estimate > limit_mb * MB:
        agents = spec.size * spec.size
        per_agent_round = (estimate - BASE_BYTES) / max(1, agents * max(1, spec.rounds))
        largest = max_agents(limit_mb, spec.rounds, spec.prior_size)
        raise ValidationError(
            f"world of {agents:,} agents ({spec.size}x{spec.size}) x {spec.rounds:,} rounds would need an estimated "
            f"{estimate / MB:,.0f} MB (~{per_agent_round / 1024:.0f} KB per agent and round, all processes "
            f"together), more than the limit max_world_memory_mb = {limit_mb:,.0f} MB "
            f"(STABLEALIGN_MAX_WORLD_MEMORY_MB); at {spec.rounds:,} rounds this limit allows about "
            f"{largest:,} agents")
    return estimate


def max_agents(limit_mb: float, rounds: int, prior_size: int) -> int:
    """The most agents whose estimate fits ``limit_mb`` (ignoring the pool, which is a few MB)."""
    per_agent = PER_AGENT_BYTES + PER_PRIOR_ENTRY_BYTES * max(0, prior_size) + max(1, rounds) * PER_RECORD_BYTES
    return max(0, int((limit_mb * MB - BASE_BYTES) // per_agent))
