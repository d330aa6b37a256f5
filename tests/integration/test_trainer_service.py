"""The trainer service end to end: real nats-server, the service in-process, real training processes.

Jobs go in over gRPC and over NATS, run a real (tiny) Stable Alignment training with the local
runner, and come back SUCCEEDED with their log and metrics; bad specs and unknown jobs get clear
statuses; a running job can be cancelled; a restarted service still knows every job and fails the
local jobs whose process died with the previous one.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.trainer import client as trainer_client
from services.trainer.jobs import JobStore
from stablealign.core.config import load_settings
from stablealign.core.errors import NotFoundError, ValidationError
from stablealign.serving.service import RunningService, start_service
from stablealign.v1 import trainer_pb2, trainer_pb2_grpc

FINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)
STABLE_ALIGN = str(Path(sys.executable).parent / "stable-align")


async def start_trainer(nats_url: str, work_dir: Path, **overrides) -> RunningService:
    from services.trainer import main

    # The test's files (and the module's tiny model) live under pytest's base temp directory: the roots.
    base = str(work_dir.parent.parent)
    settings = load_settings(main.SETTINGS, {
        "nats_url": nats_url, "grpc_port": 0, "metrics_port": -1, "instance": "test-trainer",
        "work_dir": str(work_dir), "poll_seconds": 0.2, "cancel_grace_seconds": 5.0, "runners": ("local",),
        "shutdown_grace_seconds": 5.0, "trainer_data_roots": (base,), "trainer_model_roots": (base,),
        **overrides,
    }, environ={})
    return await start_service("trainer", settings, main.build)


def write_groups(path: Path, n: int = 8) -> Path:
    """Alignment groups in the original's format: {"query", "responses", "scores"}."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"query": f"My neighbour {i} is noisy at night. What should I do?",
                                 "responses": ["Talk to them politely and agree on quiet hours.",
                                               "Play louder music to teach them a lesson.",
                                               "Call them names."],
                                 "scores": [7, 2, 1]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    proc = subprocess.run([STABLE_ALIGN, "model", "init-tiny", "--out", str(out)], check=False, capture_output=True, text=True,
                          timeout=180)
    if proc.returncode != 0:
        pytest.skip(f"`stable-align model init-tiny` is not available: {proc.stderr[-500:]}")
    return out


async def wait_for(stub, job_id: str, states=FINAL, timeout: float = 120.0) -> trainer_pb2.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
        if job.state in states:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout}s (last: {job})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def test_bad_specs_and_unknown_jobs(nats_url, tmp_path):
    service = await start_trainer(nats_url, tmp_path / "work")
    model = tmp_path / "model"
    model.mkdir()
    data = write_groups(tmp_path / "data.jsonl")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            bad = {
                "unknown runner": trainer_pb2.JobSpec(runner="slurm", model=str(model), data=str(data)),
                "missing model": trainer_pb2.JobSpec(model=str(tmp_path / "nope"), data=str(data)),
                "missing data": trainer_pb2.JobSpec(model=str(model), data=str(tmp_path / "nope.jsonl")),
                "unknown arg": trainer_pb2.JobSpec(model=str(model), data=str(data), args={"rm_rf": "/"}),
                "bad value": trainer_pb2.JobSpec(model=str(model), data=str(data), args={"max_steps": "two"}),
                "bad id": trainer_pb2.JobSpec(job_id="a b/c", model=str(model), data=str(data)),
            }
            for what, spec in bad.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "does not exist" in str(await _code_of(stub, bad["missing model"]))
            for call in (stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-unknown")),
                         stub.CancelJob(trainer_pb2.CancelJobRequest(job_id="job-unknown"))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.StreamLogs(trainer_pb2.StreamLogsRequest(job_id="job-unknown")):
                    pass
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await stub.ListJobs(trainer_pb2.ListJobsRequest())).jobs == []
        # The same errors over NATS, as typed exceptions.
        with pytest.raises(ValidationError, match="unknown training argument"):
            await trainer_client.submit_job(nats_url, bad["unknown arg"])
        with pytest.raises(NotFoundError):
            await trainer_client.get_job(nats_url, "job-unknown")
    finally:
        await service.stop(grace=2)


async def _code_of(stub, spec) -> str:
    try:
        await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    except grpc.aio.AioRpcError as err:
        return err.details()
    return ""


