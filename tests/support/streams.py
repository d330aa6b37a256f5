"""Every stream and bucket at once, for tests on an open server (no service started to own them).

In a deployment each service declares its own (services/world/streams.py, services/trainer/streams.py).
"""

from __future__ import annotations

from nats.js import JetStreamContext

from services.trainer import streams as trainer_streams
from services.world import streams as world_streams


async def ensure_all_streams(js: JetStreamContext) -> None:
    """Creates the world's and the trainer's streams and buckets (idempotent)."""
    await world_streams.declare_streams(js)
    await trainer_streams.declare_streams(js)
