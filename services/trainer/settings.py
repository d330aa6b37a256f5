"""Settings of the trainer service (``STABLEALIGN_<FIELD>`` environment variables, CLI flags win).

The trainer only schedules and watches jobs; the training itself runs in another process (the
``local`` runner) or in a Kubernetes Job on the GPU pool (the ``kubernetes`` runner). These
settings choose the default runner, bound how many jobs run at once, and say where the cluster,
the image and the Job template are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stablealign.config import ServiceSettings, env_name
from stablealign.errors import ConfigError

RUNNERS = ("local", "kubernetes")


def default_job_template() -> str:
    """The template in the repository (``deploy/k8s/trainer-job/job-template.yaml``), if there is one.

    In a container the image sets ``STABLEALIGN_K8S_JOB_TEMPLATE`` to its copy (or to the
    ConfigMap that kustomize mounts), so this default only matters in a source checkout.
    """
    path = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "trainer-job" / "job-template.yaml"
    return str(path)


@dataclasses.dataclass(frozen=True)
class TrainerSettings(ServiceSettings):
    """What the trainer service needs beyond every service's settings."""

    # Runner used when a JobSpec leaves `runner` empty: local | kubernetes.
    runner: str = "local"
    # Runners this process accepts (a trainer without cluster access only runs local jobs).
    runners: tuple[str, ...] = RUNNERS
    # Local jobs running at once (each is a whole training process: usually 1 per machine).
    max_parallel_jobs: int = 1
    # Kubernetes jobs watched at once (the cluster schedules them; this only bounds our watchers).
    max_parallel_k8s_jobs: int = 16
    # Local runner: default parent of job output directories (<work_dir>/<job_id>).
    work_dir: str = "runs/trainer"
    # Local runner: Python interpreter for training processes ("" = the service's own).
    python: str = ""
    # Seconds between SIGTERM and SIGKILL when a local job is cancelled or the service stops.
    cancel_grace_seconds: float = 10.0
    # Seconds between two looks at a job's progress (train_log.jsonl, Kubernetes Job status).
    poll_seconds: float = 2.0
    # Kubernetes runner.
    k8s_namespace: str = "stablealign"
    k8s_image: str = "stablealign-trainer:latest"
    k8s_job_template: str = dataclasses.field(default_factory=default_job_template)
    # PersistentVolumeClaim mounted at /workspace in training pods (data, models, checkpoints).
    k8s_pvc: str = "stablealign-training"
    k8s_service_account: str = "stablealign-training"
    k8s_backoff_limit: int = 2
    k8s_ttl_seconds_after_finished: int = 86400
    # How to reach the API server: an explicit URL (e.g. `kubectl proxy`, tests), a kubeconfig file,
    # or in-cluster credentials (the default inside a pod).
    k8s_api_url: str = ""
    k8s_kubeconfig: str = ""
    k8s_in_cluster: bool = False

    def validate(self) -> None:
        super().validate()
        unknown = [r for r in self.runners if r not in RUNNERS]
        if unknown:
            raise ConfigError(f"{env_name('runners')}: unknown runner(s) {unknown}; valid: {list(RUNNERS)}")
        if self.runner not in self.runners:
            raise ConfigError(f"{env_name('runner')}={self.runner!r}: must be one of {list(self.runners)}")
        if self.max_parallel_jobs < 1:
            raise ConfigError(f"{env_name('max_parallel_jobs')} must be >= 1")
        if self.max_parallel_k8s_jobs < 1:
            raise ConfigError(f"{env_name('max_parallel_k8s_jobs')} must be >= 1")
        if self.cancel_grace_seconds < 0 or self.poll_seconds <= 0:
            raise ConfigError(f"{env_name('cancel_grace_seconds')} must be >= 0 and "
                              f"{env_name('poll_seconds')} > 0")
        if self.k8s_backoff_limit < 0 or self.k8s_ttl_seconds_after_finished < 0:
            raise ConfigError(f"{env_name('k8s_backoff_limit')} and {env_name('k8s_ttl_seconds_after_finished')} "
                              "must be >= 0")
