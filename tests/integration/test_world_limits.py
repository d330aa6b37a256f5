"""A world too large for the memory budget is refused at CreateWorld, over NATS and gRPC, naming the limit."""

from __future__ import annotations

import grpc
import pytest

from services.world.limits import MB, estimate_world_bytes, max_agents
from services.world.settings import WorldSettings
from services.world.spec import MAX_SIZE, resolve_spec
from stablealign import bus
from stablealign.config import load_settings
from stablealign.errors import ValidationError
from stablealign.service import start_service
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc

OFFLINE = common_pb2.ModelRef(backend="offline")
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


def spec(world_id: str, size: int, rounds: int = 1) -> world_pb2.WorldSpec:
    return world_pb2.WorldSpec(world_id=world_id, size=size, rounds=rounds, seed=1, prior_size=10,
                               agent_model=OFFLINE, observer_model=OFFLINE, embedding_model=HASHING)


def test_default_budget_admits_100k_agents_for_a_round_and_refuses_a_million():
    settings = WorldSettings()
    one_round = resolve_spec(world_pb2.WorldSpec(size=317, rounds=1), settings)  # 100,489 agents, M = 50
    assert estimate_world_bytes(one_round, 1629) < 4096 * MB
    with pytest.raises(ValidationError, match="max_world_memory_mb = 4,096 MB"):
        resolve_spec(world_pb2.WorldSpec(size=MAX_SIZE, rounds=1), settings)
    with pytest.raises(ValidationError, match="100,000 rounds"):  # rounds count: every record is kept
        resolve_spec(world_pb2.WorldSpec(size=100, rounds=100_000), settings)
    # The size bound still comes first, and 0 switches the budget off.
    with pytest.raises(ValidationError, match="size must be in"):
        resolve_spec(world_pb2.WorldSpec(size=MAX_SIZE + 1, rounds=1), settings)
    unlimited = WorldSettings(max_world_memory_mb=0)
    assert resolve_spec(world_pb2.WorldSpec(size=MAX_SIZE, rounds=1), unlimited, check_files=False).size == MAX_SIZE
    # The estimate is linear in agents and in records.
    small, large = (estimate_world_bytes(resolve_spec(world_pb2.WorldSpec(size=s, rounds=1), unlimited), 1629)
                    for s in (100, 200))
    assert 3.5 < (large - 512 * MB) / (small - 512 * MB) < 4.5
    assert max_agents(4096, 1, 50) > 100_489


async def test_world_service_refuses_a_world_over_its_budget(nats_url, nc):
    settings = load_settings(WorldSettings, {"nats_url": nats_url, "grpc_port": 0, "metrics_port": -1,
                                             "instance": "test-world", "max_world_memory_mb": 560}, environ={})
    from services.world import main as world_main

    service = await start_service("world", settings, world_main.build)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    try:
        with pytest.raises(ValidationError, match=r"max_world_memory_mb = 560 MB") as refused:
            await bus.request(nc, bus.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("too-big", 60)),
                              world_pb2.World, timeout=30)
        assert refused.value.code == 400 and "3,600 agents" in str(refused.value)
        stub = world_pb2_grpc.WorldServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateWorld(world_pb2.CreateWorldRequest(spec=spec("too-big-grpc", 60)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_world_memory_mb" in err.value.details()
        # Nothing was stored for the refused worlds; a world within the budget is accepted.
        listed = await bus.request(nc, bus.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                                   timeout=10)
        assert not listed.worlds
        ok = await bus.request(nc, bus.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("fits", 3)),
                               world_pb2.World, timeout=30)
        assert ok.spec.world_id == "fits"
        await bus.request(nc, bus.WORLD_CANCEL, world_pb2.CancelWorldRequest(world_id="fits"), world_pb2.World,
                          timeout=10)
    finally:
        await channel.close()
        await service.stop(grace=5)
