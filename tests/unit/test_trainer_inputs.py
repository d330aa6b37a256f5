"""What a training job may name: allowed images, paths that stay on the training volume, its own output
directory only, and the GPUs and namespaces the operator allows."""

from __future__ import annotations

import pytest

from services.trainer.inputs import image_allowed, job_output_dir
from services.trainer.runners.kubernetes import _pod_path
from stablealign.core.errors import ValidationError
from stablealign.v1 import trainer_pb2


def test_images_exact_or_any_tag_of_an_allowed_repository():
    allowed = ("ghcr.io/stable-align/trainer:0.1.0", "registry.example/sa/trainer:*")
    assert image_allowed("ghcr.io/stable-align/trainer:0.1.0", allowed)
    assert not image_allowed("ghcr.io/stable-align/trainer:0.1.1", allowed)
    assert image_allowed("registry.example/sa/trainer:cuda-12", allowed)
    assert image_allowed("registry.example/sa/trainer@sha256:" + "a" * 64, allowed)
    for image in ("registry.example/sa/trainer-evil:1", "registry.example/sa/trainer:", "registry.example/sa/trainer",
                  "registry.example/sa/trainer:x/../../evil", "docker.io/miner:latest"):
        assert not image_allowed(image, allowed), image


def test_pod_paths_stay_on_the_training_volume():
    assert _pod_path("data/groups.jsonl", "data") == "/workspace/data/groups.jsonl"
    assert _pod_path("/workspace/models/base", "model") == "/workspace/models/base"
    assert _pod_path("runs/a/../b", "output_dir") == "/workspace/runs/b"
    for path in ("../etc/passwd", "/etc/passwd", "/workspace/../root", "/workspace2/x", "runs/../../x"):
        with pytest.raises(ValidationError, match="is outside the allowed directories: /workspace"):
            _pod_path(path, "data")


def test_kubernetes_jobs_write_only_to_their_own_directory_in_the_allowed_namespaces():
    from services.trainer.runners.kubernetes import KubernetesRunner, job_pod_output_dir
    from services.trainer.settings import TrainerSettings

    assert job_pod_output_dir("", "job-1") == "/workspace/runs/job-1"
    assert job_pod_output_dir("final", "job-1") == "/workspace/runs/job-1/final"
    assert job_pod_output_dir("/workspace/runs/job-1/a/../b", "job-1") == "/workspace/runs/job-1/b"
    for path in ("/workspace/runs/job-2", "/workspace/runs/job-10", "../job-2", "/workspace/runs", "a/../../job-2"):
        with pytest.raises(ValidationError, match="outside the allowed directories: /workspace/runs/job-1"):
            job_pod_output_dir(path, "job-1")
    settings = TrainerSettings(k8s_namespace="train", k8s_allowed_namespaces=("train-b",), trainer_max_gpus=4,
                               k8s_image="img:1")
    runner = KubernetesRunner(settings)
    spec = trainer_pb2.JobSpec(job_id="j", runner="kubernetes", model="m", data="d.jsonl", gpus=4)
    assert runner.prepare(spec).namespace == "train"
    assert runner.prepare(_with(spec, namespace="train-b")).namespace == "train-b"
    with pytest.raises(ValidationError, match="namespace 'default' is not allowed"):
        runner.prepare(_with(spec, namespace="default"))
    with pytest.raises(ValidationError, match=r"gpus must be between 0 and 4 \(STABLEALIGN_TRAINER_MAX_GPUS\)"):
        runner.prepare(_with(spec, gpus=5))


def _with(spec: trainer_pb2.JobSpec, **fields) -> trainer_pb2.JobSpec:
    copy = trainer_pb2.JobSpec.FromString(spec.SerializeToString())
    for key, value in fields.items():
        setattr(copy, key, value)
    return copy


def test_local_jobs_write_only_to_their_own_directory(tmp_path):
    root = tmp_path / "jobs"
    root.mkdir()
    own = root.resolve() / "job-1"
    assert job_output_dir("", "job-1", root) == own
    assert job_output_dir("final", "job-1", root) == own / "final"
    assert job_output_dir(str(own / "x"), "job-1", root) == own / "x"  # a prepared spec, prepared again
    (root / "job-2").mkdir()
    (root / "job-3").symlink_to(root / "job-2")  # a job directory that is a link to another job's
    for requested, job_id in ((str(root / "job-2"), "job-1"), ("../job-2", "job-1"), (str(tmp_path), "job-1"),
                              ("", "job-3"), ("x", "job-3")):
        with pytest.raises(ValidationError, match="^output_dir .*outside the allowed directories"):
            job_output_dir(requested, job_id, root)
    for job_id in ("", "..", "a/b"):
        with pytest.raises(ValidationError, match="job_id"):
            job_output_dir("", job_id, root)
