"""World state in the SANDBOX_WORLDS key-value bucket: the source of truth for every replica.

Every write is compare-and-set on the key's revision (``kv.update(key, value, last=rev)``):
a mutation is re-applied to the latest value when another writer got in first. That is what
makes one leader per world safe — a replica takes a world over only if its write lands on the
revision it read — and what lets CancelWorld, received by any replica, reach the owner: the
owner's next write sees state CANCELLED.

An entry that is not a World of its own key (bytes that do not parse, or a World naming another id:
whatever landed in the bucket by mistake or by an attack) is never taken for one: ``get`` of that key
fails with UnavailableError naming it, and ``list`` (CLI listing, the resume scan) skips it, counts it
(``stablealign_entries_skipped_total``) and names the skipped keys in one log line, so one bad entry
cannot stop listing or resuming every other world.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from stablealign.core import metrics
from stablealign.core.errors import ConflictError, NotFoundError, UnavailableError
from stablealign.core.logs import get_logger
from stablealign.nats import subjects
from stablealign.sandbox.worlds import FINAL_STATES, check_world_id  # noqa: F401 - FINAL_STATES re-exported
from stablealign.v1 import world_pb2

log = get_logger(__name__)

ACTIVE_STATES = (world_pb2.WORLD_STATE_PENDING, world_pb2.WORLD_STATE_RUNNING)
CAS_ATTEMPTS = 20


# After the watcher's end-of-snapshot marker, how long a listing waits for the keys it has not seen yet
# (written while the watcher started) before it takes what it has.
SNAPSHOT_GRACE_SECONDS = 1.0


class LeaseLostError(ConflictError):
    """Another replica owns the world now; this one must stop running it."""


Mutation = Callable[[world_pb2.World], None]
SKIPPED_NAMED = 10  # keys named in the one log line of a listing that skipped entries


def parse_world(key: str, value: bytes | None) -> world_pb2.World | None:
    """The World stored under ``key``, or None when the entry is not one (undecodable, or another id)."""
    world = world_pb2.World()
    try:
        world.ParseFromString(value or b"")
    except (DecodeError, ValueError):
        return None
    return world if world.spec.world_id == key else None


class WorldStore:
    """Reads and compare-and-set writes of World messages, keyed by world id."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.WORLDS_BUCKET)
        return self._kv

    @staticmethod
    def _check_id(world_id: str) -> None:
        check_world_id(world_id)

    async def create(self, world: world_pb2.World) -> int:
        """Stores a new world; ConflictError if the id is taken. Returns the revision."""
        kv = await self.kv()
        try:
            return await kv.create(world.spec.world_id, world.SerializeToString())
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(f"world {world.spec.world_id} exists already") from None

    async def get(self, world_id: str) -> tuple[world_pb2.World, int]:
        """The world and its revision; NotFoundError if unknown."""
        self._check_id(world_id)
        kv = await self.kv()
        try:
            entry = await kv.get(world_id)
        except nats.js.errors.KeyNotFoundError:
            raise NotFoundError(f"unknown world {world_id}") from None
        world = parse_world(world_id, entry.value)
        if world is None:
            metrics.ENTRIES_SKIPPED.labels(subjects.WORLDS_BUCKET).inc()
            log.warning("world.entry_unreadable", extra={"world_id": world_id, "revision": entry.revision})
            raise UnavailableError(f"world {world_id}: its stored entry is not a world (revision {entry.revision})")
        return world, int(entry.revision or 0)

    async def list(self, timeout: float = 10.0) -> list[world_pb2.World]:
        """Every world in the bucket (one watcher pass, not one get per key), by creation time; entries that
        are not worlds are skipped (counted, named in one log line).

        The pass ends once every key the bucket held when the listing began has come by, not at the
        watcher's first "nothing pending": a world written while the watcher starts can have its old entry
        removed before delivery and its new one not yet counted, and would be missing from the list."""
        kv = await self.kv()
        prefix = subjects.kv_key_prefix(subjects.WORLDS_BUCKET)
        info = await self.js.stream_info(subjects.kv_stream(subjects.WORLDS_BUCKET), subjects_filter=f"{prefix}>")
        waiting = {subject[len(prefix):] for subject in (info.state.subjects or {})}
        watcher = await kv.watchall()
        worlds: dict[str, world_pb2.World] = {}
        skipped: list[str] = []
        deadline = time.monotonic() + timeout
        snapshot_done = False
        try:
            while waiting:
                try:
                    entry = await watcher.updates(timeout=max(deadline - time.monotonic(), 0.001))
                except nats.errors.TimeoutError:
                    if snapshot_done:  # what is still awaited is a message the watcher does not deliver
                        break
                    raise UnavailableError("timed out listing worlds") from None
                if entry is None:  # the watcher's end-of-snapshot marker: what is awaited is moments away
                    snapshot_done, deadline = True, min(deadline, time.monotonic() + SNAPSHOT_GRACE_SECONDS)
                    continue
                waiting.discard(entry.key)
                if entry.operation is not None:  # a delete or a purge
                    worlds.pop(entry.key, None)
                elif (world := parse_world(entry.key, entry.value)) is None:
                    skipped.append(f"{entry.key[:80]}@{entry.revision}")
                else:
                    worlds[entry.key] = world
        finally:
            await watcher.stop()
        if skipped:
            metrics.ENTRIES_SKIPPED.labels(subjects.WORLDS_BUCKET).inc(len(skipped))
            log.warning("world.entries_skipped", extra={"bucket": subjects.WORLDS_BUCKET, "skipped": len(skipped),
                                                        "keys": ", ".join(skipped[:SKIPPED_NAMED])})
        return sorted(worlds.values(), key=lambda w: (w.created_at, w.spec.world_id))

    async def update(self, world_id: str, mutate: Mutation) -> world_pb2.World:
        """Applies ``mutate`` to the latest World and writes it if nobody wrote in between.

        On a conflict the mutation is re-applied to the newer value (bounded attempts);
        ``mutate`` may raise (e.g. LeaseLostError) to abort without writing.
        """
        kv = await self.kv()
        for _ in range(CAS_ATTEMPTS):
            world, revision = await self.get(world_id)
            mutate(world)
            world.updated_at = time.time()
            try:
                await kv.update(world_id, world.SerializeToString(), last=revision)
                return world
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise UnavailableError(f"world {world_id}: too many concurrent updates")

    async def try_acquire(self, world_id: str, owner: str, lease_seconds: float) -> world_pb2.World | None:
        """Takes over an unfinished world if it is ours or its owner's heartbeat is stale.

        Atomic: the write is on the revision that was read, so of two replicas racing for a
        world exactly one wins. Returns the world when this replica now owns it, else None.
        """
        kv = await self.kv()
        world, revision = await self.get(world_id)
        if world.state not in ACTIVE_STATES:
            return None
        stale = time.time() - world.updated_at > lease_seconds
        if world.owner and world.owner != owner and not stale:
            return None
        previous = world.owner
        world.owner = owner
        world.updated_at = time.time()
        try:
            await kv.update(world_id, world.SerializeToString(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        if previous != owner:
            log.info("world.taken_over", extra={"world_id": world_id, "owner": owner, "previous": previous})
        return world
