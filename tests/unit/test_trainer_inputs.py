"""What a training job may name: allowed images, and pod paths that stay on the training volume."""

from __future__ import annotations

import pytest

from services.trainer.inputs import image_allowed
from services.trainer.runners.kubernetes import _pod_path
from stablealign.errors import ValidationError


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