@pytest.mark.slow
async def test_jobs_train_cancel_and_survive_a_restart(nats_url, tmp_path, tiny_model):
    data = write_groups(tmp_path / "data.jsonl")
    args = {"max_steps": "2", "batch_size": "2", "grad_accum": "1", "save_steps": "0"}
    service = await start_trainer(nats_url, tmp_path / "work")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            # 1. A real tiny training over gRPC.
            job = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=trainer_pb2.JobSpec(
                model=str(tiny_model), data=str(data), args=args)))
            assert job.state == trainer_pb2.JOB_STATE_QUEUED and job.spec.runner == "local"
            grpc_id = job.spec.job_id
            # A follower that starts now sees the whole log and ends with the job.
            lines = [line.line async for line in stub.StreamLogs(
                trainer_pb2.StreamLogsRequest(job_id=grpc_id, follow=True), timeout=150)]
            done = await wait_for(stub, grpc_id, timeout=10)
            assert done.state == trainer_pb2.JOB_STATE_SUCCEEDED, (done.message, lines[-20:])
            assert done.exit_code == 0 and done.started_at >= done.created_at and done.finished_at >= done.started_at
            assert done.metrics["step"] == 2 and done.metrics["loss"] > 0 and "loss/sft" in done.metrics
            assert "tokens_per_second" in done.metrics
            assert any("stablealign.training.train" in line for line in lines)
            assert any("trained 2 steps" in line for line in lines)
            assert "succeeded" in lines[-1]
            assert (Path(done.spec.output_dir) / "train_log.jsonl").is_file()
            replay = [line.line async for line in stub.StreamLogs(trainer_pb2.StreamLogsRequest(job_id=grpc_id))]
            assert replay == lines

            # 2. The same over NATS (what `stable-align train --submit` and `jobs submit` use).
            nats_job = await trainer_client.submit_job(nats_url, trainer_pb2.JobSpec(
                model=str(tiny_model), data=str(data), output_dir="nats-out", args=args))
            # Inside the job's own directory under the output root (work_dir here), whatever it asked for.
            assert nats_job.spec.job_id and nats_job.spec.output_dir == str(
                (tmp_path / "work").resolve() / nats_job.spec.job_id / "nats-out")
            again = await trainer_client.submit_job(nats_url, nats_job.spec)  # a retried request
            assert again.spec.job_id == nats_job.spec.job_id
            done = await wait_for(stub, nats_job.spec.job_id)
            assert done.state == trainer_pb2.JOB_STATE_SUCCEEDED, done.message

            # 3. Cancel a long job while it runs: SIGTERM reaches the training process.
            long = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=trainer_pb2.JobSpec(
                model=str(tiny_model), data=str(data), args={"max_steps": "100000", "save_steps": "0"})))
            running = await wait_for(stub, long.spec.job_id, states=(trainer_pb2.JOB_STATE_RUNNING,), timeout=30)
            for _ in range(100):
                if running.handle:
                    break
                await asyncio.sleep(0.1)
                running = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=long.spec.job_id))
            pid = int(running.handle)
            cancelled = await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=long.spec.job_id), timeout=60)
            assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
            assert not pid_alive(pid)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=long.spec.job_id))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # Submitted again (same id, same spec), a cancelled job runs again in its own directory.
            again = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=long.spec))
            assert again.state == trainer_pb2.JOB_STATE_QUEUED and again.spec == long.spec
            assert "resubmitted" in again.message
            await wait_for(stub, long.spec.job_id, states=(trainer_pb2.JOB_STATE_RUNNING,), timeout=30)
            cancelled = await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=long.spec.job_id), timeout=60)
            assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
            # A succeeded job submitted again is only the retried request: it stays as it was.
            assert (await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=done.spec))).state == \
                trainer_pb2.JOB_STATE_SUCCEEDED
            before = {j.spec.job_id: j.state for j in (await stub.ListJobs(trainer_pb2.ListJobsRequest())).jobs}

        # 4. A job left RUNNING by a crashed service (its process is gone), then a restart.
        store = await JobStore.open(service.context.js)
        dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await dead.wait()
        orphan = trainer_pb2.Job(spec=trainer_pb2.JobSpec(job_id="job-orphan", runner="local", model=str(tiny_model),
                                                          data=str(data)),
                                 state=trainer_pb2.JOB_STATE_RUNNING, created_at=time.time(), handle=str(dead.pid))
        await store.create(orphan)
    finally:
        await service.stop(grace=5)

    service = await start_trainer(nats_url, tmp_path / "work")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            failed = await wait_for(stub, "job-orphan", timeout=20)
            assert failed.state == trainer_pb2.JOB_STATE_FAILED and "trainer restarted" in failed.message
            after = {j.spec.job_id: j.state for j in (await stub.ListJobs(trainer_pb2.ListJobsRequest())).jobs}
        assert {k: after[k] for k in before} == before
        assert len(after) == len(before) + 1
        assert {j.spec.job_id for j in await trainer_client.list_jobs(nats_url)} == set(after)
    finally:
        await service.stop(grace=5)


