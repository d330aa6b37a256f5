"""A real Prometheus (Debian's `prometheus`) scrapes a running service's /metrics.

What a user's Grafana shows comes from this path, so the test checks it end to end: the target
is up, and the request counter of the calls the test made is there with its labels.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from stablealign.core.metrics import free_port
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.v1 import world_pb2
from tests.integration.test_world_service import start

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed "
                                "(.ci/run installs it with apt-get)")


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


async def test_prometheus_scrapes_the_world_service(nats_url, tmp_path):
    metrics_port = free_port()
    world = await start("world", nats_url, metrics_port=metrics_port)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: world\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nc = await nats_client.connect(nats_url, name="test-prom")
    try:
        for _ in range(3):  # requests that the counter must show (one of them NOT_FOUND)
            await nats_client.request(nc, subjects.WORLD_LIST, world_pb2.ListWorldsRequest(), world_pb2.ListWorldsResponse,
                              timeout=5)
        with pytest.raises(Exception, match="unknown world"):
            await nats_client.request(nc, subjects.WORLD_GET, world_pb2.GetWorldRequest(world_id="nope"), world_pb2.World,
                              timeout=5)
        deadline = time.monotonic() + 60
        listed = missing = []
        while time.monotonic() < deadline:
            try:
                up = await asyncio.to_thread(_query, prom_port, 'up{job="world"}')
                listed = await asyncio.to_thread(
                    _query, prom_port, 'stablealign_requests_total{service="world",method="ListWorlds",code="200"}')
                missing = await asyncio.to_thread(
                    _query, prom_port, 'stablealign_requests_total{service="world",method="GetWorld",code="404"}')
            except OSError:  # Prometheus still starting
                up = []
            if up and up[0]["value"][1] == "1" and listed and missing:
                break
            await asyncio.sleep(0.5)
        assert up and up[0]["value"][1] == "1", "Prometheus never saw the target up"
        assert float(listed[0]["value"][1]) >= 3
        assert float(missing[0]["value"][1]) >= 1
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=20)
        await nc.close()
        await world.stop(grace=1.0)
