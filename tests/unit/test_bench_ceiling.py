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


def test_a_real_model_world_is_measured_against_the_seconds_its_tokens_need_at_the_ceiling():
    from bench.real_model import fraction_of_ceiling

    top = {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": {1: 20.0, 32: 100.0}}
    world = {"seconds": 20.0, "prompt_tokens": 5000, "completion_tokens": 500}
    # 5 s of prefill + 5 s of decoding at the best batch = 10 s of the world's 20 s.
    assert math.isclose(fraction_of_ceiling(world, top), 0.5)
    assert fraction_of_ceiling({"error": "exit 1"}, top) is None
