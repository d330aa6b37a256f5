"""The Kubernetes runner: the Job it renders, and the API calls it makes against a recording server.

The server is a real aiohttp HTTP server on 127.0.0.1 that implements the few Kubernetes API
endpoints the runner uses (create/read/delete a batch Job, list pods, read a pod's log), answers
from a script, and records every call; the runner talks to it through the official client.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import kubernetes_validate
import pytest
from aiohttp import web

from services.trainer.runners.kubernetes import KubernetesRunner, job_name, render_job
from services.trainer.settings import TrainerSettings
from stablealign.core.errors import ValidationError
from stablealign.v1 import trainer_pb2

NS = "stablealign"
SCHEMA_VERSION = kubernetes_validate.latest_version()


def _settings(**overrides) -> TrainerSettings:
    return TrainerSettings(k8s_namespace=NS, k8s_image="registry.example/stablealign-trainer:1.2.3",
                           poll_seconds=0.05, **overrides)


def _spec(**fields) -> trainer_pb2.JobSpec:
    base = {"job_id": "Job_42", "runner": "kubernetes", "model": "models/base", "data": "data/train.jsonl", "gpus": 8,
                "args": {"lr": "2e-5", "max_steps": "100", "bf16": "true"}}
    base.update(fields)
    return trainer_pb2.JobSpec(**base)


def test_render_gpu_job_is_valid_and_uses_torchrun_fsdp():
    runner = KubernetesRunner(_settings())
    spec = runner.prepare(_spec())
    manifest = render_job(spec, runner.settings)
    kubernetes_validate.validate(manifest, SCHEMA_VERSION, strict=True)
    assert manifest["metadata"]["name"] == job_name("Job_42")
    assert manifest["metadata"]["namespace"] == NS
    assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stable-align"
    assert manifest["spec"]["backoffLimit"] == 2 and manifest["spec"]["ttlSecondsAfterFinished"] == 86400
    assert manifest["spec"]["activeDeadlineSeconds"] == 3 * 86400
    pod = manifest["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "trainer"]
    assert container["image"] == "registry.example/stablealign-trainer:1.2.3"
    # Guaranteed QoS: requests equal limits for CPU, memory and GPUs (8 CPU + 16 GiB per GPU, 32 GiB base).
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "64", "memory": "160Gi", "nvidia.com/gpu": "8"}
    cmd = container["command"]
    # The launcher checks the configuration (exit 2) before it becomes torchrun over the node's GPUs.
    assert cmd[:5] == ["python", "-m", "stablealign.training.launch", "--nnodes=1", "--nproc_per_node=8"]
    assert cmd[5] == "--" and "--node_rank=$(JOB_COMPLETION_INDEX)" not in cmd
    assert cmd[cmd.index("--fsdp") + 1] == "full_shard"
    assert cmd[cmd.index("--model") + 1] == "/workspace/models/base"
    assert cmd[cmd.index("--lr") + 1] == "2e-5" and "--bf16" in cmd
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["stablealign-training"]
    # One GPU: no FSDP unless asked for; a job's own FSDP choice wins.
    one = render_job(runner.prepare(_spec(gpus=1)), runner.settings)
    assert "--fsdp" not in one["spec"]["template"]["spec"]["containers"][0]["command"]
    mine = render_job(runner.prepare(_spec(args={"fsdp": "shard_grad_op"})), runner.settings)
    cmd = mine["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--fsdp") + 1] == "shard_grad_op"


def test_job_survives_disruptions_fails_fast_on_bad_config_and_resumes_on_retry():
    """A preempted or drained pod does not use up a retry; exit code 2 (the launcher's "this configuration
    cannot run") fails the Job at once; any other failure is retried and the retried pod resumes from the last
    checkpoint in the job's output directory."""
    from stablealign.training.launch import EXIT_CONFIG_ERROR

    runner = KubernetesRunner(_settings(k8s_active_deadline_seconds=7200, k8s_backoff_limit=3))
    spec = runner.prepare(_spec(output_dir="sa-7b"))
    manifest = render_job(spec, runner.settings)
    job = manifest["spec"]
    assert job["activeDeadlineSeconds"] == 7200 and job["backoffLimit"] == 3
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires
    ignore, fail = job["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [EXIT_CONFIG_ERROR]}
    cmd = job["template"]["spec"]["containers"][0]["command"]
    train = cmd[cmd.index("--") + 1:]
    assert train[train.index("--out") + 1] == "/workspace/runs/Job_42/sa-7b" and "--resume" in train
    # The retried pod mounts the same volume: `--resume` continues from <out>/checkpoints/step-N (the resume
    # itself, to the same weights as an unbroken run, is tests/integration/test_training.py's).
    (mount,) = [m for m in job["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "workspace"]
    assert mount["mountPath"] == "/workspace"
    with pytest.raises(ValidationError, match="always resumes"):
        runner.prepare(_spec(args={"resume": "false"}))


def test_multi_node_is_an_indexed_job_with_a_headless_service_for_the_rendezvous():
    from services.trainer.runners.kubernetes import render_objects

    runner = KubernetesRunner(_settings())
    spec = runner.prepare(_spec(job_id="big", nodes=4, gpus=8))
    job, service = render_objects(spec, runner.settings)
    for manifest in (job, service):
        kubernetes_validate.validate(manifest, SCHEMA_VERSION, strict=True)
    name = job_name("big")
    assert job["metadata"]["name"] == service["metadata"]["name"] == name
    spec_ = job["spec"]
    assert spec_["completionMode"] == "Indexed" and spec_["completions"] == spec_["parallelism"] == 4
    assert spec_["backoffLimit"] == 2 * 4  # one failed node fails the other nodes' torchrun too
    pod = spec_["template"]
    # The headless Service selects exactly this Job's pods and gives them <pod hostname>.<subdomain> names.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == NS
    cmd = pod["spec"]["containers"][0]["command"]
    options = dict(o.lstrip("-").split("=", 1) for o in cmd[3:cmd.index("--")])
    # World size: nodes x processes per node; rank of the node = the pod's completion index.
    assert int(options["nnodes"]) * int(options["nproc_per_node"]) == 32
    assert options["node_rank"] == "$(JOB_COMPLETION_INDEX)" and options["rdzv_backend"] == "static"
    # The master is pod 0: an Indexed Job's pod i has the hostname <job>-<i>, resolvable under the subdomain.
    assert options["master_addr"] == f"{name}-0.{pod['spec']['subdomain']}"
    assert len(f"{name}-3") <= 63  # a valid hostname for the last pod
    port = int(options["master_port"])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["rendezvous"] == port
    train = cmd[cmd.index("--") + 1:]
    assert train[train.index("--fsdp") + 1] == "full_shard"
    # One node needs no Service; too many nodes are refused.
    assert len(render_objects(runner.prepare(_spec(nodes=1)), runner.settings)) == 1
    with pytest.raises(ValidationError, match="nodes must be between 1 and 8"):
        runner.prepare(_spec(nodes=9))


@pytest.mark.parametrize("bad, match", [
    ({"args": {"rm_rf": "1"}}, "unknown training argument"),
    ({"args": {"lr": "fast"}}, "expected a number"),
    ({"nodes": 99}, "nodes must be"),
    ({"model": ""}, "model is required"),
    ({"namespace": "Not_A_Namespace"}, "namespace"),
    ({"namespace": "kube-system"}, "namespace 'kube-system' is not allowed"),
    ({"gpus": 9}, "gpus must be between 0 and 8"),
    ({"gpus": -1}, "gpus must be between 0 and 8"),
    ({"output_dir": "/workspace/runs/other-job"}, "output_dir .* is outside the allowed directories: "
                                                  "/workspace/runs/Job_42"),
    ({"output_dir": "../other-job"}, "outside the allowed directories"),
])
def test_bad_specs_are_rejected(bad, match):
    with pytest.raises(ValidationError, match=match):
        KubernetesRunner(_settings()).prepare(_spec(**bad))


@dataclass
class FakeApiServer:
    """Answers like the API server for one Job; ``statuses`` are the Job's successive status blocks."""

    statuses: list[dict]
    calls: list[tuple[str, str, dict, object]] = field(default_factory=list)
    created: dict | None = None
    reads: int = 0
    deleted: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/apis/batch/v1/namespaces/{ns}/jobs", self.create)
        app.router.add_get("/apis/batch/v1/namespaces/{ns}/jobs/{name}", self.read)
        app.router.add_delete("/apis/batch/v1/namespaces/{ns}/jobs/{name}", self.delete)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods)
        app.router.add_post("/api/v1/namespaces/{ns}/services", self.create_service)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/log", self.log)
        return app

    async def _record(self, request: web.Request) -> object:
        body = await request.text()
        parsed = json.loads(body) if body else None
        self.calls.append((request.method, request.path, dict(request.query), parsed))
        return parsed

    async def create(self, request):
        self.created = await self._record(request)
        self.created["metadata"]["uid"] = "0b5d3c1e-job-uid"
        return web.json_response(self.created, status=201)

    async def create_service(self, request):
        return web.json_response(await self._record(request), status=201)

    async def read(self, request):
        await self._record(request)
        if self.deleted or self.created is None:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404}, status=404)
        status = self.statuses[min(self.reads, len(self.statuses) - 1)]
        self.reads += 1
        return web.json_response({**self.created, "status": status})

    async def delete(self, request):
        await self._record(request)
        self.deleted = True
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    async def pods(self, request):
        await self._record(request)
        name = request.query.get("labelSelector", "").partition("=")[2]
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
            {"metadata": {"name": f"{name}-abcde", "namespace": request.match_info["ns"]},
             "status": {"phase": "Running"}}]})

    async def log(self, request):
        await self._record(request)
        return web.Response(text=(
            "2030-01-01T00:00:00.000000001Z starting torchrun\n"
            '2030-01-01T00:00:01.5Z {"step": 1, "loss": 2.5, "loss/sft": 2.0, "loss/penalty": 0.5}\n'
            "2030-01-01T00:00:01.7Z train:  50%|#   | 1/2 [00:01<00:01, 1.0it/s, loss=2.7]"
            "\rtrain: 100%|####| 2/2 [00:02<00:00, 1.0it/s, loss=2.25, tok_s=321]\n"
            "2030-01-01T00:00:02Z done\n"))


