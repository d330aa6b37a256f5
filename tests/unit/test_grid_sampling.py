"""Partners without listing the neighbourhood: the same properties as pick_partners, O(1) per partner."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from services.world import grid


@pytest.mark.parametrize("size,radius", [(1, 0), (3, 1), (5, 2), (6, 1.5), (7, math.sqrt(2)), (8, 4), (4, 10),
                                         (13, 6.5), (40, 3)])
def test_neighbour_count_equals_the_listed_neighbourhood(size, radius):
    for a in range(size * size):
        assert grid.neighbour_count(a, size, radius) == len(grid.neighbours(a, size, radius))


def test_large_neighbourhood_counts():
    for agent in (0, 316, 158 * 317 + 158, 317 * 317 - 1, 5 * 317 + 300):
        assert grid.neighbour_count(agent, 317, 158.0) == len(grid.neighbours(agent, 317, 158.0))


def test_small_boxes_give_exactly_the_former_partners():
    """Worlds whose neighbourhood box is small (every world of the tests and `make run`) are unchanged."""
    for size, radius in ((3, 1.0), (5, 2.0), (10, 5.0), (20, 10.0)):
        for agent in range(0, size * size, 3):
            for round_ in range(2):
                for probability in (0.0, 0.5):
                    hood = grid.neighbours(agent, size, radius)
                    assert grid.sample_partners(agent, size, radius, partners=4, seed=7, round_=round_,
                                                global_probability=probability) == grid.pick_partners(
                        agent, size, hood, partners=4, seed=7, round_=round_, global_probability=probability)


def test_large_world_partners_are_distinct_in_radius_and_never_listed(monkeypatch):
    """100,489 agents with the default radius S // 2: thousands of picks, and the neighbourhood is never listed
    (the former cost: ~100,000 cells per interaction)."""
    size = 317
    radius = grid.default_radius(size)
    listed = []
    real = grid.neighbours
    monkeypatch.setattr(grid, "neighbours", lambda *a, **k: listed.append(a) or real(*a, **k))
    agents = list(range(0, size * size, 37))  # 2,716 agents: corners, edges and the middle
    for agent in agents:
        picked = grid.sample_partners(agent, size, radius, partners=4, seed=11, round_=0)
        assert len(picked) == 4 and len(set(picked)) == 4 and agent not in picked
        row, col = grid.position(agent, size)
        assert all(math.dist((row, col), grid.position(p, size)) <= radius + 1e-9 for p in picked)
    assert listed == []
    # Deterministic per (seed, round, agent); different seeds and rounds give different partners.
    assert grid.sample_partners(5, size, radius, partners=4, seed=11, round_=0) == \
        grid.sample_partners(5, size, radius, partners=4, seed=11, round_=0)
    variants = {tuple(grid.sample_partners(5, size, radius, partners=4, seed=s, round_=r)) for s in range(3)
                for r in range(3)}
    assert len(variants) == 9


def test_large_world_partners_are_uniform_over_the_neighbourhood():
    """Rejection from the clipped bounding box keeps the draw uniform: a corner agent's partners cover its
    quarter disk evenly (each cell's count close to the mean)."""
    size, radius, agent = 100, 40.0, 0  # 101 x 101 box clipped to 41 x 41 cells: sampled, not listed
    hood = grid.neighbours(agent, size, radius)
    counts: Counter[int] = Counter()
    for round_ in range(3000):
        counts.update(grid.sample_partners(agent, size, radius, partners=4, seed=1, round_=round_))
    assert set(counts) <= set(hood)
    expected = 4 * 3000 / len(hood)  # ~9.4 per cell
    assert len(counts) > 0.98 * len(hood)
    # Mean distance of the picks vs of the neighbourhood: a bias toward the box's corner or the centre shows.
    mean_pick = sum(math.dist((0, 0), grid.position(p, size)) * c for p, c in counts.items()) / sum(counts.values())
    mean_hood = sum(math.dist((0, 0), grid.position(p, size)) for p in hood) / len(hood)
    assert abs(mean_pick - mean_hood) < 0.5
    assert max(counts.values()) < expected * 3


def test_large_world_global_partners_and_fallback(monkeypatch):
    size, radius = 200, 100.0
    for round_ in range(20):
        picked = grid.sample_partners(12345, size, radius, partners=4, seed=2, round_=round_, global_probability=1.0)
        assert len(set(picked)) == 4 and 12345 not in picked and all(0 <= p < size * size for p in picked)
    far = [p for r in range(20) for p in grid.sample_partners(0, size, 3.0 + 60, partners=4, seed=2, round_=r,
                                                              global_probability=0.5)
           if math.dist((0, 0), grid.position(p, size)) > 63]
    assert far  # some slots came from the whole world
    # With no luck at all, the slot is drawn exactly from the free neighbours, still distinct and in radius.
    monkeypatch.setattr(grid, "_draw_local", lambda *a, **k: None)
    picked = grid.sample_partners(0, size, radius, partners=4, seed=2, round_=0)
    assert len(set(picked)) == 4 and 0 not in picked
    assert all(math.dist((0, 0), grid.position(p, size)) <= radius for p in picked)


def test_many_partners_in_a_large_box_are_capped_by_the_neighbourhood():
    # partners > the count shortcut: the count decides k.
    picked = grid.sample_partners(0, 70, 64.0, partners=200, seed=1, round_=0)
    assert len(picked) == 200 == len(set(picked)) and 0 not in picked
    assert grid.sample_partners(0, 1, 5.0, partners=4, seed=1, round_=0) == []
