"""Every overlay rendered with and without every component (issue 19, item 5).

A component is added to an overlay by one line (``components:``), so each pair must work: a component's
patch once replaced ``env/0`` of every service, which on the gpu overlay took the LLM endpoints from agents
and observers, the backend from the world and the runner from the trainer, and left the NATS URL twice.
Overlays and components are discovered from their folders; each pair is rendered from a copy of ``deploy/``
whose overlay lists the component (and once without it, when the overlay lists it already), just as a user
would edit it. Checks: it renders and validates strictly; each service container keeps every variable it
has without the component, with its value unless the component sets it; no container names a variable
twice; and what the component's patches, generators and resources say is in the render.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.support.kustomize import (
    K8S,
    KUBECTL,
    configmap_data,
    find,
    kustomization,
    listed_components,
    pod_spec,
    render_variant,
    validation_errors,
)

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (CI installs it): cannot render")

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
PAIRS = [(overlay, component) for overlay in OVERLAYS for component in COMPONENTS]
SERVICE_LABEL = ("app.kubernetes.io/component", "service")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def with_and_without(overlay: str, component: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    listed = frozenset(listed_components(overlay))
    return render_variant(overlay, listed | {component}), render_variant(overlay, listed - {component})


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _is_service(doc: dict) -> bool:
    return doc["kind"] == "Deployment" and doc["metadata"].get("labels", {}).get(SERVICE_LABEL[0]) == SERVICE_LABEL[1]


def _component_patch_docs(component: str) -> list[dict]:
    """The strategic-merge patch documents of a component (files and inline), JSON patches left out."""
    folder = K8S / "components" / component
    docs: list[dict] = []
    for patch in kustomization(folder).get("patches", []):
        text = (folder / patch["path"]).read_text() if "path" in patch else patch["patch"]
        docs += [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and "kind" in d]
    return docs


def _component_env_names(component: str) -> set[str]:
    """Variables a component's patches set on purpose (their values may differ from the overlay's)."""
    return {e["name"] for d in _component_patch_docs(component) if d.get("$patch") != "delete"
            for c in _containers(d) for e in c.get("env", [])}


def test_overlays_and_components_are_discovered():
    """The parametrisation below must not silently become empty (a moved folder would skip every pair)."""
    assert {"dev", "gpu"} <= set(OVERLAYS)
    assert {"nats-tls", "grpc-tls", "tgi", "keda", "monitoring", "network-policies"} <= set(COMPONENTS)
    assert len(PAIRS) == len(OVERLAYS) * len(COMPONENTS)


@needs_kubectl
@pytest.mark.parametrize(("overlay", "component"), PAIRS)
def test_component_on_overlay_renders_validates_and_keeps_every_variable(overlay, component):
    docs, without = with_and_without(overlay, component)
    assert not (errors := validation_errors(docs)), f"{overlay} + {component}: {errors}"
    stray = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
             if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "stablealign"]
    assert not stray, f"{overlay} + {component}: objects outside the namespace: {stray}"
    # No container of any workload names a variable twice (the last one would win, silently).
    for doc in docs:
        for c in _containers(doc):
            names = [e["name"] for e in c.get("env", [])]
            twice = sorted({n for n in names if names.count(n) > 1})
            assert not twice, f"{overlay} + {component}: {doc['metadata']['name']}/{c['name']} sets {twice} twice"
    # Every service keeps what it had without the component; only what the component sets may change.
    own = _component_env_names(component)
    after = {_key(d): d for d in docs}
    services = [d for d in without if _is_service(d)]
    assert len(services) == 4, [d["metadata"]["name"] for d in services]
    for before in services:
        doc = after[_key(before)]
        for c_before in _containers(before):
            (c_after,) = [c for c in _containers(doc) if c["name"] == c_before["name"]]
            env_after = {e["name"]: e for e in c_after.get("env", [])}
            for entry in c_before.get("env", []):
                name = entry["name"]
                assert name in env_after, f"{overlay} + {component}: {c_before['name']} lost {name}"
                if name not in own:
                    assert env_after[name] == entry, f"{overlay} + {component}: {c_before['name']} changed {name}"


@needs_kubectl
@pytest.mark.parametrize(("overlay", "component"), PAIRS)
def test_what_the_component_says_is_in_the_render(overlay, component):
    docs, _ = with_and_without(overlay, component)
    folder = K8S / "components" / component
    spec = kustomization(folder)
    by_key = {_key(d): d for d in docs}
    # Its resources (files; a folder is a kustomization of its own, rendered by the manifest tests).
    for resource in spec.get("resources", []):
        if (folder / resource).is_file():
            for d in yaml.safe_load_all((folder / resource).read_text()):
                if d:
                    assert _key(d) in by_key, f"{overlay} + {component}: {_key(d)} missing"
    # Its generators: merged files replace the overlay's, new ConfigMaps carry every file.
    for generator in spec.get("configMapGenerator", []):
        data = configmap_data(docs, generator["name"])
        for entry in generator.get("files", []):
            key, _, source = entry.partition("=")
            source = source or key
            assert data[Path(key).name] == (folder / source).read_text(), (overlay, component, key)
    # Its strategic-merge patches: deletions gone, everything else they say in place (variables, ports, probes,
    # mounts, volumes).
    for patch in _component_patch_docs(component):
        if patch.get("$patch") == "delete":
            assert _key(patch) not in by_key, f"{overlay} + {component}: {_key(patch)} was to be deleted"
            continue
        assert _contains(by_key[_key(patch)], patch), f"{overlay} + {component}: {_key(patch)} lacks part of {patch}"


def _contains(actual, wanted) -> bool:
    """Whether a rendered object holds everything a strategic-merge patch says: maps key by key, lists item
    by item (each wanted item inside some rendered one: env by name and value, ports, mounts, volumes)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            key.startswith("$") or (key in actual and _contains(actual[key], value)) for key, value in wanted.items())
    if isinstance(wanted, list):
        return isinstance(actual, list) and all(any(_contains(a, w) for a in actual) for w in wanted)
    return actual == wanted


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_tls_secures_the_client_port_and_the_cluster_routes(overlay):
    """With components/nats-tls every service speaks TLS to NATS and trusts its CA; where the overlay runs a
    NATS cluster, the routes need the route password and mutual TLS with the same certificate."""
    listed = frozenset(listed_components(overlay))
    docs = render_variant(overlay, listed | {"nats-tls"})
    fragments = configmap_data(docs, "nats-auth")
    assert 'cert_file: "/etc/nats-certs/tls.crt"' in fragments["tls.conf"]
    for doc in filter(_is_service, docs):
        (c,) = _containers(doc)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["STABLEALIGN_NATS_URL"] == "tls://nats:4222", doc["metadata"]["name"]
        ca_mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["nats-ca"]
        assert env["STABLEALIGN_NATS_CA"] == f"{ca_mount}/ca.crt"
    (nats,) = find(docs, "StatefulSet", "nats")
    assert {"name": "tls", "secret": {"secretName": "nats-tls"}} in nats["spec"]["template"]["spec"]["volumes"]
    cluster = fragments["cluster.conf"]
    if nats["spec"]["replicas"] > 1:
        assert "include ./cluster-tls.conf" in cluster and "authorization" in cluster
        tls = fragments["cluster-tls.conf"]
        assert "verify: true" in tls and 'ca_file: "/etc/nats-certs/ca.crt"' in tls
    else:
        assert not re.search(r"^\s*cluster\s*\{", cluster, flags=re.MULTILINE), cluster
