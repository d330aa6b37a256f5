"""The ceiling the single-process LLM stand-in puts on a benchmark round (bench.simulation.stand_in_ceiling)."""

from __future__ import annotations

import math

from bench.simulation import CRITICAL_PATH, stand_in_ceiling


def test_a_round_lasts_at_least_the_waves_latencies_plus_the_servers_own_cpu():
    assert len(CRITICAL_PATH) == 4
    # 100 agents, 200 ms per call, 4 CPU ms of the server per interaction: 0.8 s + 0.4 s per round.
    assert math.isclose(stand_in_ceiling(100, 200.0, 4.0), 100 / 1.2)
    # Without server CPU only the latency bounds it; twice the agents, twice the CPU per round.
    assert math.isclose(stand_in_ceiling(100, 200.0, 0.0), 125.0)
    assert stand_in_ceiling(200, 200.0, 4.0) < stand_in_ceiling(100, 200.0, 4.0) * 2
    assert stand_in_ceiling(100, 0.0, 0.0) == math.inf
