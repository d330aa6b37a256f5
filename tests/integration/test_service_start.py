"""Starting a service that fails partway (a busy port, ``build`` raising) closes what it opened,
and `stable-align serve` reports a busy port as one line naming it; ``stop`` frees /metrics.

A nats-server with its monitoring port on shows, through ``/connz``, whether a client
connection was left open.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stablealign.core.errors import ConfigError
from stablealign.core.metrics import free_port
from stablealign.nats import client as nats_client
from stablealign.serving.service import ServiceContext, ServiceParts, start_service
from stablealign.serving.settings import ServiceSettings
from stablealign.v1 import world_pb2
from stablealign_app.natsserver import find_nats_server

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class MonitoredNats:
    url: str
    monitor: str

    def connz(self, state: str = "open") -> dict:
        with urllib.request.urlopen(f"{self.monitor}/connz?state={state}&limit=1024", timeout=5) as reply:
            return json.load(reply)

    def open_names(self) -> list[str]:
        return [c.get("name", "") for c in self.connz().get("connections") or []]

    def closed_names(self) -> list[str]:
        return [c.get("name", "") for c in self.connz("closed").get("connections") or []]

    async def wait_no_connections(self, timeout: float = 10.0) -> list[str]:
        """The names of the connections still open after up to ``timeout`` seconds (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            names = await asyncio.to_thread(self.open_names)
            if not names or time.monotonic() > deadline:
                return names
            await asyncio.sleep(0.05)


@pytest.fixture
def monitored_nats(tmp_path) -> Iterator[MonitoredNats]:
    port, monitor_port = free_port(), free_port()
    proc = subprocess.Popen([find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port),
                             "-sd", str(tmp_path / "jetstream")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = MonitoredNats(url=f"nats://127.0.0.1:{port}", monitor=f"http://127.0.0.1:{monitor_port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "nats-server exited"
            try:
                server.connz()
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not come up within 15 s"
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def hold_port() -> socket.socket:
    """A listening socket on a free loopback port: that port is busy until it is closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def can_listen(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return True
    except OSError:
        return False


class Probe:
    """A tiny service: one NATS endpoint and an on_stop hook that records it ran."""

    def __init__(self, fail_build: bool = False) -> None:
        self.fail_build = fail_build
        self.stopped = 0

    async def build(self, ctx: ServiceContext) -> ServiceParts:
        async def get(req: world_pb2.GetWorldRequest) -> world_pb2.World:
            return world_pb2.World(spec=world_pb2.WorldSpec(world_id=req.world_id))

        await ctx.requests.add("probe.get", world_pb2.GetWorldRequest, get, "Get")
        if self.fail_build:
            raise RuntimeError("build failed on purpose")

        async def on_stop() -> None:
            self.stopped += 1

        return ServiceParts(on_stop=[on_stop])


def settings(url: str, **values) -> ServiceSettings:
    return ServiceSettings(**{"nats_url": url, "grpc_port": -1, "metrics_port": -1, "instance": "start-test",
                              "shutdown_grace_seconds": 2.0, **values})


async def test_busy_grpc_port_is_named_and_nats_is_closed(monitored_nats):
    probe = Probe()
    with hold_port() as held:
        port = held.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            await start_service("probe", settings(monitored_nats.url, grpc_port=port), probe.build)
    message = str(info.value)
    assert message == f"gRPC port {port} on 127.0.0.1 is already in use (--grpc-port / STABLEALIGN_GRPC_PORT)"
    assert probe.stopped == 1  # build had returned: its clean-up ran
    assert await monitored_nats.wait_no_connections() == []
    assert "stablealign-probe-start-test" in monitored_nats.closed_names()  # it did connect, then closed


async def test_busy_grpc_health_port_names_its_own_setting(monitored_nats, tmp_path):
    """With TLS, the plaintext health-only port for probes: busy, it is named as such (not as the gRPC port,
    which is free), and what was opened is closed."""
    from tests.support.certs import make_certificates

    certs = make_certificates(tmp_path / "certs")
    probe = Probe()
    with hold_port() as held:
        port = held.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            await start_service("probe", settings(monitored_nats.url, grpc_port=0, grpc_health_port=port,
                                                  grpc_tls_cert=str(certs.server_cert),
                                                  grpc_tls_key=str(certs.server_key)), probe.build)
    assert str(info.value) == (f"gRPC health port {port} on 127.0.0.1 is already in use "
                               f"(--grpc-health-port / STABLEALIGN_GRPC_HEALTH_PORT)")
    assert probe.stopped == 1
    assert await monitored_nats.wait_no_connections() == []


async def test_busy_metrics_port_closes_grpc_hooks_and_nats(monitored_nats):
    probe = Probe()
    grpc_port = free_port()
    with hold_port() as held:
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^metrics port {port} on 127.0.0.1 is already in use "
                                              r"\(--metrics-port / STABLEALIGN_METRICS_PORT\)$"):
            await start_service("probe", settings(monitored_nats.url, grpc_port=grpc_port, metrics_port=port),
                                probe.build)
    assert probe.stopped == 1
    assert can_listen(grpc_port)  # the gRPC server that had started is gone
    assert await monitored_nats.wait_no_connections() == []


async def test_failing_build_closes_nats(monitored_nats):
    with pytest.raises(RuntimeError, match="on purpose"):
        await start_service("probe", settings(monitored_nats.url), Probe(fail_build=True).build)
    assert await monitored_nats.wait_no_connections() == []


async def test_started_service_serves_and_stop_frees_every_port(monitored_nats):
    probe = Probe()
    running = await start_service("probe", settings(monitored_nats.url, grpc_port=0, metrics_port=0), probe.build)
    nc = await nats_client.connect(monitored_nats.url, name="test")
    try:
        reply = await nats_client.request(nc, "probe.get", world_pb2.GetWorldRequest(world_id="w"), world_pb2.World, timeout=5)
        assert reply.spec.world_id == "w"
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert b"stablealign_requests_total" in body
    finally:
        await running.stop(grace=2)
        await nc.close()
    assert probe.stopped == 1
    assert not running.metrics.thread.is_alive()
    assert can_listen(running.metrics_port) and can_listen(running.grpc_port)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
    assert "stablealign-probe-start-test" not in await asyncio.to_thread(monitored_nats.open_names)


@pytest.mark.parametrize("which", ["grpc", "metrics"])
def test_serve_with_a_busy_port_exits_2_with_one_line(monitored_nats, which):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEALIGN_")}
    env["STABLEALIGN_LOG_LEVEL"] = "WARNING"
    with hold_port() as held:
        port = held.getsockname()[1]
        ports = {"grpc": ["--grpc-port", str(port), "--metrics-port", "-1"],
                 "metrics": ["--grpc-port", "0", "--metrics-port", str(port)]}[which]
        result = subprocess.run([*CLI, "serve", "agent", "--nats", monitored_nats.url, "--instance", "busy", *ports],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    what = {"grpc": "gRPC", "metrics": "metrics"}[which]
    assert lines[-1] == (f"error: {what} port {port} on 127.0.0.1 is already in use "
                         f"(--{which}-port / STABLEALIGN_{which.upper()}_PORT)"), result.stderr
    assert sum("error:" in line for line in lines) == 1, result.stderr
    # The process had connected before it failed, and nothing of it is left at the server.
    assert "stablealign-agent-busy" in monitored_nats.closed_names()
    assert "stablealign-agent-busy" not in monitored_nats.open_names()
