"""How many worker processes an embedded run starts (stablealign_app.embedded.run_workers; `run --workers`)."""

from __future__ import annotations

import pytest

from stablealign.core.errors import ConfigError
from stablealign.v1 import common_pb2, world_pb2
from stablealign_app.embedded import AUTO_WORKERS, MAX_DEFAULT_WORKERS, run_workers


def _spec(size: int = 10, rounds: int = 2, backend: str = "openai") -> world_pb2.WorldSpec:
    ref = common_pb2.ModelRef(backend=backend)
    return world_pb2.WorldSpec(size=size, rounds=rounds, agent_model=ref, observer_model=ref)


def test_one_per_core_beyond_the_first_up_to_the_cap():
    assert run_workers(_spec(), cpus=2) == 1
    assert run_workers(_spec(), AUTO_WORKERS, cpus=4) == 3
    assert run_workers(_spec(), cpus=64) == MAX_DEFAULT_WORKERS
    assert run_workers(_spec(), cpus=1) == 0


def test_none_for_a_small_world_or_an_in_process_model():
    assert run_workers(_spec(size=3, rounds=2), cpus=8) == 0  # 18 interactions: over before a worker starts
    assert run_workers(_spec(backend="hf"), cpus=8) == 0
    hf_observer = _spec()
    hf_observer.observer_model.backend = "hf"
    assert run_workers(hf_observer, cpus=8) == 0


def test_a_number_given_wins():
    assert run_workers(_spec(size=3), 2, cpus=1) == 2
    assert run_workers(_spec(backend="hf"), 1, cpus=1) == 1
    assert run_workers(_spec(), 0, cpus=8) == 0
    with pytest.raises(ConfigError, match="--workers"):
        run_workers(_spec(), -2, cpus=8)
