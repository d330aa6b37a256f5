"""deploy/k8s renders, validates against the Kubernetes schemas, and says what the services need.

Every overlay (and ``deploy/k8s`` itself, what ``kubectl apply -k deploy/k8s`` applies) is rendered
with ``kubectl kustomize`` and each document is validated strictly with ``kubernetes_validate``
(the newest schema the installed package ships). Then the checks a broken deploy would fail:
gRPC probes and a metrics port on every service, images set by ``images:``, the trainer's RBAC,
GPUs in the GPU overlay, a dashboard and alerts that only query metrics the code exports, and
(when ``promtool`` is installed) Prometheus' own checks of its config and rules.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {"top": K8S, "base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
OVERLAYS = ("top", "dev", "gpu")
SERVICES = ("agent", "observer", "world", "trainer")
SCHEMA_VERSION = kubernetes_validate.latest_version()
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (CI installs it): cannot render")


@cache
def render(target: str) -> tuple[dict, ...]:
    proc = subprocess.run([KUBECTL, "kustomize", str(TARGETS[target])], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def container(doc: dict, name: str) -> dict:
    (c,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def configmap_data(docs, prefix: str) -> dict[str, str]:
    """Data of the ConfigMap ``prefix`` (kustomize adds a content hash to generated names)."""
    (cm,) = [d for d in find(docs, "ConfigMap") if re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    return cm["data"]


@cache
def code_metric_names() -> frozenset[str]:
    names: set[str] = set()
    for folder in ("stablealign", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if "v1" in path.parts:
                continue
            names.update(re.findall(r"[\"'](stablealign_[a-z0-9_]+)[\"']", path.read_text()))
    return frozenset(names)


def metric_names_in(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bstablealign_[a-z0-9_]+", expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.removesuffix(suffix) in code_metric_names():
                name = name.removesuffix(suffix)
        names.add(name)
    return names


CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                        "PriorityClass", "CustomResourceDefinition", "IngressClass", "RuntimeClass"}


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_renders_and_validates_strictly(target):
    docs = render(target)
    assert len(docs) > 20
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # Every namespaced object carries the namespace itself: `kubectl apply -k` would put one without it in
    # the context's namespace (usually `default`), components included (issue 10).
    stray = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
             if d["kind"] not in CLUSTER_SCOPED_KINDS and d["metadata"].get("namespace") != "stablealign"]
    assert not stray, f"{target}: objects outside the stablealign namespace: {stray}"


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_service_has_grpc_probes_metrics_and_drains(target):
    docs = render(target)
    assert one(docs, "StatefulSet", "nats")["spec"]["volumeClaimTemplates"], "JetStream needs a volume"
    nats_ports = {p["name"]: p["port"] for p in one(docs, "Service", "nats")["spec"]["ports"]}
    assert nats_ports == {"client": 4222, "monitoring": 8222, "exporter": 7777}
    for name in SERVICES:
        deployment = one(docs, "Deployment", name)
        pod = deployment["spec"]["template"]
        c = container(deployment, name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == 9090 and "grpc" in ports, name
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], (name, probe)
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
        assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # STABLEALIGN_SHUTDOWN_GRACE_SECONDS=30
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        env = env_of(c)
        assert env["STABLEALIGN_NATS_URL"] == "nats://nats:4222"
        assert env["STABLEALIGN_GRPC_PORT"] == str(ports["grpc"]) and env["STABLEALIGN_METRICS_PORT"] == "9090"
        assert c["args"] == ["serve", name]
        service_ports = {p["name"] for p in one(docs, "Service", name)["spec"]["ports"]}
        assert service_ports == {"grpc", "metrics"}
        assert one(docs, "ServiceAccount", name)
    assert one(docs, "Deployment", "world")["spec"]["replicas"] == 1  # one leader per world
    for name in ("agent", "observer"):
        hpa = one(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"]["name"] == name


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_images_come_from_the_kustomization(target):
    docs = render(target)
    overlay = "gpu" if target == "top" else target
    spec = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    wanted = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in spec["images"]}
    assert set(wanted) == {"stablealign", "stablealign-trainer"}
    for name in SERVICES:
        image = container(one(docs, "Deployment", name), name)["image"]
        assert image == wanted["stablealign-trainer" if name == "trainer" else "stablealign"], name
    trainer = container(one(docs, "Deployment", "trainer"), "trainer")
    assert env_of(trainer)["STABLEALIGN_K8S_IMAGE"] == trainer["image"]  # training Jobs use the same image
    for doc in docs:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert ":" in c["image"].rsplit("/", 1)[-1] and not c["image"].endswith(":latest"), c["image"]


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_trainer_may_run_batch_jobs(target):
    docs = render(target)
    role = one(docs, "Role", "trainer-jobs")
    jobs_rule = [r for r in role["rules"] if r["apiGroups"] == ["batch"] and "jobs" in r["resources"]]
    assert jobs_rule and {"create", "get", "list", "watch", "delete"} <= set(jobs_rule[0]["verbs"])
    assert any("pods/log" in r["resources"] and "get" in r["verbs"] for r in role["rules"])
    binding = one(docs, "RoleBinding", "trainer-jobs")
    assert binding["roleRef"]["name"] == "trainer-jobs"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer", "namespace": "stablealign"}]
    # The template the runner renders ships as a ConfigMap mounted where STABLEALIGN_K8S_JOB_TEMPLATE points.
    data = configmap_data(docs, "trainer-job-template")
    assert data["job-template.yaml"] == (K8S / "trainer-job" / "job-template.yaml").read_text()
    trainer = one(docs, "Deployment", "trainer")
    env = env_of(container(trainer, "trainer"))
    assert env["STABLEALIGN_K8S_JOB_TEMPLATE"] == "/etc/stablealign/trainer-job/job-template.yaml"
    assert one(docs, "PersistentVolumeClaim", env["STABLEALIGN_K8S_PVC"])
    assert one(docs, "ServiceAccount", env["STABLEALIGN_K8S_SERVICE_ACCOUNT"])


@needs_kubectl
def test_gpu_overlay_runs_tgi_on_a_gpu_and_training_jobs_on_kubernetes():
    for target in ("gpu", "top"):
        docs = render(target)
        tgi = one(docs, "Deployment", "tgi")
        c = container(tgi, "tgi")
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert c["image"].startswith("ghcr.io/huggingface/text-generation-inference:")
        assert tgi["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert configmap_data(docs, "tgi-config")["model_id"]
        assert one(docs, "PersistentVolumeClaim", "tgi-model-cache")
        world = env_of(container(one(docs, "Deployment", "world"), "world"))
        assert world["STABLEALIGN_AGENT_BACKEND"] == "tgi" and world["STABLEALIGN_AGENT_URL"] == "http://tgi"
        trainer = env_of(container(one(docs, "Deployment", "trainer"), "trainer"))
        assert trainer["STABLEALIGN_RUNNER"] == "kubernetes"
    dev = render("dev")
    assert not find(dev, "Deployment", "tgi")
    assert "nvidia.com/gpu" not in json.dumps([d for d in dev if d["kind"] != "ConfigMap"])
    assert {one(dev, "Deployment", n)["spec"]["replicas"] for n in SERVICES} == {1}
    assert env_of(container(one(dev, "Deployment", "trainer"), "trainer"))["STABLEALIGN_RUNNER"] == "local"


@needs_kubectl
def test_network_policies_default_deny_and_allow_the_flows():
    docs = render("top")
    policies = {d["metadata"]["name"]: d["spec"] for d in find(docs, "NetworkPolicy")}
    deny = policies["default-deny-all"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    ports = json.dumps(policies)
    for port in (53, 4222, 50051, 9090):
        assert f'"port": {port}' in ports


def dashboard_module():
    spec = importlib.util.spec_from_file_location("stablealign_dashboard", ROOT / "deploy" / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_what_the_code_generates():
    """`make dashboard` regenerates deploy/k8s/components/monitoring/dashboards/stablealign.json; a hand edit
    of the JSON, or a change to deploy/grafana/dashboard.py without regenerating, fails here."""
    module = dashboard_module()
    committed = module.OUT.read_text(encoding="utf-8")
    assert committed == module.render(), "stale dashboard JSON: run `make dashboard`"


@needs_kubectl
def test_dashboard_and_alerts_query_only_metrics_the_code_exports():
    docs = render("top")
    dashboard = json.loads(configmap_data(docs, "grafana-dashboards")["stablealign.json"])
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("Interactions / s", "Mean alignment", "LLM latency p50 / p95", "LLM errors and retries",
                   "Trainer loss", "Trainer tokens / s"):
        assert any(t.startswith(wanted) for t in titles), wanted
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used, "no stablealign_ metric queried"
    missing = sorted(used - code_metric_names())
    assert not missing, f"queried but not exported by the code: {missing}"
    # Metrics of other programs (TGI, the NATS exporter): only known names, each from a job Prometheus scrapes.
    generator = dashboard_module()
    external = {name: job for job, names in generator.EXTERNAL_METRICS.items() for name in names}
    foreign = set().union(*(re.findall(r"\b((?:tgi|gnatsd)_[a-z_]+)\b", e) for e in exprs))
    assert foreign, "no TGI or NATS panel"
    assert not foreign - set(external), f"unknown external metrics: {sorted(foreign - set(external))}"
    scrape_jobs = {j["job_name"] for j in yaml.safe_load(configmap_data(docs, "prometheus-config")["prometheus.yml"])[
        "scrape_configs"]}
    assert {external[name] for name in foreign} <= scrape_jobs
    # Per-world panels: a row repeated by the world_id variable, over world_id-labelled gauges.
    assert any(p.get("repeat") == "world_id" for p in dashboard["panels"] if p["type"] == "row")
    assert any('world_id=~"$world_id"' in e for e in exprs)
    provisioning = configmap_data(docs, "grafana-provisioning")
    assert yaml.safe_load(provisioning["datasources.yaml"])["datasources"][0]["url"] == "http://prometheus:9090"


@needs_kubectl
@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (CI installs Debian's prometheus)")
def test_promtool_accepts_config_and_rules(tmp_path):
    docs = render("top")
    config = tmp_path / "prometheus.yml"
    config.write_text(configmap_data(docs, "prometheus-config")["prometheus.yml"])
    proc = subprocess.run([PROMTOOL, "check", "config", "--syntax-only", str(config)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = tmp_path / "alerts.yml"
    rules.write_text(configmap_data(docs, "prometheus-alerts")["alerts.yml"])
    proc = subprocess.run([PROMTOOL, "check", "rules", str(rules)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_every_stablealign_variable_is_a_setting_of_its_service(target):
    """A typo in an env name would be silently ignored by the service: every one must be a settings field."""
    import importlib

    from stablealign.config import env_name

    docs = render(target)
    for name in SERVICES:
        settings = importlib.import_module(f"services.{name}.main").SETTINGS
        known = {env_name(name) for name in settings.model_fields}
        names = {e["name"] for e in container(one(docs, "Deployment", name), name).get("env", [])}
        unknown = {n for n in names if n.startswith("STABLEALIGN_")} - known
        assert not unknown, f"{name}: {sorted(unknown)} are not {settings.__name__} fields"


def test_metrics_table_lists_every_metric():
    table = (ROOT / "docs" / "metrics.md").read_text()
    listed = set(re.findall(r"^\| `(stablealign_[a-z0-9_]+)`", table, flags=re.MULTILINE))
    missing = sorted(code_metric_names() - listed)
    assert not missing, f"add to docs/metrics.md: {missing}"
