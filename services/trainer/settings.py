"""Settings of the trainer service (``STABLEALIGN_<FIELD>`` environment variables, CLI flags win).

The trainer only schedules and watches jobs; the training itself runs in another process (the
``local`` runner) or in a Kubernetes Job on the GPU pool (the ``kubernetes`` runner). These
settings choose the default runner, bound how many jobs run at once, and say where the cluster,
the image and the Job template are.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stablealign.core.config import env_name
from stablealign.serving.settings import ServiceSettings

RunnerName = Literal["local", "kubernetes"]
RUNNERS: tuple[str, ...] = typing.get_args(RunnerName)


def default_job_template() -> str:
    """The template in the repository (``deploy/k8s/trainer-job/job-template.yaml``), if there is one.

    In a container the image sets ``STABLEALIGN_K8S_JOB_TEMPLATE`` to its copy (or to the
    ConfigMap that kustomize mounts), so this default only matters in a source checkout.
    """
    path = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "trainer-job" / "job-template.yaml"
    return str(path)


class TrainerSettings(ServiceSettings):
    """What the trainer service needs beyond every service's settings."""

    runner: RunnerName = Field("local", description="Runner used when a JobSpec leaves `runner` empty: "
                                                    "local | kubernetes.")
    runners: tuple[RunnerName, ...] = Field(RUNNERS, description=(
        "Runners this process accepts, comma-separated (a trainer without cluster access only runs local jobs)."))
    max_parallel_jobs: int = Field(1, ge=1, description=(
        "Local jobs running at once (each is a whole training process: usually 1 per machine)."))
    max_parallel_k8s_jobs: int = Field(16, ge=1, description=(
        "Kubernetes jobs watched at once (the cluster schedules them; this only bounds our watchers)."))
    work_dir: str = Field("runs/trainer", description="Local runner: the parent of job output directories "
                                                      "(<work_dir>/<job_id>) unless trainer_output_root is set.")
    python: str = Field("", description="Local runner: Python interpreter for training processes "
                                        "(\"\" = the service's own).")
    cancel_grace_seconds: float = Field(10.0, ge=0, description=(
        "Seconds between SIGTERM and SIGKILL when a local job is cancelled or the service stops."))
    poll_seconds: float = Field(2.0, gt=0, description=(
        "Seconds between two looks at a job's progress (train_log.jsonl, Kubernetes Job status)."))
    # What a submitted job may name (services/trainer/inputs.py): checked at submit, INVALID_ARGUMENT otherwise.
    trainer_allowed_images: tuple[str, ...] = Field((), description=(
        "Images a Kubernetes job may name besides k8s_image (the trainer's own, always allowed), comma-separated; "
        "'repo:*' allows every tag of repo. Default: k8s_image only."))
    trainer_data_roots: tuple[str, ...] = Field(("runs", "data"), description=(
        "Local runner: directories a job's data file must be in (symlinks resolved; relative to the service's "
        "working directory; work_dir counts too)."))
    trainer_model_roots: tuple[str, ...] = Field(("models", "runs"), description=(
        "Local runner: directories a job's model must be in (work_dir counts too: a job's output may be the "
        "next job's model)."))
    trainer_output_root: str = Field("", description=(
        "Local runner: the parent of job output directories; each job writes to <root>/<job_id> (a job may only "
        "name a path inside it). Empty: work_dir. Kubernetes jobs write to /workspace/runs/<job_id>."))
    trainer_max_gpus: int = Field(8, ge=1, description=(
        "Most GPUs per node a job may ask for (torchrun --nproc_per_node; a Kubernetes pod's nvidia.com/gpu)."))
    k8s_allowed_namespaces: tuple[str, ...] = Field((), description=(
        "Namespaces a Kubernetes job may name besides k8s_namespace (always allowed), comma-separated. Default: "
        "k8s_namespace only (the training service account's Role is granted there)."))
    # Kubernetes runner.
    k8s_namespace: str = "stablealign"
    k8s_image: str = "stablealign-trainer:latest"
    k8s_job_template: str = Field(default_factory=default_job_template, description="The Job template (YAML).")
    k8s_pvc: str = Field("stablealign-training", description=(
        "PersistentVolumeClaim mounted at /workspace in training pods (data, models, checkpoints)."))
    k8s_service_account: str = "stablealign-training"
    k8s_backoff_limit: int = Field(2, ge=0, description=(
        "Retries of a Kubernetes job per node (pod failures that are not disruptions; each retry resumes from "
        "the last checkpoint). The Job's backoffLimit is this times the job's nodes."))
    k8s_ttl_seconds_after_finished: int = Field(86400, ge=0)
    k8s_active_deadline_seconds: int = Field(3 * 86400, ge=60, description=(
        "Wall-clock limit of a Kubernetes job, retries included (the Job's activeDeadlineSeconds): a hung "
        "NCCL collective or a crash loop gives the GPUs back after this."))
    k8s_cpu_per_gpu: int = Field(8, ge=1, description="CPU cores per GPU of a training pod (requests = limits).")
    k8s_memory_gib_base: int = Field(32, ge=1, description=(
        "Host memory (GiB) of a training pod besides the per-GPU part: rank 0's copy of the base model and /dev/shm "
        "(requests = limits)."))
    k8s_memory_gib_per_gpu: int = Field(16, ge=1, description=(
        "Host memory (GiB) per GPU of a training pod: one worker process each (CUDA, NCCL, the data)."))
    k8s_max_nodes: int = Field(8, ge=1, description="Most nodes a Kubernetes job may ask for (torchrun --nnodes).")
    k8s_rendezvous_port: int = Field(29500, ge=1024, le=65535, description=(
        "torchrun's rendezvous port on node 0 of a job on several nodes (--master_port)."))
    # How to reach the API server: an explicit URL (e.g. `kubectl proxy`, tests), a kubeconfig file,
    # or in-cluster credentials (the default inside a pod).
    k8s_api_url: str = ""
    k8s_kubeconfig: str = ""
    k8s_in_cluster: bool = False

    @model_validator(mode="after")
    def _runner_is_accepted(self) -> TrainerSettings:
        if self.runner not in self.runners:
            raise ValueError(f"{env_name('runner')}={self.runner!r}: must be one of {list(self.runners)} "
                             f"({env_name('runners')})")
        return self
