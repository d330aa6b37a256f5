"""settle_heap: the process's start-up objects frozen, young collections spaced as configured."""

from __future__ import annotations

import gc

import pytest

from stablealign.core.config import load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.process import settle_heap
from stablealign.serving.settings import ServiceSettings


@pytest.fixture
def restored_gc():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_spaces_young_collections_and_keeps_the_older_thresholds(restored_gc):
    gc.set_threshold(700, 11, 12)
    settle_heap(20_000)
    assert gc.get_threshold() == (20_000, 11, 12)
    assert gc.get_freeze_count() > 0


def test_zero_keeps_the_interpreters_thresholds(restored_gc):
    gc.set_threshold(700, 10, 10)
    settle_heap(0)
    assert gc.get_threshold() == (700, 10, 10)


def test_cycles_are_still_collected_automatically_after_it(restored_gc):
    settle_heap(2_000)

    class Node:
        pass

    collected_before = sum(stats["collected"] for stats in gc.get_stats())
    for _ in range(5_000):  # 5,000 two-object cycles: 10,000 allocations, no explicit gc.collect()
        a, b = Node(), Node()
        a.other, b.other = b, a
    assert sum(stats["collected"] for stats in gc.get_stats()) - collected_before >= 2_000


def test_the_setting_default_env_and_bounds():
    assert load_settings(ServiceSettings, environ={}).gc_gen0_threshold == 20_000
    assert load_settings(ServiceSettings, environ={"STABLEALIGN_GC_GEN0_THRESHOLD": "0"}).gc_gen0_threshold == 0
    with pytest.raises(ConfigError, match="STABLEALIGN_GC_GEN0_THRESHOLD"):
        load_settings(ServiceSettings, environ={"STABLEALIGN_GC_GEN0_THRESHOLD": "-1"})