async def test_job_inputs_are_confined_to_the_roots_and_images_to_the_allow_list(nats_url, tmp_path):
    """Issue 10.5: a job's paths stay inside the configured roots and its image on the allow-list, over gRPC
    and NATS alike; each refusal is INVALID_ARGUMENT naming the field."""
    allowed = tmp_path / "allowed"
    (allowed / "model").mkdir(parents=True)
    data = write_groups(allowed / "data.jsonl")
    outside = write_groups(tmp_path / "outside.jsonl")
    (allowed / "link.jsonl").symlink_to(outside)  # inside a root, pointing out of it
    (allowed / "model-link").symlink_to("/etc")
    service = await start_trainer(nats_url, allowed / "work", trainer_data_roots=(str(allowed),),
                                  trainer_model_roots=(str(allowed),), trainer_output_root=str(allowed / "out"),
                                  k8s_image="registry.example/stablealign-trainer:1.0",
                                  trainer_allowed_images=("registry.example/stablealign-trainer-cuda:*",))
    model = str(allowed / "model")
    try:
        refused = {
            "data": trainer_pb2.JobSpec(model=model, data=str(outside)),
            "data ..": trainer_pb2.JobSpec(model=model, data=str(allowed / ".." / "outside.jsonl")),
            "data symlink": trainer_pb2.JobSpec(model=model, data=str(allowed / "link.jsonl")),
            "data elsewhere": trainer_pb2.JobSpec(model=model, data="/etc/passwd"),
            "model symlink": trainer_pb2.JobSpec(model=str(allowed / "model-link"), data=str(data)),
            "output_dir": trainer_pb2.JobSpec(model=model, data=str(data), output_dir=str(tmp_path / "elsewhere")),
            "output_dir ..": trainer_pb2.JobSpec(model=model, data=str(data), output_dir=str(allowed / "out/../..")),
            # Another job's directory under the same root: its checkpoints are not this job's to resume.
            "output_dir of another job": trainer_pb2.JobSpec(model=model, data=str(data),
                                                             output_dir=str(allowed / "out" / "job-victim")),
            "output_dir root": trainer_pb2.JobSpec(model=model, data=str(data), output_dir=str(allowed / "out")),
            "image": trainer_pb2.JobSpec(model=model, data=str(data), image="docker.io/someone/miner:latest"),
            "image repo": trainer_pb2.JobSpec(model=model, data=str(data),
                                              image="registry.example/stablealign-trainer-cuda-evil:1"),
        }
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            for what, spec in refused.items():
                field = what.split()[0]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
                assert err.value.details().startswith(field), (what, err.value.details())
                phrase = "not an allowed training image" if field == "image" else "outside the allowed directories"
                assert phrase in err.value.details(), (what, err.value.details())
                with pytest.raises(ValidationError, match=f"^{field}"):  # the same answer over NATS
                    await trainer_client.submit_job(nats_url, spec)
            # Inside the roots, with the trainer's own image or an allowed repository's tag: queued.
            for image in ("", "registry.example/stablealign-trainer:1.0", "registry.example/stablealign-trainer-cuda:2"):
                job = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=trainer_pb2.JobSpec(
                    model=model, data=str(data), output_dir="a", image=image, args={"max_steps": "1"})))
                assert job.spec.data == str(data.resolve())
                assert job.spec.output_dir == str(allowed.resolve() / "out" / job.spec.job_id / "a")
                await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.spec.job_id))
        assert await trainer_client.list_jobs(nats_url)  # the refused ones never became jobs
        assert len(await trainer_client.list_jobs(nats_url)) == 3
    finally:
        await service.stop(grace=2)


async def test_job_entries_and_log_lines_that_do_not_parse_are_skipped(nc, caplog):
    """What a misdirected write left in the jobs bucket or the log stream does not break listing or logs."""
    from stablealign.core.errors import UnavailableError
    from stablealign.nats import subjects

    store = await JobStore.open(nc.jetstream())
    good = trainer_pb2.Job(spec=trainer_pb2.JobSpec(job_id="job-good"), state=trainer_pb2.JOB_STATE_QUEUED,
                           created_at=1.0)
    await store.create(good)
    await store.kv.put("job-json", b'{"type": "io.nats.micro.v1.ping_response"}')
    await store.kv.put("job-copy", good.SerializeToString())  # a Job, but of another id
    assert [j.spec.job_id for j in await store.list()] == ["job-good"]
    (said,) = [r for r in caplog.records if r.getMessage() == "trainer.entries_skipped"]
    assert said.skipped == 2
    with pytest.raises(UnavailableError, match="not a job"):
        await store.get("job-json")
    await store.append_log("job-good", "first")
    await nc.jetstream().publish(subjects.JOB_LOGS_SUBJECT.format(job_id="job-good"), b"\xff\xff\xff")
    await store.append_log("job-good", "second")
    assert [line.line for _, line in await store.read_logs("job-good")] == ["first", "second"]
