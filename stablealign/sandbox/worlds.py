"""World specs as the agent and observer services see them: read once from the KV bucket, then cached.

The world service writes each ``World`` to the ``SANDBOX_WORLDS`` key-value bucket (key = world
id). A world's spec never changes once created, so the agent and observer services read it
once per process and keep it; only an unknown world costs a KV lookup every time (it may be
created a moment later). Also here: the validation both services apply to an agent id, and
the seed derivation that makes the same world give the same records.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from stablealign.core.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from stablealign.nats import subjects
from stablealign.sandbox.seeding import stable_hash
from stablealign.v1 import common_pb2, world_pb2

# A world id is a NATS subject token and a KV key; the one rule for every service and client.
WORLD_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# States after which a world never changes again.
FINAL_STATES = (world_pb2.WORLD_STATE_COMPLETED, world_pb2.WORLD_STATE_CANCELLED, world_pb2.WORLD_STATE_FAILED)


def check_world_id(world_id: str) -> None:
    if not world_id:
        raise ValidationError("world_id is required")
    if not WORLD_ID_PATTERN.match(world_id):
        raise ValidationError(f"world_id {world_id[:80]!r} must be 1-64 letters, digits, '-' or '_'")


def check_agent(world: world_pb2.World, agent_id: int) -> None:
    """NotFoundError when ``agent_id`` is outside the world's size x size grid."""
    size = world.spec.size
    if not 0 <= agent_id < size * size:
        raise NotFoundError(f"unknown agent {agent_id} in world {world.spec.world_id}")


def persona_of(world: world_pb2.World, agent_id: int) -> common_pb2.Persona:
    """The persona of ``agent_id``; NotFoundError when the id is outside the world's grid."""
    check_agent(world, agent_id)
    labels = world.spec.labels
    if agent_id >= len(labels) or labels[agent_id] == common_pb2.PERSONA_UNSPECIFIED:
        raise ConflictError(f"world {world.spec.world_id} has no persona for agent {agent_id}")
    return labels[agent_id]


def derive_seed(world_seed: int, *parts: object) -> int:
    """A 31-bit seed from the world's seed and a step's coordinates (round, agent, step, attempt...).

    ``stable_hash`` rather than ``hash()``: Python salts string hashes per process, and two replicas must
    derive the same seed for the same step.
    """
    return stable_hash(world_seed, *parts) & 0x7FFFFFFF


class WorldSpecCache:
    """Reads worlds from the ``SANDBOX_WORLDS`` bucket; caches found ones (LRU of ``max_worlds``)."""

    def __init__(self, js: JetStreamContext, max_worlds: int = 4096) -> None:
        self.js = js
        self.max_worlds = max_worlds
        self._worlds: OrderedDict[str, world_pb2.World] = OrderedDict()
        self._kv = None
        self._lock = asyncio.Lock()

    async def _bucket(self):
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(subjects.WORLDS_BUCKET)
            except nats.js.errors.BucketNotFoundError as exc:
                raise NotFoundError(f"no worlds yet (bucket {subjects.WORLDS_BUCKET} does not exist)") from exc
        return self._kv

    async def get(self, world_id: str) -> world_pb2.World:
        check_world_id(world_id)
        world = self._worlds.get(world_id)
        if world is not None:
            self._worlds.move_to_end(world_id)
            return world
        async with self._lock:  # one KV read per unknown world at a time, shared by waiters
            world = self._worlds.get(world_id)
            if world is not None:
                return world
            kv = await self._bucket()
            try:
                entry = await kv.get(world_id)
            except nats.js.errors.KeyNotFoundError as exc:  # also KeyDeletedError
                raise NotFoundError(f"unknown world {world_id}") from exc
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                raise UnavailableError(f"cannot read world {world_id} from {subjects.WORLDS_BUCKET}") from exc
            if not entry.value:
                raise NotFoundError(f"unknown world {world_id}")
            world = world_pb2.World()
            try:
                world.ParseFromString(entry.value)
            except Exception as exc:
                raise ConflictError(f"world {world_id}: stored spec is not a World message") from exc
            if not world.spec.world_id:
                world.spec.world_id = world_id
            self._worlds[world_id] = world
            while len(self._worlds) > self.max_worlds:
                self._worlds.popitem(last=False)
            return world

    def forget(self, world_id: str) -> None:
        self._worlds.pop(world_id, None)
