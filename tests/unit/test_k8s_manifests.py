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
import posixpath
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.support.kustomize import configmap_data, container, env_of, find, one, validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {"top": K8S, "base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
OVERLAYS = ("top", "dev", "gpu")
SERVICES = ("agent", "observer", "world", "trainer")
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (CI installs it): cannot render")


@cache
def render(target: str) -> tuple[dict, ...]:
    proc = subprocess.run([KUBECTL, "kustomize", str(TARGETS[target])], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


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
    import jsonschema

    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
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
        # With TLS on the API port (components/grpc-tls) the kubelet, which cannot do TLS, probes the
        # plaintext health-only port.
        probed = ports["grpc-health"] if "STABLEALIGN_GRPC_TLS_CERT" in env_of(c) else ports["grpc"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == probed, (name, probe)
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
        # Autoscaled either on CPU (HPA) or, with the keda component, on pending work: never both at once.
        (scaler,) = find(docs, "HorizontalPodAutoscaler", name) + find(docs, "ScaledObject", name)
        assert scaler["spec"]["scaleTargetRef"]["name"] == name


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


def _settings_env(c: dict) -> dict[str, str]:
    """A container's STABLEALIGN_ variables with a plain value, less the gRPC TLS files (mounted from Secrets
    only in the pod; the settings read them at load) and the callers' table that needs them: what its
    settings can be loaded from here (tests/unit/test_k8s_grpc_tls.py loads those with generated files)."""
    return {name: value for name, value in env_of(c).items()
            if value is not None and name.startswith("STABLEALIGN_") and not name.startswith("STABLEALIGN_GRPC_TLS_")
            and name != "STABLEALIGN_GRPC_METHOD_CALLERS"}


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_the_trainers_roots_are_on_its_mounted_volumes(target):
    """A local job's data, model and output paths must be inside the trainer's roots: roots relative to the
    working directory would be on the image's read-only filesystem, where no job can write or find a file."""
    from services.trainer.settings import TrainerSettings
    from stablealign.core.config import load_settings

    c = container(one(render(target), "Deployment", "trainer"), "trainer")
    settings = load_settings(TrainerSettings, {}, environ=_settings_env(c))
    mounts = {m["mountPath"]: not m.get("readOnly", False) for m in c["volumeMounts"]}

    def mounted(path: str, writable: bool) -> bool:
        return path.startswith("/") and any(
            posixpath.normpath(path) == mount or posixpath.normpath(path).startswith(mount.rstrip("/") + "/")
            for mount, can_write in mounts.items() if can_write or not writable)

    for root in (*settings.trainer_data_roots, *settings.trainer_model_roots):
        assert mounted(root, writable=False), (target, root, mounts)
    for root in (settings.trainer_output_root, settings.work_dir):
        assert mounted(root, writable=True), (target, root, mounts)


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

    from stablealign.core.config import env_name

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


# --- issue 10.7 / 10.8: the training Job, availability and limits --------------------------------------------


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text)).groups()
    return int(number) * units.get(unit, 1)


def _min_replicas(docs, kind: str, name: str) -> int:
    """The fewest replicas a workload runs: its own count, or its autoscaler's floor where one drives it."""
    workload = one(docs, kind, name)
    floors = [d["spec"]["minReplicas"] for d in find(docs, "HorizontalPodAutoscaler")
              if d["spec"]["scaleTargetRef"]["name"] == name]
    floors += [d["spec"]["minReplicaCount"] for d in find(docs, "ScaledObject")
               if d["spec"]["scaleTargetRef"]["name"] == name]
    return min([workload["spec"].get("replicas", 1), *floors])


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_disruption_budgets_exactly_where_two_replicas_or_more_run(target):
    """A budget over a single pod protects nothing (issue 19); every part with two or more gets one."""
    docs = render(target)
    workloads = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: d
                 for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    budgets = {d["metadata"]["name"]: d["spec"] for d in find(docs, "PodDisruptionBudget")}
    for name, spec in budgets.items():
        assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/name": name}}, name
        # Never minAvailable = replicas: that budget would block every node drain.
        assert spec == {**spec, "maxUnavailable": 1} and "minAvailable" not in spec, name
        workload = workloads[name]
        assert _min_replicas(docs, workload["kind"], workload["metadata"]["name"]) >= 2, (target, name)
    for name in ("nats", *SERVICES):
        workload = workloads[name]
        if _min_replicas(docs, workload["kind"], name) >= 2:
            assert name in budgets, (target, name)
    assert set(budgets) == ({"agent", "observer"} if target in ("base",) else
                            set() if target == "dev" else {"nats", "agent", "observer"}), (target, sorted(budgets))


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_only_the_trainer_mounts_a_service_account_token(target):
    """Only the trainer calls the Kubernetes API (it submits Jobs); no other pod gets a token that code run
    in it could use (issue 19): neither an explicit account nor the namespace's default one."""
    docs = render(target)
    accounts = {d["metadata"]["name"]: d for d in find(docs, "ServiceAccount")}
    bound = {s["name"] for b in find(docs, "RoleBinding") for s in b["subjects"] if s["kind"] == "ServiceAccount"}
    assert bound == {"trainer"}
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec") if doc["kind"] in ("Deployment", "StatefulSet") else None
        if pod is None:
            continue
        account = pod.get("serviceAccountName", "default")
        mounted = pod.get("automountServiceAccountToken",
                          accounts.get(account, {}).get("automountServiceAccountToken", True))
        name = doc["metadata"]["name"]
        assert mounted is (account in bound), (target, name, account)
        if name in ("agent", "observer", "world", "tgi", "nats"):
            assert pod.get("automountServiceAccountToken") is False, (target, name)  # whatever the account says


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_service_has_a_cpu_limit(target):
    docs = render(target)
    for name in SERVICES:
        resources = container(one(docs, "Deployment", name), name)["resources"]
        limit = _cpu_millis(resources["limits"]["cpu"])
        assert limit >= _cpu_millis(resources["requests"]["cpu"]) and limit > 0, (target, name, resources)


def _cpu_millis(quantity) -> int:
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


@needs_kubectl
def test_tgi_runs_unprivileged_without_a_token():
    for target in ("top", "gpu"):
        docs = render(target)
        tgi = one(docs, "Deployment", "tgi")
        pod = tgi["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "tgi"
        c = container(tgi, "tgi")
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        # Its writable places are volumes: the model cache, /tmp (also HOME, where libraries cache) and /dev/shm.
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        env = env_of(c)
        assert {"/data", "/tmp", "/dev/shm"} <= mounts and env["HF_HUB_CACHE"] == "/data" and env["HOME"] == "/tmp"
        # An unprivileged port (binding 80 needs root); the Service keeps port 80 for http://tgi.
        (port,) = c["ports"]
        assert port["containerPort"] >= 1024 and f"--port={port['containerPort']}" in c["args"]
        (service_port,) = one(docs, "Service", "tgi")["spec"]["ports"]
        assert service_port["port"] == 80 and service_port["targetPort"] == port["name"]
        assert tgi["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
        # The network policies name the pod's port (what a policy sees after the Service).
        for policy in ("tgi", "sandbox-egress-llm", "prometheus"):
            assert f'"port": {port["containerPort"]}' in json.dumps(one(docs, "NetworkPolicy", policy)["spec"]), policy


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_prometheus_has_no_lifecycle_api(target):
    """/-/quit and /-/reload would let anyone who reaches port 9090 stop or reload it."""
    args = container(one(render(target), "Deployment", "prometheus"), "prometheus")["args"]
    assert not [a for a in args if a.startswith("--web.enable-lifecycle")], args


@needs_kubectl
def test_gpu_overlay_trainer_accepts_only_the_kubernetes_runner():
    """A local job would run requester-chosen training inside the trainer pod, which holds the token that
    creates Jobs; on the gpu overlay every job goes to a Job pod without one."""
    from services.trainer.settings import TrainerSettings
    from stablealign.core.config import load_settings

    for target, wanted in (("top", ("kubernetes",)), ("gpu", ("kubernetes",)), ("dev", None)):
        settings = load_settings(TrainerSettings, {},
                                 environ=_settings_env(container(one(render(target), "Deployment", "trainer"), "trainer")))
        if wanted is None:
            assert "local" in settings.runners and settings.runner == "local"
        else:
            assert settings.runners == wanted and settings.runner == "kubernetes"


def _service_stream_settings(docs) -> list:
    """The stream settings each service runs with (its env over the typed defaults)."""
    from stablealign.nats.streams import StreamSettings

    settings = []
    for name in SERVICES:
        env = env_of(container(one(docs, "Deployment", name), name))
        fields = {f: env[f"STABLEALIGN_{f.upper()}"] for f in StreamSettings.model_fields
                  if f"STABLEALIGN_{f.upper()}" in env}
        settings.append(StreamSettings(**fields))
    return settings


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_streams_are_bounded_alike_in_every_service_and_fit_the_nats_volume(target):
    docs = render(target)
    settings = _service_stream_settings(docs)
    assert all(s == settings[0] for s in settings), "every service must create the streams with the same limits"
    limits = settings[0]
    # Each server stores its replica of every stream: the byte limits together must fit one server's volume.
    total = sum(getattr(limits, f) for f in type(limits).model_fields if f.endswith("_max_bytes"))
    total += limits.stream_state_max_bytes  # two state buckets
    nats = one(docs, "StatefulSet", "nats")
    volume = _quantity_bytes(nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])
    assert total < volume, (total, volume)
    replicas = nats["spec"]["replicas"]
    assert limits.stream_replicas == (3 if target in ("top", "gpu") else 1) <= replicas


@needs_kubectl
def test_gpu_overlay_runs_nats_as_a_three_server_cluster():
    for target in ("top", "gpu"):
        docs = render(target)
        nats = one(docs, "StatefulSet", "nats")
        assert nats["spec"]["replicas"] == 3 and nats["spec"]["podManagementPolicy"] == "Parallel"
        headless = one(docs, "Service", nats["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        assert headless["spec"]["selector"].items() <= nats["spec"]["template"]["metadata"]["labels"].items()
        c = container(nats, "nats")
        cluster = configmap_data(docs, "nats-auth")["cluster.conf"]
        assert re.search(r"^\s*name: \S+$", cluster, flags=re.MULTILINE)
        assert "listen: 0.0.0.0:6222" in cluster
        # A route to every server, by its StatefulSet DNS name under the headless Service, logged in as the
        # route user: the URLs (which carry the password) come from variables Kubernetes expands from the Secret.
        assert "routes: [$NATS_ROUTE_0, $NATS_ROUTE_1, $NATS_ROUTE_2]" in cluster
        assert "user: route" in cluster and "password: $NATS_ROUTE_PASSWORD" in cluster
        env = [e["name"] for e in c["env"]]
        (secret,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "NATS_ROUTE_PASSWORD"]
        assert secret == {"name": "nats-route", "key": "password"}
        for i in range(3):
            (url,) = [e["value"] for e in c["env"] if e["name"] == f"NATS_ROUTE_{i}"]
            assert url == f"nats://route:$(NATS_ROUTE_PASSWORD)@nats-{i}.{headless['metadata']['name']}:6222"
            assert env.index("NATS_ROUTE_PASSWORD") < env.index(f"NATS_ROUTE_{i}")  # expanded from earlier ones only
        assert {"name": "cluster", "containerPort": 6222} in c["ports"]
        spread = nats["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        policies = json.dumps([d["spec"] for d in find(docs, "NetworkPolicy") if d["metadata"]["name"].startswith("nats")])
        assert '"port": 6222' in policies
    dev = render("dev")
    assert one(dev, "StatefulSet", "nats")["spec"]["replicas"] == 1
    assert not re.search(r"^\s*cluster\s*\{", configmap_data(dev, "nats-auth")["cluster.conf"], flags=re.MULTILINE)


@needs_kubectl
def test_keda_scales_agents_and_observers_on_a_metric_the_code_exports():
    for target in ("top", "gpu"):
        docs = render(target)
        for name in ("agent", "observer"):
            assert not find(docs, "HorizontalPodAutoscaler", name)  # KEDA's own HPA replaces it
            scaled = one(docs, "ScaledObject", name)
            assert scaled["metadata"]["namespace"] == "stablealign"
            target_ref = scaled["spec"]["scaleTargetRef"]
            assert one(docs, target_ref["kind"], target_ref["name"])
            assert 2 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
            (trigger,) = scaled["spec"]["triggers"]
            assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
            query = trigger["metadata"]["query"]
            assert metric_names_in(query) == {"stablealign_requests_in_flight"} <= code_metric_names()
            assert f'job="{name}"' in query  # the scrape job of that service (prometheus.yml relabelling)
            # The address is this namespace's Prometheus Service.
            host, port = re.fullmatch(r"http://([a-z-]+)\.stablealign\.svc:(\d+)",
                                      trigger["metadata"]["serverAddress"]).groups()
            assert int(port) in {p["port"] for p in one(docs, "Service", host)["spec"]["ports"]}
        # KEDA's operator may reach Prometheus through the network policies.
        assert "keda" in json.dumps(one(docs, "NetworkPolicy", "prometheus")["spec"]["ingress"])
    assert {d["metadata"]["name"] for d in find(render("dev"), "HorizontalPodAutoscaler")} == {"agent", "observer"}


@needs_kubectl
def test_tgi_serves_a_pinned_revision_and_is_scraped():
    docs = render("top")
    assert re.fullmatch(r"[0-9a-f]{40}", configmap_data(docs, "tgi-config")["revision"])
    c = container(one(docs, "Deployment", "tgi"), "tgi")
    assert "--revision=$(MODEL_REVISION)" in c["args"]
    (revision,) = [e for e in c["env"] if e["name"] == "MODEL_REVISION"]
    assert revision["valueFrom"]["configMapKeyRef"]["key"] == "revision"
    jobs = {j["job_name"]: j for j in yaml.safe_load(configmap_data(docs, "prometheus-config")["prometheus.yml"])[
        "scrape_configs"]}
    assert jobs["tgi"]["dns_sd_configs"][0]["names"] == ["tgi"]
    # NATS: every server's exporter, through a headless Service (one A record per pod).
    (names,) = [c["names"] for c in jobs["nats"]["dns_sd_configs"]]
    exporter = one(docs, "Service", names[0])
    assert exporter["spec"]["clusterIP"] == "None"
    assert exporter["spec"]["ports"][0]["port"] == jobs["nats"]["dns_sd_configs"][0]["port"] == 7777


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_grafana_prometheus_and_alertmanager_are_production_ready(target):
    docs = render(target)
    grafana = env_of(container(one(docs, "Deployment", "grafana"), "grafana"))
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    c = container(one(docs, "Deployment", "grafana"), "grafana")
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets["GF_SECURITY_ADMIN_USER"]["name"] == secrets["GF_SECURITY_ADMIN_PASSWORD"]["name"] == "grafana-admin"
    assert not secrets["GF_SECURITY_ADMIN_PASSWORD"].get("optional")
    # Prometheus keeps its data on a claim (the cluster's default StorageClass).
    prometheus = one(docs, "Deployment", "prometheus")
    (data,) = [v for v in prometheus["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    claim = one(docs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim["spec"]
    assert prometheus["spec"]["strategy"]["type"] == "Recreate"
    # Alerts go to the Alertmanager Service, which sends them to the webhook from its Secret.
    config = yaml.safe_load(configmap_data(docs, "prometheus-config")["prometheus.yml"])
    (target_,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target_.split(":")
    assert int(port) in {p["port"] for p in one(docs, "Service", host)["spec"]["ports"]}
    manager = yaml.safe_load(configmap_data(docs, "alertmanager-config")["alertmanager.yml"])
    receivers = {r["name"]: r for r in manager["receivers"]}
    assert manager["route"]["receiver"] in receivers
    url_file = receivers[manager["route"]["receiver"]]["webhook_configs"][0]["url_file"]
    pod = one(docs, "Deployment", "alertmanager")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (webhook,) = [v for v in pod["volumes"] if "secret" in v]
    assert url_file == f"{mounts[webhook['name']]}/url" and webhook["secret"]["secretName"] == "alertmanager-webhook"


@needs_kubectl
@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed (Debian's prometheus-alertmanager)")
def test_amtool_accepts_the_alertmanager_config(tmp_path):
    config = tmp_path / "alertmanager.yml"
    config.write_text(configmap_data(render("top"), "alertmanager-config")["alertmanager.yml"])
    proc = subprocess.run([shutil.which("amtool"), "check-config", str(config)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_kubectl
def test_the_shipped_job_template_renders_a_valid_multi_node_job(tmp_path):
    """What the trainer pod runs: the ConfigMap kustomize ships, rendered by the kubernetes runner with the
    trainer Deployment's settings, for 2 nodes x 8 GPUs."""
    from services.trainer.runners.kubernetes import KubernetesRunner, render_objects
    from services.trainer.settings import TrainerSettings
    from stablealign.training.launch import EXIT_CONFIG_ERROR
    from stablealign.v1 import trainer_pb2

    docs = render("top")
    template = tmp_path / "job-template.yaml"
    template.write_text(configmap_data(docs, "trainer-job-template")["job-template.yaml"])
    env = env_of(container(one(docs, "Deployment", "trainer"), "trainer"))
    settings = TrainerSettings(k8s_job_template=str(template), k8s_namespace="stablealign",
                               k8s_image=env["STABLEALIGN_K8S_IMAGE"], k8s_pvc=env["STABLEALIGN_K8S_PVC"],
                               k8s_service_account=env["STABLEALIGN_K8S_SERVICE_ACCOUNT"])
    runner = KubernetesRunner(settings)
    spec = runner.prepare(trainer_pb2.JobSpec(job_id="sa-7b", runner="kubernetes", model="models/base",
                                              data="data/train.jsonl", gpus=8, nodes=2))
    job, service = render_objects(spec, settings)
    for doc in (job, service):
        validate(doc)
        assert doc["metadata"]["namespace"] == "stablealign"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert set(c["resources"]["limits"]) == {"cpu", "memory", "nvidia.com/gpu"}
    assert job["spec"]["activeDeadlineSeconds"] > 0
    rules = {r["action"]: r for r in job["spec"]["podFailurePolicy"]["rules"]}
    assert rules["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    assert rules["FailJob"]["onExitCodes"]["values"] == [EXIT_CONFIG_ERROR]
    options = dict(o.lstrip("-").split("=", 1) for o in c["command"][3:c["command"].index("--")])
    assert int(options["nnodes"]) * int(options["nproc_per_node"]) == 16 == job["spec"]["completions"] * 8
    assert options["master_addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    # The trainer may create that Service, and the training pods may reach each other (rendezvous, NCCL).
    role = one(docs, "Role", "trainer-jobs")
    assert any("services" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    training = one(docs, "NetworkPolicy", "training-jobs")["spec"]
    peers = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "stablealign-training"}}}
    assert {"from": [peers]} in training["ingress"] and {"to": [peers]} in training["egress"]
    assert env_of(c)["STABLEALIGN_METRICS_HOST"] == "0.0.0.0"  # rank 0's /metrics reachable by Prometheus
