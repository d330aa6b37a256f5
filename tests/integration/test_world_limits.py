"""A world too large for the memory budget is refused at CreateWorld, over NATS and gRPC, naming the limit."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.world.limits import MB, estimate_world_bytes, max_agents
from services.world.settings import WorldSettings
from services.world.spec import MAX_PARTNERS, MAX_ROUNDS, MAX_SIZE, resolve_spec
from stablealign.core.config import load_settings
from stablealign.core.errors import UnavailableError, ValidationError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.serving.service import start_service
from stablealign.v1 import common_pb2, world_pb2, world_pb2_grpc

OFFLINE = common_pb2.ModelRef(backend="offline")
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


def spec(world_id: str, size: int, rounds: int = 1) -> world_pb2.WorldSpec:
    return world_pb2.WorldSpec(world_id=world_id, size=size, rounds=rounds, seed=1, prior_size=10,
                               agent_model=OFFLINE, observer_model=OFFLINE, embedding_model=HASHING)


def test_default_budget_fits_the_world_pod_and_refuses_a_million():
    """The default budget is the world pod's memory limit (deploy/k8s/base/world.yaml: 2Gi)."""
    settings = WorldSettings()
    assert settings.max_world_memory_mb == 2048
    one_round = resolve_spec(world_pb2.WorldSpec(size=240, rounds=1), settings)  # 57,600 agents, M = 50
    assert estimate_world_bytes(one_round, 1629) < 2048 * MB
    with pytest.raises(ValidationError, match="max_world_memory_mb = 2,048 MB"):
        resolve_spec(world_pb2.WorldSpec(size=317, rounds=1), settings)
    with pytest.raises(ValidationError, match="max_world_memory_mb = 2,048 MB"):
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
    assert 57_600 < max_agents(2048, 1, 50) < 100_489


def test_partners_are_bounded_by_one_feedback_batch():
    settings = WorldSettings()
    assert resolve_spec(world_pb2.WorldSpec(size=3, rounds=1, partners=MAX_PARTNERS), settings).partners == 64
    with pytest.raises(ValidationError, match=r"partners must be in 0\.\.64"):
        resolve_spec(world_pb2.WorldSpec(size=3, rounds=1, partners=MAX_PARTNERS + 1), settings)
    with pytest.raises(ValidationError, match="partners must be in"):
        resolve_spec(world_pb2.WorldSpec(size=3, rounds=1, partners=2**31 - 1), settings)


async def test_a_replica_runs_a_bounded_number_of_worlds(nats_url, nc):
    """Past max_running_worlds, CreateWorld answers UNAVAILABLE before storing anything; after a cancel
    frees a place, a world is accepted again."""
    settings = load_settings(WorldSettings, {"nats_url": nats_url, "grpc_port": -1, "metrics_port": -1,
                                             "instance": "test-world", "max_running_worlds": 2}, environ={})
    from services.world import main as world_main

    service = await start_service("world", settings, world_main.build)
    try:
        for world_id in ("one", "two"):  # nobody serves the agents: they stay in flight
            await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec(world_id, 2, rounds=50)),
                              world_pb2.World, timeout=30)
        with pytest.raises(UnavailableError, match="max_running_worlds = 2"):
            await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("three", 2)),
                              world_pb2.World, timeout=30)
        listed = await nats_client.request(nc, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                                   timeout=10)
        assert sorted(w.spec.world_id for w in listed.worlds) == ["one", "two"]
        await nats_client.request(nc, subjects.WORLD_CANCEL, world_pb2.CancelWorldRequest(world_id="one"), world_pb2.World,
                          timeout=10)
        for _ in range(100):
            try:
                await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("three", 2)),
                                  world_pb2.World, timeout=30)
                break
            except UnavailableError:
                await asyncio.sleep(0.1)  # the cancelled runner finishes its in-flight work first
        else:
            raise AssertionError("no place after a cancel")
        for world_id in ("two", "three"):
            await nats_client.request(nc, subjects.WORLD_CANCEL, world_pb2.CancelWorldRequest(world_id=world_id), world_pb2.World,
                              timeout=10)
    finally:
        await service.stop(grace=2)


async def test_world_service_refuses_a_world_over_its_budget(nats_url, nc):
    settings = load_settings(WorldSettings, {"nats_url": nats_url, "grpc_port": 0, "metrics_port": -1,
                                             "instance": "test-world", "max_world_memory_mb": 560}, environ={})
    from services.world import main as world_main

    service = await start_service("world", settings, world_main.build)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    try:
        with pytest.raises(ValidationError, match=r"max_world_memory_mb = 560 MB") as refused:
            await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("too-big", 60)),
                              world_pb2.World, timeout=30)
        assert refused.value.code == 400 and "3,600 agents" in str(refused.value)
        stub = world_pb2_grpc.WorldServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateWorld(world_pb2.CreateWorldRequest(spec=spec("too-big-grpc", 60)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_world_memory_mb" in err.value.details()
        # Nothing was stored for the refused worlds; a world within the budget is accepted.
        listed = await nats_client.request(nc, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                                   timeout=10)
        assert not listed.worlds
        ok = await nats_client.request(nc, subjects.WORLD_CREATE, world_pb2.CreateWorldRequest(spec=spec("fits", 3)),
                               world_pb2.World, timeout=30)
        assert ok.spec.world_id == "fits"
        await nats_client.request(nc, subjects.WORLD_CANCEL, world_pb2.CancelWorldRequest(world_id="fits"), world_pb2.World,
                          timeout=10)
    finally:
        await channel.close()
        await service.stop(grace=5)


def test_the_largest_world_entry_fits_the_servers_max_payload():
    """A world at the spec's bounds (MAX_SIZE^2 custom labels, MAX_ROUNDS round summaries with their largest
    values) is the largest message a run publishes: it fits the embedded server's max_payload and the one
    deploy/k8s/base/nats.yaml configures."""
    import re
    from pathlib import Path

    from stablealign_app.natsserver import MAX_PAYLOAD_BYTES

    largest = world_pb2.World(spec=world_pb2.WorldSpec(world_id="w" * 64, size=MAX_SIZE, rounds=MAX_ROUNDS,
                                                       setting="custom", agent_model=OFFLINE, observer_model=OFFLINE,
                                                       embedding_model=HASHING),
                              state=world_pb2.WORLD_STATE_FAILED, error="e" * 4096, owner="o" * 253)
    largest.spec.labels.extend([common_pb2.PERSONA_BAD] * MAX_SIZE**2)
    largest.rounds.extend([world_pb2.RoundSummary(
        round=MAX_ROUNDS, interactions=MAX_SIZE**2, mean_alignment_before=1.5, mean_alignment_after=2.5,
        mean_engagement_before=1.1, mean_engagement_after=3.3, missing_ratings=MAX_SIZE**2, duration_seconds=1.0)]
        * MAX_ROUNDS)
    size = largest.ByteSize()
    assert 6 * MB < size < MAX_PAYLOAD_BYTES - 64 * 1024  # headroom for headers and the KV subject
    k8s = (Path(__file__).resolve().parents[2] / "deploy/k8s/base/nats.yaml").read_text()
    (configured,) = re.findall(r"max_payload:\s*(\d+)MB", k8s)
    assert int(configured) * MB >= size
