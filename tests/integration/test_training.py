"""Stable Alignment training end to end on a tiny local model (CPU): data from a simulated world,
training lowers the loss, a killed job resumes to the same result, evaluation writes its report."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> Path:
    from stablealign_app.tinymodel import build_tiny_model

    return build_tiny_model(workdir / "tiny", seed=0)


@pytest.fixture(scope="module")
def alignment_data(workdir) -> Path:
    """Records from a real `stable-align run` (offline backend) -> `stable-align data build`."""
    sim = workdir / "sim"
    run = _cli("run", "--size", "3", "--rounds", "2", "--backend", "offline", "--seed", "1", "--out", str(sim))
    assert run.returncode == 0, run.stderr[-2000:]
    out = workdir / "data" / "alignment.jsonl"
    build = _cli("data", "build", "--records", str(sim / "records.jsonl"), "--out", str(out), "--mix", "5:1:1",
                 "--holdout", "0.2", "--seed", "1")
    assert build.returncode == 0, build.stderr[-2000:]
    return out


def _config(model: Path, data: Path, out: Path, **kw):
    from stablealign.training.config import StableAlignmentConfig

    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=3e-3, max_length=128, save_steps=2, seed=5,
                warmup_ratio=0.0, resume=True)
    base.update(kw)
    return StableAlignmentConfig(**base)


def _params(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line.strip()]


def test_training_lowers_the_loss_and_changes_parameters(tiny_model, alignment_data, workdir):
    from stablealign.training.data import load_alignment_groups
    from stablealign.training.evaluate import heldout_loss
    from stablealign.training.generate import load_model
    from stablealign.training.train import train

    out = workdir / "trained"
    result = train(_config(tiny_model, alignment_data, out, max_steps=15, save_steps=0))
    assert result.steps == 15 and not result.stopped_early
    before, after = _params(tiny_model), _params(out)
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) == len(before)  # every tensor moved
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert {"loss", "loss/sft", "loss/penalty", "lr", "tokens_per_second"} <= set(rows[0])
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/sft"] + r["loss/penalty"], rel=1e-5)
    groups = load_alignment_groups(alignment_data)
    base_loss = heldout_loss(*load_model(tiny_model), groups, max_length=128)["loss"]
    trained_loss = heldout_loss(*load_model(out), groups, max_length=128)["loss"]
    assert trained_loss < base_loss - 0.5, (base_loss, trained_loss)


class _Planted:
    """A pickle that creates ``marker`` when unpickled: what an attacker with write access to the
    output directory would leave where an unpickling resume looks (accelerate's file names)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _plant(folder: Path, marker: Path) -> None:
    import torch

    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin"):
        torch.save(_Planted(marker), folder / name)


def test_killed_job_resumes_to_the_same_result_and_never_unpickles(tiny_model, alignment_data, workdir):
    import torch

    from stablealign.training.train import last_checkpoint, train

    unbroken = workdir / "unbroken"
    train(_config(tiny_model, alignment_data, unbroken, gradient_accumulation_steps=2, per_device_train_batch_size=2))
    broken = workdir / "broken"
    cfg = _config(tiny_model, alignment_data, broken, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    first = train(cfg, stop_after_steps=3)  # "killed" after step 3: last checkpoint is step 2
    assert first.stopped_early and first.steps == 3
    checkpoint = last_checkpoint(broken)
    assert checkpoint.name == "step-00000002"
    assert not (broken / "model.safetensors").exists()
    assert not [p for p in checkpoint.iterdir() if p.suffix not in (".json", ".safetensors")]

    # Pickles planted where an unpickling resume would read them: beside the real checkpoint, in its
    # trainer_state.json (the old pickled RNG field), and as a newer accelerate-style checkpoint.
    marker = workdir / "pwned"
    _plant(checkpoint, marker)
    control = workdir / "control"
    torch.load(checkpoint / "optimizer.bin", weights_only=False)  # the payload works when unpickled ...
    assert marker.is_dir()
    marker.rename(control)  # ... so from here on a marker can only come from the resume
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["rng_legacy"] = {"pickle_base64": base64.b64encode(pickle.dumps(_Planted(marker))).decode()}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    newer = broken / "checkpoints" / "step-00000003"
    newer.mkdir()
    _plant(newer, marker)
    (newer / "trainer_state.json").write_text(json.dumps({
        "step": 3, "rng": {"pickle_base64": base64.b64encode(pickle.dumps(_Planted(marker))).decode()}}))

    second = train(cfg)
    assert not marker.exists()
    assert second.resumed_from == 2 and second.steps == 6  # the planted step 3 was skipped, not loaded
    a, b = _params(unbroken), _params(broken)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    log_a, log_b = _log(unbroken), _log(broken)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]  # step 3 of the killed run not duplicated
    for ra, rb in zip(log_a, log_b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-6 and ra["lr"] == rb["lr"]
    state = json.loads((last_checkpoint(broken) / "trainer_state.json").read_text())
    assert state["step"] == 6 and {"sampler", "rng", "epoch", "format"} <= set(state)


def test_a_checkpoint_that_does_not_parse_is_refused_not_guessed(tmp_path):
    from stablealign.core.errors import ValidationError
    from stablealign.training import checkpoint as ckpt

    state = ckpt.rng_state()
    json.dumps(state)  # plain JSON, nothing else
    ckpt.restore_rng(state)
    for bad in ({"python": "x"}, {**state, "torch": "not base64!"}, {**state, "numpy": ["MT19937", [1], 0, 0, 0.0]}):
        with pytest.raises(ValidationError, match="RNG state is not readable"):
            ckpt.restore_rng(bad)


def test_killed_before_any_checkpoint_restarts_without_duplicate_log_lines(tiny_model, alignment_data, workdir):
    from stablealign.training.train import last_checkpoint, train

    out = workdir / "no-checkpoint"
    cfg = _config(tiny_model, alignment_data, out, save_steps=100)
    assert train(cfg, stop_after_steps=2).stopped_early
    assert last_checkpoint(out) is None and [r["step"] for r in _log(out)] == [1, 2]
    train(cfg)  # starts again from step 0: the killed run's lines must not stay beside the new ones
    steps = [r["step"] for r in _log(out)]
    assert steps == list(range(1, len(steps) + 1))


def test_bad_model_path_is_one_clear_line(tmp_path, alignment_data, tiny_model):
    result = _cli("train", "--model", str(tmp_path / "no-such-model"), "--data", str(alignment_data),
                  "--out", str(tmp_path / "o"), timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: model path does not exist or is not a directory: "
                                                  f"{tmp_path / 'no-such-model'}"]
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"query": "q", "responses": ["a"], "scores": ["x"]}\n')
    result = _cli("train", "--model", str(tiny_model), "--data", str(bad_data), "--out", str(tmp_path / "o"),
                  timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {bad_data}:1: score 'x' is not a number" in result.stderr


def test_eval_report_and_generate(tiny_model, alignment_data, workdir):
    trained = workdir / "trained"
    if not (trained / "model.safetensors").exists():
        pytest.skip("needs the trained model of test_training_lowers_the_loss_and_changes_parameters")
    out = workdir / "eval"
    heldout = alignment_data.with_name("alignment.heldout.jsonl")
    result = _cli("eval", "--model", str(trained), "--base", str(tiny_model), "--data", str(heldout), "--out", str(out),
                  "--limit", "32", "--observer-backend", "offline", "--questions", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("base", "trained"):
        assert 0.0 <= report[name]["preference"]["accuracy"] <= 1.0
        assert report[name]["preference"]["pairs"] == 32
        assert report[name]["heldout"]["groups"] > 0
        alignment = report[name]["alignment"]
        assert alignment.get("rated", 0) >= 1 and 1 <= alignment["mean"] <= 7, alignment
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from typer.testing import CliRunner

    from stablealign_app.cli.main import app

    gen = CliRunner().invoke(app, ["generate", "--model", str(trained), "--prompt", "How do I help a friend?",
                                   "--max-new-tokens", "8"])
    assert gen.exit_code == 0, gen.output