class _Reporter:
    """A JobReporter that keeps what it is told."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, float | None]] = []
        self.values: dict[str, float] = {}
        self.handles: list[str] = []
        self.notes: list[str] = []
        self.last_log_time = 0.0

    async def log(self, line, at=None):
        self.lines.append((line, at))

    async def metrics(self, values):
        self.values.update(values)

    async def handle(self, handle):
        self.handles.append(handle)

    async def note(self, message):
        self.notes.append(message)


async def _serve(api: FakeApiServer):
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def test_runner_creates_watches_and_streams_logs():
    api = FakeApiServer(statuses=[{"active": 1}, {"active": 1}, {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}])
    http, url = await _serve(api)
    try:
        runner = KubernetesRunner(_settings(k8s_api_url=url))
        spec = runner.prepare(_spec())
        job = trainer_pb2.Job(spec=spec, state=trainer_pb2.JOB_STATE_RUNNING)
        reporter = _Reporter()
        result = await asyncio.wait_for(runner.run(job, reporter), timeout=20)
        await runner.close()
    finally:
        await http.cleanup()
    assert result.state == trainer_pb2.JOB_STATE_SUCCEEDED
    method, path, _, body = api.calls[0]
    assert (method, path) == ("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")
    assert body == {**render_job(spec, runner.settings), "metadata": {**body["metadata"]}}
    assert not [p for m, p, _, _ in api.calls if p.endswith("/services")]  # one node: no Service
    name = job_name("Job_42")
    assert reporter.handles == [name]
    paths = [(m, p) for m, p, _, _ in api.calls]
    assert ("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}") in paths
    assert ("GET", f"/api/v1/namespaces/{NS}/pods") in paths
    log_calls = [q for m, p, q, _ in api.calls if p.endswith("/log")]
    assert log_calls and log_calls[0]["follow"] == "true" and log_calls[0]["container"] == "trainer"
    texts = [line for line, _ in reporter.lines]
    assert "starting torchrun" in texts and "done" in texts
    assert reporter.values["loss/penalty"] == 0.5  # a train_log.jsonl record in the log
    # The progress bar's last redraw: step, loss and tokens/s.
    assert reporter.values["step"] == 2 and reporter.values["loss"] == 2.25
    assert reporter.values["tokens_per_second"] == 321
    assert any(line.startswith("train: 100%") for line in texts) and not any("50%" in line for line in texts)
    # Log times come from the pod's timestamps, not from when we read them.
    times = {line: at for line, at in reporter.lines}
    assert times["done"] == pytest.approx(1893456002.0)


async def test_cancel_deletes_with_background_propagation():
    api = FakeApiServer(statuses=[{"active": 1}])
    http, url = await _serve(api)
    try:
        runner = KubernetesRunner(_settings(k8s_api_url=url))
        spec = runner.prepare(_spec(job_id="to-cancel"))
        job = trainer_pb2.Job(spec=spec, state=trainer_pb2.JOB_STATE_RUNNING)
        reporter = _Reporter()
        task = asyncio.create_task(runner.run(job, reporter))
        for _ in range(200):  # until the Job exists and has been read once
            if api.reads:
                break
            await asyncio.sleep(0.02)
        await runner.cancel(trainer_pb2.Job(spec=spec, handle=reporter.handles[0]))
        result = await asyncio.wait_for(task, timeout=20)
        await runner.close()
    finally:
        await http.cleanup()
    assert result.state == trainer_pb2.JOB_STATE_CANCELLED
    deletes = [(p, q, b) for m, p, q, b in api.calls if m == "DELETE"]
    assert len(deletes) == 1
    path, query, body = deletes[0]
    assert path == f"/apis/batch/v1/namespaces/{NS}/jobs/{job_name('to-cancel')}"
    assert query.get("propagationPolicy") == "Background"
    assert body["propagationPolicy"] == "Background"


async def test_failed_job_and_reattach_skip_old_lines():
    api = FakeApiServer(statuses=[{"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}])
    http, url = await _serve(api)
    try:
        runner = KubernetesRunner(_settings(k8s_api_url=url))
        spec = runner.prepare(_spec(job_id="again"))
        api.created = render_job(spec, runner.settings)  # the Job exists already (created before a restart)
        job = trainer_pb2.Job(spec=spec, state=trainer_pb2.JOB_STATE_RUNNING, handle=job_name("again"))
        reporter = _Reporter()
        reporter.last_log_time = 1893456001.0  # lines up to here were stored before the restart
        result = await asyncio.wait_for(runner.run(job, reporter, reattach=True), timeout=20)
        await runner.close()
    finally:
        await http.cleanup()
    assert result.state == trainer_pb2.JOB_STATE_FAILED and "BackoffLimitExceeded" in result.message
    assert not [c for c in api.calls if c[0] == "POST"]  # re-attached, not created again
    texts = [line for line, _ in reporter.lines]
    assert "starting torchrun" not in texts and "done" in texts


async def test_multi_node_job_gets_its_service_owned_by_the_job_and_waits_for_every_node():
    api = FakeApiServer(statuses=[{"active": 2}, {"active": 1, "succeeded": 1}, {"succeeded": 2, "conditions": [
        {"type": "Complete", "status": "True"}]}])
    http, url = await _serve(api)
    try:
        runner = KubernetesRunner(_settings(k8s_api_url=url))
        spec = runner.prepare(_spec(job_id="two-nodes", nodes=2))
        reporter = _Reporter()
        result = await asyncio.wait_for(runner.run(trainer_pb2.Job(spec=spec), reporter), timeout=20)
        await runner.close()
    finally:
        await http.cleanup()
    assert result.state == trainer_pb2.JOB_STATE_SUCCEEDED and api.reads == 3  # not done after one node
    posts = [(p, b) for m, p, _, b in api.calls if m == "POST"]
    assert [p for p, _ in posts] == [f"/apis/batch/v1/namespaces/{NS}/jobs", f"/api/v1/namespaces/{NS}/services"]
    service = posts[1][1]
    assert service["spec"]["clusterIP"] == "None"
    (owner,) = service["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "batch/v1", "kind": "Job", "name": job_name("two-nodes"),
                     "uid": "0b5d3c1e-job-uid", "controller": False, "blockOwnerDeletion": False}
    assert any("2 nodes x 8 GPU(s)" in line for line, _ in reporter.lines)
