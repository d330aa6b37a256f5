"""The S×S grid of a world: personas, neighbourhoods, partners and questions — pure and seeded.

Everything random here is drawn from a generator seeded by ``derive_seed(world seed, purpose,
round, agent)`` (SHA-256, never Python's salted ``hash()``), so that one world spec gives the
same partners and questions in every process, on every replica and after a resume, whatever
order the interactions happen to run in.

Partners are sampled without materialising a neighbourhood (``sample_partners``): a large
disk is sampled by rejection from its bounding box (clipped to the grid), so an interaction
costs O(1) draws instead of O(radius²) = O(S²) cells with the default radius S // 2, and a
round O(N) instead of O(N²). Small neighbourhoods are still enumerated exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stablealign.core.errors import ValidationError
from stablealign.sandbox.seeding import stable_hash
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


def _box(agent: int, size: int, radius: float) -> tuple[int, int, int, int, int, int]:
    """(row, col, first row, last row, first col, last col) of the neighbourhood's bounding box in the grid."""
    row, col = position(agent, size)
    reach = int(math.floor(radius + 1e-9))
    return row, col, max(0, row - reach), min(size - 1, row + reach), max(0, col - reach), min(size - 1, col + reach)


def neighbour_count(agent: int, size: int, radius: float) -> int:
    """``len(neighbours(agent, size, radius))`` in O(radius) without listing them."""
    row, col, r0, r1, _, _ = _box(agent, size, radius)
    limit = radius * radius + 1e-9  # the same tolerance as neighbours()
    dr = np.arange(r0, r1 + 1, dtype=np.int64) - row
    room = limit - (dr * dr).astype(np.float64)
    half = np.floor(np.sqrt(np.maximum(room, 0.0))).astype(np.int64)
    half += ((half + 1) ** 2 <= room)  # exact integer half-widths despite sqrt rounding
    half -= (half * half > room)
    lo = np.maximum(col - half, 0)
    hi = np.minimum(col + half, size - 1)
    return int(np.maximum(hi - lo + 1, 0)[room >= 0].sum()) - 1


# A bounding box of at most this many cells is enumerated (exact, and what pick_partners always did);
# a larger one is sampled by rejection.
ENUMERATE_CELLS = 4096
# Candidate cells drawn per slot before falling back to listing the neighbourhood, in batches. Each is
# accepted with probability >= ~pi/4 * (free neighbours / neighbours), so the fallback practically never runs.
REJECTION_TRIES = 64
_REJECTION_BATCH = 8
# A box of more than ENUMERATE_CELLS cells holds at least ~200 neighbours (a quarter disk of radius
# >= 16 lies inside the grid), so up to this many partners the count need not be computed.
_SURELY_ENOUGH = 128


def sample_partners(
    agent: int,
    size: int,
    radius: float,
    *,
    partners: int,
    seed: int,
    round_: int,
    global_probability: float = 0.0,
) -> list[int]:
    """``pick_partners`` for the neighbourhood (agent, size, radius), without listing the neighbourhood.

    The same semantics: k = min(partners, #neighbours) distinct partners, never the agent itself;
    each slot is, with probability ``global_probability``, drawn from the whole world, otherwise
    uniformly from the neighbours not taken yet; seeded by (world seed, round, agent id). A
    bounding box of <= ENUMERATE_CELLS cells is enumerated and handed to ``pick_partners``, so
    small worlds get exactly the partners they always got; a larger one draws cells of the box
    uniformly and keeps the first inside the disk and not taken — O(1) per partner.
    """
    row, col, r0, r1, c0, c1 = _box(agent, size, radius)
    if (r1 - r0 + 1) * (c1 - c0 + 1) <= ENUMERATE_CELLS:
        return pick_partners(agent, size, neighbours(agent, size, radius), partners=partners, seed=seed,
                             round_=round_, global_probability=global_probability)
    k = partners if partners <= _SURELY_ENOUGH else min(partners, neighbour_count(agent, size, radius))
    if k <= 0:
        return []
    rng = rng_for(seed, "partners", round_, agent)
    limit = radius * radius + 1e-9
    n = size * size
    chosen: list[int] = []
    taken = {agent}
    for _ in range(k):
        if global_probability > 0 and rng.random() < global_probability and n - len(taken) > 0:
            pick = _draw_global(rng, n, taken)
        else:
            pick = _draw_local(rng, size, row, col, (r0, r1, c0, c1), limit, taken)
            if pick is None:  # unlucky (or a crowded neighbourhood): choose among the free neighbours exactly
                free = [b for b in neighbours(agent, size, radius) if b not in taken]
                pick = free[int(rng.integers(len(free)))]
        chosen.append(pick)
        taken.add(pick)
    return chosen


def _draw_local(rng: np.random.Generator, size: int, row: int, col: int, box: tuple[int, int, int, int],
                limit: float, taken: set[int]) -> int | None:
    """A uniform cell of the disk (within the clipped box) that is not taken; None after REJECTION_TRIES."""
    r0, r1, c0, c1 = box
    width = c1 - c0 + 1
    for _ in range(REJECTION_TRIES // _REJECTION_BATCH):
        for cell in rng.integers(0, (r1 - r0 + 1) * width, size=_REJECTION_BATCH).tolist():
            r, c = r0 + cell // width, c0 + cell % width
            if (r - row) ** 2 + (c - col) ** 2 <= limit:
                pick = r * size + c
                if pick not in taken:
                    return pick
    return None


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
