"""Request handlers for bus tests: slow work whose runs are counted.

Why: whether a re-sent or heartbeated request started the work a second time is what several bus and
liveness tests assert; they share one handler instead of each writing its own counting closure.
"""

from __future__ import annotations

import asyncio

from stablealign.v1 import world_pb2


class SlowWorldGetter:
    """A ``GetWorldRequest`` handler that answers the asked world after ``delay`` seconds; ``calls`` counts
    its runs."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def __call__(self, req: world_pb2.GetWorldRequest) -> world_pb2.World:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))
