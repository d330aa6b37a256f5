"""What a submitted training job may name: an allowed image, and paths inside the configured roots.

A job comes from anyone who can reach the trainer's gRPC port or publish on ``trainer.jobs.submit``;
without these checks a job could run any image on the GPU nodes (with the training service
account), read any file the trainer can read as its "data", or write its output over anything.
Both transports go through ``Scheduler.submit`` and the runners' ``prepare``, so both get the same
answer: INVALID_ARGUMENT naming the field.

- Images (``check_image``): the trainer's own image (``k8s_image``, which the overlays set to the
  image the trainer runs) and those in ``trainer_allowed_images`` (``repo:*``: any tag or digest
  of that repository).
- Local jobs (``local_paths``): paths on the trainer's machine, resolved (``..`` and symlinks followed)
  and required inside ``trainer_data_roots`` / ``trainer_model_roots`` / ``trainer_output_root``
  (``work_dir`` counts as a root of each: one job's output is the next one's model).
- Kubernetes jobs: paths inside the training pod, which mounts only the training volume at
  ``/workspace``; ``..`` may not leave it (``stablealign.confine.confined_pod_path``).
"""

from __future__ import annotations

from pathlib import Path

from services.trainer.settings import TrainerSettings
from stablealign.config import env_name
from stablealign.confine import confined_path
from stablealign.errors import ValidationError
from stablealign.v1 import trainer_pb2


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    """``image`` is one of ``allowed``, or ``repo:*`` allows it (``repo:tag`` or ``repo@sha256:...``)."""
    for entry in allowed:
        if entry.endswith(":*"):
            repo = entry[:-2]
            rest = image[len(repo):] if image.startswith(repo) else ""
            if rest[:1] in (":", "@") and len(rest) > 1 and "/" not in rest:
                return True
        elif image == entry:
            return True
    return False


def check_image(spec: trainer_pb2.JobSpec, settings: TrainerSettings) -> None:
    """ValidationError unless the job's image (if it names one) is allowed."""
    if not spec.image:
        return
    allowed = tuple(dict.fromkeys((settings.k8s_image, *settings.trainer_allowed_images)))
    if not image_allowed(spec.image, allowed):
        raise ValidationError(f"image {spec.image[:200]!r} is not an allowed training image "
                              f"({env_name('trainer_allowed_images')}; allowed: {', '.join(allowed)})")


def local_paths(spec: trainer_pb2.JobSpec, settings: TrainerSettings) -> tuple[Path, Path, Path]:
    """(model, data, output_dir) of a local job, resolved and each inside its roots; the output defaults
    to ``<work_dir>/<job_id>``."""
    work = (settings.work_dir,)
    model = confined_path(spec.model, (*settings.trainer_model_roots, *work), "model",
                          setting=env_name("trainer_model_roots"))
    data = confined_path(spec.data, (*settings.trainer_data_roots, *work), "data",
                         setting=env_name("trainer_data_roots"))
    out = spec.output_dir or str(Path(settings.work_dir) / spec.job_id)
    output = confined_path(out, (settings.trainer_output_root, *work), "output_dir",
                           setting=env_name("trainer_output_root"))
    return model, data, output
