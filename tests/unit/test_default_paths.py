"""Default locations hang off the repository root, wherever the library's modules sit in it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_models_and_data_default_to_the_repository_root(monkeypatch, tmp_path):
    from stablealign.llm.models import models_dir
    from stablealign.sandbox.data import data_dir

    monkeypatch.delenv("STABLEALIGN_MODELS_DIR", raising=False)
    monkeypatch.delenv("STABLEALIGN_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # not found next to the working directory: the repository's neighbour
    assert models_dir() == REPO / "models"
    assert data_dir() == REPO.parent / "shared" / "data"
