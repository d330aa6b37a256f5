"""The S×S grid of a world: personas, neighbourhoods, partners and questions — pure and seeded.

Everything random here is drawn from a generator seeded by ``derive_seed(world seed, purpose,
round, agent)`` (SHA-256, never Python's salted ``hash()``), so that one world spec gives the
same partners and questions in every process, on every replica and after a resume, whatever
order the interactions happen to run in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stablealign.errors import ValidationError
from stablealign.seeding import stable_hash
from stablealign.v1 import common_pb2

GOOD = common_pb2.PERSONA_GOOD
BAD = common_pb2.PERSONA_BAD

SETTINGS = ("all_good", "all_bad", "half_half", "mixed_half_half", "custom")
DEFAULT_SETTING = "half_half"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. world seed, "partners", round, agent id)."""
    return stable_hash(*parts) >> 1


def rng_for(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))


def agent_id(row: int, col: int, size: int) -> int:
    return row * size + col


def position(agent: int, size: int) -> tuple[int, int]:
    """(row, col) of an agent id."""
    return divmod(agent, size)


def good_count(size: int) -> int:
    """Good agents in the half settings: floor(S²/2), so an odd world has one bad agent more."""
    return (size * size) // 2


def make_labels(setting: str, size: int, seed: int, custom: Sequence[int] = ()) -> list[int]:
    """One Persona per agent id for a setting (DESIGN §1).

    ``half_half`` is the original's layout: walking the ids in order, a cell with row <= col
    (the upper triangle, diagonal included) is good until floor(S²/2) agents are good; every
    other agent is bad. The upper triangle holds S(S+1)/2 >= S²/2 cells, so the count is
    always reached. ``mixed_half_half`` has the same count at positions shuffled by the seed.
    """
    n = size * size
    if setting == "all_good":
        return [GOOD] * n
    if setting == "all_bad":
        return [BAD] * n
    if setting == "half_half":
        labels, good, target = [], 0, good_count(size)
        for a in range(n):
            row, col = position(a, size)
            if row <= col and good < target:
                labels.append(GOOD)
                good += 1
            else:
                labels.append(BAD)
        return labels
    if setting == "mixed_half_half":
        labels = np.full(n, BAD, dtype=np.int64)
        labels[rng_for(seed, "mixed_half_half").permutation(n)[: good_count(size)]] = GOOD
        return [int(x) for x in labels]
    if setting == "custom":
        custom = list(custom)
        if len(custom) != n:
            raise ValidationError(
                f"setting custom needs {n} labels (one per agent of a {size}x{size} grid), got {len(custom)}"
            )
        bad = [i for i, label in enumerate(custom) if label not in (GOOD, BAD)]
        if bad:
            raise ValidationError(
                f"labels must be PERSONA_GOOD or PERSONA_BAD; agent {bad[0]} has {custom[bad[0]]}"
            )
        return custom
    raise ValidationError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")


def default_radius(size: int) -> float:
    return float(size // 2)


def neighbours(agent: int, size: int, radius: float) -> list[int]:
    """Every other agent within Euclidean grid distance <= radius, in id order.

    Only the bounding box of the circle is scanned (vectorised), so a large world costs
    O(radius²) per agent rather than O(S²).
    """
    row, col = position(agent, size)
    reach = int(math.floor(radius + 1e-9))
    rows = np.arange(max(0, row - reach), min(size, row + reach + 1))
    cols = np.arange(max(0, col - reach), min(size, col + reach + 1))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    # A small tolerance so that e.g. radius sqrt(2) includes the diagonal despite rounding.
    inside = (rr - row) ** 2 + (cc - col) ** 2 <= radius * radius + 1e-9
    ids = np.sort((rr * size + cc)[inside])
    return ids[ids != agent].tolist()


def pick_partners(
    agent: int,
    size: int,
    hood: Sequence[int],
    *,
    partners: int,
    seed: int,
    round_: int,
    global_probability: float = 0.0,
) -> list[int]:
    """k = min(partners, #neighbours) distinct partners of ``agent`` for one interaction.

    Each slot is, with probability ``global_probability``, drawn from the whole world (not
    the agent itself, no duplicates); otherwise it takes the next neighbour of a seeded
    permutation of the neighbourhood. Seeded by (world seed, round, agent id).
    """
    k = min(partners, len(hood))
    if k <= 0:
        return []
    rng = rng_for(seed, "partners", round_, agent)
    # Indexed lazily: only the first few entries of the permutation are ever used, and a big
    # neighbourhood (thousands of agents) must not be copied into Python objects per interaction.
    hood_array = np.asarray(hood)
    permutation = rng.permutation(len(hood))

    def order(i: int) -> int:
        return int(hood_array[permutation[i]])

    n = size * size
    chosen: list[int] = []
    taken = {agent}
    next_local = 0
    for _ in range(k):
        if global_probability > 0 and rng.random() < global_probability and n - len(taken) > 0:
            pick = _draw_global(rng, n, taken)
        else:
            while order(next_local) in taken:  # bounded: k <= len(hood) distinct slots remain
                next_local += 1
            pick = order(next_local)
            next_local += 1
        chosen.append(pick)
        taken.add(pick)
    return chosen


def _draw_global(rng: np.random.Generator, n: int, taken: set[int]) -> int:
    """A uniform agent id not in ``taken``; rejection sampling, then an exact draw if unlucky."""
    for _ in range(32):
        pick = int(rng.integers(n))
        if pick not in taken:
            return pick
    free = np.setdiff1d(np.arange(n), np.fromiter(taken, dtype=np.int64))
    return int(free[rng.integers(len(free))])


def pick_question(pool: Sequence[str], *, seed: int, round_: int, agent: int) -> str:
    """The question agent ``agent`` answers in round ``round_``: reproducible from the world seed."""
    return pool[derive_seed(seed, "question", round_, agent) % len(pool)]
