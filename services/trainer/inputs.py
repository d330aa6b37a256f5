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
  and required inside ``trainer_data_roots`` / ``trainer_model_roots`` (``work_dir`` and the output
  root count as roots of each: one job's output is the next one's model).
- Kubernetes jobs: paths inside the training pod, which mounts only the training volume at
  ``/workspace``; ``..`` may not leave it (``stablealign.llm.confine.confined_pod_path``).
- Output: every job writes to its own directory, ``<output root>/<job_id>`` (``job_output_dir``); a
  job may name a sub-path inside it, never another directory. Training resumes from the checkpoints
  in its output directory, so a job that could name another's would resume from files someone else
  left there (and a job id is unique: two jobs never share a directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from services.trainer.settings import TrainerSettings
from stablealign.core.config import env_name
from stablealign.core.errors import ValidationError
from stablealign.llm.confine import confined_path, resolved_roots
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


def job_output_dir(requested: str, job_id: str, root: str | Path) -> Path:
    """The job's output directory: ``<root>/<job_id>``, or ``requested`` if it is a path inside that one.

    A relative ``requested`` is taken under the job's directory; an absolute one (a stored spec that is
    prepared again) must already be inside it. Symlinks are resolved against the root, so a job
    directory that is a link elsewhere is refused like a path outside.
    """
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValidationError(f"job_id {job_id!r} cannot name an output directory")
    (base,) = resolved_roots((root,)) or (Path.cwd(),)
    own = base / job_id
    text = requested.strip()
    if "\x00" in text:
        raise ValidationError("output_dir: a path may not contain a NUL byte")
    candidate = Path(os.path.expanduser(text)) if text else own
    if not candidate.is_absolute():
        candidate = own / candidate
    resolved = confined_path(candidate, (base,), "output_dir", setting=env_name("trainer_output_root"))
    if not resolved.is_relative_to(own):
        raise ValidationError(f"output_dir {text[:200]!r} is outside the allowed directories: {own} (the job's own "
                              "directory: name a path inside it, or nothing)")
    return resolved


def local_paths(spec: trainer_pb2.JobSpec, settings: TrainerSettings) -> tuple[Path, Path, Path]:
    """(model, data, output_dir) of a local job, resolved and each inside its roots; the output is the job's
    own directory (``job_output_dir``)."""
    output_root = settings.trainer_output_root or settings.work_dir
    work = (settings.work_dir, output_root)
    model = confined_path(spec.model, (*settings.trainer_model_roots, *work), "model",
                          setting=env_name("trainer_model_roots"))
    data = confined_path(spec.data, (*settings.trainer_data_roots, *work), "data",
                         setting=env_name("trainer_data_roots"))
    return model, data, job_output_dir(spec.output_dir, spec.job_id, output_root)
