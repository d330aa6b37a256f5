"""The gpu overlay's NATS cluster, with components/nats-tls, run for real: routes need the password and TLS.

The rendered ConfigMaps (nats.conf and the fragments it includes) are written out with only the paths and
ports moved onto loopback and a temporary directory, and real nats-servers run them. Two servers made
exactly as the StatefulSet makes its pods (route URLs carrying the route password, the certificate of the
Secret nats-tls) form a cluster; a server with a wrong route password, and one with the right password but
no TLS on its routes, made by the same writer, are refused, and the servers log why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.certs import make_secret_layout
from tests.support.kustomize import KUBECTL, configmap_data, container, listed_components, one, render_variant

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (CI installs it): cannot render")

ROUTE_PASSWORD = "pRoute0secret"
USER_PASSWORDS = {f"NATS_{role}_PASSWORD": f"p{role.lower()}0" for role in ("WORLD", "AGENT", "OBSERVER", "TRAINER", "CLI")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _routez(http_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/routez", timeout=2) as reply:
        return [r.get("remote_name", "") for r in json.load(reply).get("routes", [])]


class Cluster:
    """Writes and starts servers from the rendered gpu + nats-tls ConfigMaps; stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        from stablealign_app.natsserver import find_nats_server

        docs = render_variant("gpu", frozenset(listed_components("gpu")) | {"nats-tls"})
        self.nats_conf = configmap_data(docs, "nats-config")["nats.conf"]
        self.fragments = configmap_data(docs, "nats-auth")
        self.nats_env = container(one(docs, "StatefulSet", "nats"), "nats")["env"]
        self.binary = find_nats_server()
        self.tmp = tmp
        self.cluster_ports = [_free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen] = []
        self.certs = make_secret_layout(tmp / "certs")

    def _route_env(self, password: str) -> dict[str, str]:
        """NATS_ROUTE_<i> as Kubernetes expands them, with nats-<i>.nats-cluster:6222 moved onto loopback."""
        env = {"NATS_ROUTE_PASSWORD": password}
        for entry in self.nats_env:
            if entry["name"].startswith("NATS_ROUTE_") and "value" in entry:
                i = int(entry["name"].rsplit("_", 1)[1])
                value = entry["value"].replace("$(NATS_ROUTE_PASSWORD)", password)
                env[entry["name"]] = re.sub(r"@[^/]+:6222$", f"@127.0.0.1:{self.cluster_ports[i]}", value)
        assert set(env) == {"NATS_ROUTE_PASSWORD", "NATS_ROUTE_0", "NATS_ROUTE_1", "NATS_ROUTE_2"}, env
        return env

    def start(self, name: str, *, cluster_port: int, password: str = ROUTE_PASSWORD, route_tls: bool = True,
              certs: Path | None = None) -> int:
        """One server; returns its monitoring port."""
        folder = self.tmp / name
        folder.mkdir()
        client_port, http_port = _free_port(), _free_port()
        certs = certs or self.certs
        for file, text in self.fragments.items():
            if file == "cluster-tls.conf" and not route_tls:
                text = "# no TLS on the routes\n"
            (folder / file).write_text(text.replace("/etc/nats-certs/", f"{certs}/")
                                       .replace("0.0.0.0:6222", f"127.0.0.1:{cluster_port}"))
        conf = (re.sub(r"^port: 4222$", f"port: {client_port}", self.nats_conf, flags=re.MULTILINE)
                .replace("http_port: 8222", f"http_port: {http_port}")
                .replace("store_dir: /data/jetstream", f"store_dir: {folder / 'js'}")
                .replace("max_file_store: 9GB", "max_file_store: 64MB")
                .replace("pid_file: /var/run/nats/nats.pid", f"pid_file: {folder / 'nats.pid'}"))
        assert f"listen: 127.0.0.1:{cluster_port}" in (folder / "cluster.conf").read_text(), "listen address not moved"
        (folder / "nats.conf").write_text(conf)
        env = {"PATH": os.environ.get("PATH", ""), "POD_NAME": name, **USER_PASSWORDS, **self._route_env(password)}
        log = (folder / "log").open("wb")
        self.processes.append(subprocess.Popen([self.binary, "--config", str(folder / "nats.conf")], cwd=folder,
                                               env=env, stdout=log, stderr=subprocess.STDOUT))
        return http_port

    def log(self, name: str) -> str:
        return (self.tmp / name / "log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


@needs_kubectl
def test_routes_form_with_the_password_and_tls_and_refuse_without_either(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        ports = cluster.cluster_ports
        http0 = cluster.start("nats-0", cluster_port=ports[0])
        http1 = cluster.start("nats-1", cluster_port=ports[1])
        assert _wait(lambda: "nats-1" in _routez(http0) and "nats-0" in _routez(http1)), cluster.log("nats-0")
        # Each intruder takes the third server's place (its address is in the others' routes too).
        cluster.start("wrong-password", cluster_port=ports[2], password="pWrong0")
        assert _wait(lambda: re.search(r"auth", cluster.log("nats-0"), flags=re.IGNORECASE) is not None), \
            cluster.log("nats-0")
        assert cluster.processes[-1].poll() is None, cluster.log("wrong-password")
        assert set(_routez(http0)) == {"nats-1"}, _routez(http0)
        cluster.processes.pop().terminate()
        # The right password but plaintext routes: the TLS handshake fails first.
        time.sleep(0.5)
        cluster.start("no-tls", cluster_port=ports[2], route_tls=False)
        assert _wait(lambda: re.search(r"tls", cluster.log("nats-1"), flags=re.IGNORECASE) is not None), \
            cluster.log("nats-1")
        assert cluster.processes[-1].poll() is None, cluster.log("no-tls")
        time.sleep(1.5)
        assert set(_routez(http0)) == {"nats-1"} and set(_routez(http1)) == {"nats-0"}
    finally:
        cluster.stop()


def test_the_example_certificate_serves_the_client_port_and_the_routes():
    """certificate.example.yaml is applied by hand, so no render checks it: the routes' mutual TLS needs the
    servers' names under the headless Service and client auth besides server auth."""
    import yaml

    from tests.support.kustomize import K8S, validate

    (doc,) = yaml.safe_load_all((K8S / "components" / "nats-tls" / "certificate.example.yaml").read_text())
    validate(doc)
    spec = doc["spec"]
    assert spec["secretName"] == "nats-tls"
    assert {"nats", "*.nats-cluster", "*.nats-cluster.stablealign.svc"} <= set(spec["dnsNames"])
    assert {"server auth", "client auth"} <= set(spec["usages"])
