"""Rendering and strict validation of the kustomize trees under deploy/k8s, shared by the manifest tests.

``kubectl kustomize`` renders; built-in kinds are validated by ``kubernetes_validate`` (the newest schema
the installed package ships), our custom resources by the fields of their CRDs (``CRD_SCHEMAS``), so a typo
in either fails as it would at ``kubectl apply``.
"""

from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMA_VERSION = kubernetes_validate.latest_version()
KUBECTL = shutil.which("kubectl")


def render_dir(path: Path) -> tuple[dict, ...]:
    """The documents ``kubectl kustomize path`` prints (an assertion error with kustomize's message if it fails)."""
    assert KUBECTL is not None, "kubectl is not installed"
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{path}: {proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def kustomization(path: Path) -> dict:
    """The kustomization.yaml of a folder, parsed."""
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def listed_components(overlay: str) -> list[str]:
    """The components an overlay lists, by folder name."""
    return [Path(c).name for c in kustomization(K8S / "overlays" / overlay).get("components", [])]


@cache
def _workdir() -> Path:
    """One temporary folder per test process for the copies of deploy/, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="stablealign-overlays-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def render_variant(overlay: str, components: frozenset[str]) -> tuple[dict, ...]:
    """The overlay rendered with exactly ``components``, from a private copy of deploy/ (the tree is not touched)."""
    root = _workdir() / f"{overlay}-{'-'.join(sorted(components)) or 'none'}"
    if not root.exists():
        shutil.copytree(DEPLOY, root / "deploy", ignore=shutil.ignore_patterns("docker", "__pycache__"))
    folder = root / "deploy" / "k8s" / "overlays" / overlay
    spec = kustomization(folder)
    spec["components"] = [f"../../components/{c}" for c in sorted(components)]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return render_dir(folder)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def pod_spec(doc: dict) -> dict | None:
    """The pod template's spec of a workload (Deployment, StatefulSet, Job, ...), None for other kinds."""
    return doc.get("spec", {}).get("template", {}).get("spec") if isinstance(doc.get("spec"), dict) else None


def container(doc: dict, name: str) -> dict:
    (c,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def configmap_data(docs, prefix: str) -> dict[str, str]:
    """Data of the ConfigMap ``prefix`` (kustomize adds a content hash to generated names)."""
    (cm,) = [d for d in find(docs, "ConfigMap") if re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    return cm["data"]


# Custom resources the overlays use, validated against the fields of their CRDs (kubernetes-validate ships
# only the built-in kinds). KEDA's ScaledObject (keda.sh/v1alpha1, KEDA 2.x CRD): the fields we may set,
# nothing else (a typo fails, as with the strict built-in schemas); trigger metadata values are strings.
SCALED_OBJECT_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                 "properties": {
                     "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                       "name": {"type": "string"},
                                                       "envSourceContainerName": {"type": "string"}}},
                     **{k: {"type": "integer", "minimum": 0} for k in (
                         "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                         "minReplicaCount", "maxReplicaCount")},
                     "fallback": {"type": "object"},
                     "advanced": {"type": "object", "additionalProperties": False, "properties": {
                         "restoreToOriginalReplicaCount": {"type": "boolean"},
                         "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                           "properties": {"name": {"type": "string"},
                                                                          "behavior": {"type": "object"}}},
                         "scalingModifiers": {"type": "object"}}},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                         "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                        "useCachedMetrics": {"type": "boolean"},
                                        "authenticationRef": {"type": "object"},
                                        "metadata": {"type": "object",
                                                     "additionalProperties": {"type": "string"}}}}}}},
    },
}
_ISSUER_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
               "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                              "group": {"type": "string"}}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
# cert-manager (cert-manager.io/v1): the Certificate and Issuer fields we may set.
CERTIFICATE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "kind": {"const": "Certificate"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["secretName", "issuerRef"], "additionalProperties": False,
                 "properties": {
                     "secretName": {"type": "string"}, "commonName": {"type": "string"}, "isCA": {"type": "boolean"},
                     "dnsNames": _STRINGS, "ipAddresses": _STRINGS, "uris": _STRINGS,
                     "duration": {"type": "string", "pattern": r"^\d+h$"},
                     "renewBefore": {"type": "string", "pattern": r"^\d+h$"},
                     "usages": {"type": "array", "items": {"enum": [
                         "server auth", "client auth", "digital signature", "key encipherment", "cert sign"]}},
                     "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                         "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                         "rotationPolicy": {"enum": ["Never", "Always"]}}},
                     "issuerRef": _ISSUER_REF}}},
}
ISSUER_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "kind": {"const": "Issuer"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                 "properties": {"selfSigned": {"type": "object", "additionalProperties": False},
                                "ca": {"type": "object", "required": ["secretName"], "additionalProperties": False,
                                       "properties": {"secretName": {"type": "string"}}}}}},
}
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA,
               ("cert-manager.io/v1", "Certificate"): CERTIFICATE_SCHEMA,
               ("cert-manager.io/v1", "Issuer"): ISSUER_SCHEMA}


def validate(doc: dict) -> None:
    """Strict schema validation: the built-in kinds by kubernetes-validate, our custom resources by CRD_SCHEMAS."""
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        import jsonschema

        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)


def validation_errors(docs) -> list[str]:
    """``kind/name: message at path`` for every document that fails ``validate``."""
    import jsonschema

    errors = []
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return errors
