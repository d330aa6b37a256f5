"""The Kubernetes runner: a training job as a batch/v1 Job on the GPU pool (torchrun + FSDP).

The Job comes from ``deploy/k8s/trainer-job/job-template.yaml`` (placeholders documented there):
an Indexed Job with one pod per node, ``nvidia.com/gpu`` = ``spec.gpus`` per pod, CPU and memory
requests equal to their limits, ``python -m stablealign.training.launch`` (exit 2 on a configuration
that cannot run — the Job's podFailurePolicy fails the Job on it — else torchrun over the node's
GPUs, FSDP when there is more than one) with ``--resume``, so that a retried pod continues from the
last checkpoint in its output directory, and a PVC for data and checkpoints. A job on several nodes
also gets the template's headless Service (owned by the Job): pod i is ``<job>-<i>.<job>``, and
torchrun's static rendezvous meets on node 0. The official ``kubernetes`` client is synchronous (``kubernetes_asyncio`` is not a
dependency), so every API call runs in ``asyncio.to_thread``; pod logs are followed in daemon
threads that hand lines to the event loop, so that a stuck log stream can never block shutdown.

The Job outlives the trainer service: after a restart the scheduler re-attaches by name (the
job's ``handle``) and log streaming resumes after the last line already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import hashlib
import re
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from services.trainer.runners import (
    JobReporter,
    Runner,
    RunResult,
    canonical_arg,
    check_gpus,
    metrics_from_json,
    metrics_from_progress,
    train_module_argv,
)
from services.trainer.settings import TrainerSettings
from stablealign.core.errors import UnavailableError, ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.confine import confined_pod_path
from stablealign.v1 import trainer_pb2

log = get_logger(__name__)

CONTAINER = "trainer"
WORKSPACE = "/workspace"
JOBS_DIR = "runs"  # job output directories on the training volume: /workspace/runs/<job_id>
METRICS_PORT = 9090
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
# Container states that will not fix themselves: reported in Job.message while the pod waits.
_STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "InvalidImageName",
                  "CreateContainerError", "CrashLoopBackOff"}


def job_name(job_id: str) -> str:
    """A DNS-1123 name for the Job, unique per job id even where lower-casing would merge two ids."""
    digest = hashlib.sha1(job_id.encode()).hexdigest()[:6]
    stem = _DNS_LABEL.sub("-", job_id.lower()).strip("-")[:40].strip("-") or "job"
    return f"sa-train-{stem}-{digest}"


def torchrun_options(name: str, gpus: int, nodes: int, rendezvous_port: int) -> list[str]:
    """torchrun's options for a job's pods: one node on its own, or node ``$(JOB_COMPLETION_INDEX)`` of
    ``nodes`` meeting at node 0 (``<job>-0.<job>``, its name under the job's headless Service).

    Static rendezvous: the pods of an Indexed Job know their node rank, and a Job retries a failed pod
    under the same index, so the elastic (c10d) backend's membership changes would buy nothing.
    Kubernetes expands ``$(JOB_COMPLETION_INDEX)`` from the env var the Job controller sets.
    """
    options = [f"--nnodes={nodes}", f"--nproc_per_node={gpus}"]
    if nodes > 1:
        options += ["--node_rank=$(JOB_COMPLETION_INDEX)", "--rdzv_backend=static",
                    f"--master_addr={name}-0.{name}", f"--master_port={rendezvous_port}"]
    return options


def training_command(spec: trainer_pb2.JobSpec, gpus: int, *, nodes: int = 1, rendezvous_port: int = 29500,
                     fsdp_default: str = "full_shard", metrics_port: int | None = METRICS_PORT) -> list[str]:
    """The pod's command: the launcher (exit 2 on a configuration that cannot run), then torchrun over the
    node's GPUs; FSDP (full_shard unless the job says otherwise) when there is more than one GPU in all;
    always ``--resume``, so that a retried pod continues from the last checkpoint in ``--out``."""
    total = gpus * nodes
    train = train_module_argv(spec, total, fsdp_default)[2:]  # without "-m stablealign.training.train"
    train.append("--resume")
    if metrics_port is not None and "--metrics-port" not in train:
        train += ["--metrics-port", str(metrics_port)]
    options = torchrun_options(job_name(spec.job_id), gpus, nodes, rendezvous_port)
    return ["python", "-m", "stablealign.training.launch", *options, "--", *train]


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {_substitute(k, values): _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            value = _substitute(item, values)
            if isinstance(item, str) and isinstance(value, list):
                out.extend(value)  # "${COMMAND}" as a list element expands in place
            else:
                out.append(value)
        return out
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            if whole.group(1) not in values:
                raise ValidationError(f"job template: unknown placeholder ${{{whole.group(1)}}}")
            return copy.deepcopy(values[whole.group(1)])

        def text(match: re.Match) -> str:
            if match.group(1) not in values:
                raise ValidationError(f"job template: unknown placeholder ${{{match.group(1)}}}")
            return str(values[match.group(1)])

        return _PLACEHOLDER.sub(text, node)
    return node


def load_template(path: str | Path) -> list[dict]:
    """The template's documents: one batch/v1 Job and, for jobs on several nodes, one headless Service."""
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as exc:
        raise UnavailableError(f"job template {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UnavailableError(f"job template {path} is not valid YAML: {exc}") from exc
    kinds = [d.get("kind") if isinstance(d, dict) else None for d in documents]
    if kinds.count("Job") != 1 or kinds.count("Service") > 1 or set(kinds) - {"Job", "Service"}:
        raise UnavailableError(f"job template {path}: expected one batch/v1 Job and at most one Service, got {kinds}")
    return documents


def _template_values(spec: trainer_pb2.JobSpec, settings: TrainerSettings) -> dict[str, Any]:
    gpus, nodes = max(1, spec.gpus), max(1, spec.nodes)
    name = job_name(spec.job_id)
    return {
        "JOB_NAME": name,
        "JOB_ID": spec.job_id,
        "NAMESPACE": spec.namespace or settings.k8s_namespace,
        "IMAGE": spec.image or settings.k8s_image,
        "NODES": nodes,
        "GPUS": gpus,
        "CPU": settings.k8s_cpu_per_gpu * gpus,
        "MEMORY": f"{settings.k8s_memory_gib_base + settings.k8s_memory_gib_per_gpu * gpus}Gi",
        "COMMAND": training_command(spec, gpus, nodes=nodes, rendezvous_port=settings.k8s_rendezvous_port),
        "RDZV_PORT": settings.k8s_rendezvous_port,
        "PVC_NAME": settings.k8s_pvc,
        "SERVICE_ACCOUNT": settings.k8s_service_account,
        # A failed node fails every node's torchrun: one incident costs up to `nodes` pod failures.
        "BACKOFF_LIMIT": settings.k8s_backoff_limit * nodes,
        "ACTIVE_DEADLINE_SECONDS": settings.k8s_active_deadline_seconds,
        "TTL_SECONDS": settings.k8s_ttl_seconds_after_finished,
    }


def render_objects(spec: trainer_pb2.JobSpec, settings: TrainerSettings,
                   template: list[dict] | dict | None = None) -> list[dict]:
    """The manifests (plain dicts) of one job: its Job, then — for a job on several nodes — its headless
    Service (created after the Job, owned by it)."""
    documents = load_template(settings.k8s_job_template) if template is None else template
    documents = [documents] if isinstance(documents, dict) else documents
    values = _template_values(spec, settings)
    rendered = [_substitute(doc, values) for doc in documents]
    (manifest,) = [d for d in rendered if d.get("kind") == "Job"]
    pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
    containers = pod.get("containers", [])
    if not any(c.get("name") == CONTAINER for c in containers):
        raise UnavailableError(f"job template {settings.k8s_job_template}: no container named {CONTAINER!r}")
    for container in containers + pod.get("initContainers", []):
        # Quantities in their canonical string form (the API server's; the client's models insist).
        for kind in ("requests", "limits"):
            amounts = container.get("resources", {}).get(kind) or {}
            for key, amount in amounts.items():
                amounts[key] = str(amount)
    objects = [manifest]
    if values["NODES"] > 1:
        services = [d for d in rendered if d.get("kind") == "Service"]
        if not services:
            raise ValidationError(f"job template {settings.k8s_job_template} has no headless Service: "
                                  "jobs on several nodes need one for torchrun's rendezvous")
        objects.append(services[0])
    return objects


def render_job(spec: trainer_pb2.JobSpec, settings: TrainerSettings, template: list[dict] | dict | None = None) -> dict:
    """The batch/v1 Job manifest (a plain dict) for one job."""
    return render_objects(spec, settings, template)[0]


def _pod_path(path: str, field: str) -> str:
    """Job paths are paths inside the training pod: relative ones are taken under the workspace PVC, and
    none may leave it (``..``, another absolute path: ValidationError naming the field). The trainer cannot
    see the volume, so symlinks on it are the volume owner's; the pod mounts nothing else writable."""
    if not path:
        raise ValidationError(f"{field} is required (a path on the training volume, mounted at {WORKSPACE})")
    return confined_pod_path(path, WORKSPACE, field)


def job_pod_output_dir(requested: str, job_id: str) -> str:
    """The job's own directory on the training volume, ``/workspace/runs/<job_id>``, or a path inside it
    (relative paths are taken under it): the pod resumes from the checkpoints there, so it must hold only
    this job's files (``services.trainer.inputs.job_output_dir`` is the local runner's twin)."""
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValidationError(f"job_id {job_id!r} cannot name an output directory")
    own = f"{WORKSPACE}/{JOBS_DIR}/{job_id}"
    return confined_pod_path(requested.strip() or own, own, "output_dir")


def _parse_log_line(raw: str) -> tuple[float, str]:
    """``2024-01-01T00:00:00.123456789Z text`` (timestamps=true) -> (unix time, text)."""
    stamp, _, text = raw.partition(" ")
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        moment = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
        return moment.timestamp() + (float("0." + frac) if frac.isdigit() else 0.0), text
    except ValueError:
        return time.time(), raw


class KubernetesRunner(Runner):
    name = "kubernetes"
    detached = True

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self._client = None
        self._client_lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._streams: dict[str, list] = {}  # job id -> open log responses (closed on stop)

    # --- API access ----------------------------------------------------------------------------

    def _api(self):
        """(BatchV1Api, CoreV1Api), built once: explicit URL, kubeconfig, or in-cluster credentials."""
        with self._client_lock:
            if self._client is None:
                from kubernetes import client, config

                s = self.settings
                if s.k8s_api_url:
                    configuration = client.Configuration()
                    configuration.host = s.k8s_api_url
                    api_client = client.ApiClient(configuration)
                elif s.k8s_in_cluster:
                    config.load_incluster_config()
                    api_client = client.ApiClient()
                else:
                    try:
                        config.load_incluster_config()
                    except config.ConfigException:
                        config.load_kube_config(config_file=s.k8s_kubeconfig or None)
                    api_client = client.ApiClient()
                self._client = (client.BatchV1Api(api_client), client.CoreV1Api(api_client))
            return self._client

    async def _call(self, what: str, fn, *args, **kwargs):
        """One API call in a thread; API and connection errors become our typed errors."""
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                raise
            if exc.status in (400, 403, 409, 422):
                raise ValidationError(f"kubernetes {what}: {exc.status} {exc.reason}: {(exc.body or '')[:500]}") from exc
            raise UnavailableError(f"kubernetes {what}: {exc.status} {exc.reason}") from exc
        except ValueError as exc:  # the client's models refuse the manifest
            raise ValidationError(f"kubernetes {what}: {exc}") from exc
        except Exception as exc:  # connection errors, config errors
            raise UnavailableError(f"kubernetes {what}: {type(exc).__name__}: {exc}") from exc

    # --- runner interface ------------------------------------------------------------------------

    def prepare(self, spec: trainer_pb2.JobSpec) -> trainer_pb2.JobSpec:
        spec = trainer_pb2.JobSpec.FromString(spec.SerializeToString())
        spec.model = _pod_path(spec.model, "model")
        spec.data = _pod_path(spec.data, "data")
        spec.output_dir = job_pod_output_dir(spec.output_dir, spec.job_id)
        check_gpus(spec.gpus, self.settings)
        if spec.nodes < 0 or spec.nodes > self.settings.k8s_max_nodes:
            raise ValidationError(f"nodes must be between 1 and {self.settings.k8s_max_nodes} "
                                  f"(STABLEALIGN_K8S_MAX_NODES), got {spec.nodes}")
        for key, value in spec.args.items():
            if canonical_arg(key) == "resume" and str(value).strip().lower() in ("0", "false", "no", "off"):
                raise ValidationError("resume=false: a Kubernetes job always resumes from the last checkpoint in its "
                                      "output_dir (a retried pod must not start over); submit a new job instead")
        spec.gpus = max(1, spec.gpus)
        spec.nodes = max(1, spec.nodes)
        spec.namespace = spec.namespace or self.settings.k8s_namespace
        spec.image = spec.image or self.settings.k8s_image
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec.namespace):
            raise ValidationError(f"namespace {spec.namespace[:100]!r} is not a valid Kubernetes namespace")
        allowed = tuple(dict.fromkeys((self.settings.k8s_namespace, *self.settings.k8s_allowed_namespaces)))
        if spec.namespace not in allowed:
            raise ValidationError(f"namespace {spec.namespace!r} is not allowed for training jobs "
                                  f"(STABLEALIGN_K8S_ALLOWED_NAMESPACES; allowed: {', '.join(allowed)})")
        render_objects(spec, self.settings)  # unknown args, a broken template: fail now, not in the cluster
        return spec

    async def run(self, job: trainer_pb2.Job, reporter: JobReporter, *, reattach: bool = False) -> RunResult:
        from kubernetes.client.exceptions import ApiException

        spec = job.spec
        name = job.handle or job_name(spec.job_id)
        batch, core = self._api()
        cutoff = 0.0
        if not reattach:
            manifest, *services = render_objects(spec, self.settings)
            try:
                created = await self._call("create job", batch.create_namespaced_job, spec.namespace, manifest)
                for service in services:
                    # Owned by the Job: deleted with it (cancel, ttlSecondsAfterFinished).
                    service["metadata"]["ownerReferences"] = [{
                        "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": created.metadata.uid,
                        "controller": False, "blockOwnerDeletion": False}]
                    await self._call("create service", core.create_namespaced_service, spec.namespace, service)
            except ApiException as exc:
                return RunResult(trainer_pb2.JOB_STATE_FAILED, -1,
                                 f"kubernetes create job: {exc.status} {exc.reason}")
            await reporter.handle(name)
            nodes = f"{spec.nodes} nodes x " if spec.nodes > 1 else ""
            await reporter.log(f"created Job {spec.namespace}/{name} ({nodes}{spec.gpus} GPU(s), image {spec.image})")
            log.info("job.k8s_created", extra={"job_id": spec.job_id, "k8s_job": name, "namespace": spec.namespace})
        else:
            cutoff = reporter.last_log_time
            await reporter.log(f"trainer re-attached to Job {spec.namespace}/{name}")
        lines: asyncio.Queue = asyncio.Queue()
        followed: dict[str, threading.Thread] = {}
        loop = asyncio.get_running_loop()
        self._streams[spec.job_id] = []
        last_note = ""
        try:
            while True:
                try:
                    k8s_job = await self._call("read job", batch.read_namespaced_job, name, spec.namespace)
                except ApiException as exc:  # 404: deleted (cancelled here, or by someone else)
                    await self._pump(lines, reporter, cutoff)
                    if spec.job_id in self._cancelled:
                        return RunResult(trainer_pb2.JOB_STATE_CANCELLED, -1, "cancelled: Kubernetes Job deleted")
                    return RunResult(trainer_pb2.JOB_STATE_FAILED, -1,
                                     f"Kubernetes Job {name} disappeared ({exc.status} {exc.reason})")
                except UnavailableError as exc:
                    await reporter.note(f"waiting for the Kubernetes API: {exc}")
                    await asyncio.sleep(self.settings.poll_seconds)
                    continue
                note = await self._follow_pods(core, spec, name, followed, lines, loop)
                if note and note != last_note:
                    await reporter.note(note)
                    last_note = note
                await self._pump(lines, reporter, cutoff)
                result = self._result(k8s_job)
                if result is not None:
                    # Let the log followers reach the end of the pods' logs (bounded).
                    deadline = time.monotonic() + 10.0
                    await self._follow_pods(core, spec, name, followed, lines, loop)
                    while any(t.is_alive() for t in followed.values()) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    await self._pump(lines, reporter, cutoff)
                    return result
                await asyncio.sleep(self.settings.poll_seconds)
        finally:
            for response in self._streams.pop(spec.job_id, []):
                with contextlib.suppress(Exception):  # already closed
                    response.release_conn()

    def _result(self, k8s_job) -> RunResult | None:
        status = k8s_job.status
        if status is None:
            return None
        for condition in status.conditions or []:
            if condition.status != "True":
                continue
            if condition.type == "Complete":
                return RunResult(trainer_pb2.JOB_STATE_SUCCEEDED, 0, "Kubernetes Job complete")
            if condition.type == "Failed":
                return RunResult(trainer_pb2.JOB_STATE_FAILED, 1,
                                 f"Kubernetes Job failed: {condition.reason or ''} {condition.message or ''}".strip())
        completions = (k8s_job.spec.completions if k8s_job.spec and k8s_job.spec.completions else 1)
        if (status.succeeded or 0) >= completions and not (status.active or 0):
            return RunResult(trainer_pb2.JOB_STATE_SUCCEEDED, 0, "Kubernetes Job succeeded")
        backoff = k8s_job.spec.backoff_limit if k8s_job.spec and k8s_job.spec.backoff_limit is not None else 6
        if (status.failed or 0) > backoff and not (status.active or 0):
            return RunResult(trainer_pb2.JOB_STATE_FAILED, 1, f"Kubernetes Job failed {status.failed} time(s)")
        return None

    async def _follow_pods(self, core, spec, name, followed, lines, loop) -> str:
        """Starts a log follower for every pod of the Job that has started; returns a note on stuck pods."""
        try:
            pods = await self._call("list pods", core.list_namespaced_pod, spec.namespace,
                                    label_selector=f"app.kubernetes.io/instance={name}")
        except Exception:  # noqa: BLE001 - logs are best effort; status polling goes on
            return ""
        note = ""
        for pod in pods.items or []:
            pod_name = pod.metadata.name
            phase = pod.status.phase if pod.status else None
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                if waiting and waiting.reason in _STUCK_REASONS:
                    note = f"pod {pod_name}: {waiting.reason}: {waiting.message or ''}".strip()
            if pod_name in followed or phase not in ("Running", "Succeeded", "Failed"):
                continue
            thread = threading.Thread(target=self._follow_log, name=f"log-{pod_name}", daemon=True,
                                      args=(core, spec.job_id, spec.namespace, pod_name, lines, loop))
            followed[pod_name] = thread
            thread.start()
        return note

    def _follow_log(self, core, job_id: str, namespace: str, pod: str, lines: asyncio.Queue,
                    loop: asyncio.AbstractEventLoop) -> None:
        """Thread: streams one pod's log (follow, timestamps) into the event loop's queue."""
        try:
            response = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                                    timestamps=True, _preload_content=False)
        except Exception as exc:  # noqa: BLE001
            loop.call_soon_threadsafe(lines.put_nowait, (time.time(), f"[{pod}] cannot read log: {exc}"))
            return
        self._streams.setdefault(job_id, []).append(response)
        pending = b""
        # A closed stream (service stop) or a vanished pod ends the loop; logs are best effort.
        with contextlib.suppress(Exception):
            for chunk in response.stream(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    text = raw.decode("utf-8", errors="replace")
                    at, text = _parse_log_line(text)
                    # A progress bar redraws itself with carriage returns: keep its latest state.
                    text = text.rstrip("\r").rsplit("\r", 1)[-1].strip()
                    if text:
                        loop.call_soon_threadsafe(lines.put_nowait, (at, text))
            if pending.strip():
                loop.call_soon_threadsafe(lines.put_nowait, _parse_log_line(pending.decode("utf-8", "replace")))

    async def _pump(self, lines: asyncio.Queue, reporter: JobReporter, cutoff: float) -> None:
        while not lines.empty():
            at, text = lines.get_nowait()
            if cutoff and at <= cutoff:
                continue  # stored before the service restarted
            await reporter.log(text, at)
            if values := metrics_from_json(text) or metrics_from_progress(text):
                await reporter.metrics(values)

    async def cancel(self, job: trainer_pb2.Job) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        batch, _ = self._api()
        name = job.handle or job_name(job.spec.job_id)
        self._cancelled.add(job.spec.job_id)
        try:
            await self._call("delete job", batch.delete_namespaced_job, name, job.spec.namespace,
                             propagation_policy="Background",
                             body=client.V1DeleteOptions(propagation_policy="Background"))
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("job.k8s_deleted", extra={"job_id": job.spec.job_id, "k8s_job": name})

    async def close(self) -> None:
        for responses in self._streams.values():
            for response in responses:
                with contextlib.suppress(Exception):
                    response.release_conn()
