"""The training Job's launcher: a configuration that cannot run exits 2 (the Job fails at once, no retry);
one that can becomes torchrun with the same training flags."""

from __future__ import annotations

import json
import sys

import pytest

from stablealign.training import launch


@pytest.fixture
def groups(tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"query": "How can I help?", "responses": ["Kindly.", "Rudely."], "scores": [6, 2]})
                    + "\n")
    return path


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        launch.main(argv)
    return info.value.code


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "learning_rate must be > 0"),
    (["--fsdp", "everything"], "fsdp"),
    (["--no-such-flag", "1"], "No such option"),
])
def test_a_bad_configuration_exits_2_before_torchrun(tiny_model_dir, groups, tmp_path, monkeypatch, capsys, flags,
                                                      message):
    monkeypatch.setattr(launch.os, "execv", lambda *a: pytest.fail("torchrun started on a bad configuration"))
    argv = ["--nnodes=1", "--nproc_per_node=2", "--", "--model", str(tiny_model_dir), "--data", str(groups),
            "--out", str(tmp_path / "out"), *flags]
    assert _exit_code(argv) == launch.EXIT_CONFIG_ERROR
    assert message in capsys.readouterr().err


def test_missing_model_or_malformed_data_exit_2(tiny_model_dir, groups, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch.os, "execv", lambda *a: pytest.fail("torchrun started on a bad configuration"))
    assert _exit_code(["--", "--model", str(tmp_path / "nope"), "--data", str(groups), "--out", "o"]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "responses": ["a"], "scores": [99]}\n')
    assert _exit_code(["--", "--model", str(tiny_model_dir), "--data", str(bad), "--out", "o"]) == 2
    assert f"{bad}:1" in capsys.readouterr().err
    assert _exit_code(["--model", str(tiny_model_dir)]) == 2  # no "--": not a launcher command line


def test_a_good_configuration_execs_torchrun_with_the_same_flags(tiny_model_dir, groups, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: calls.append((path, argv)))
    train = ["--model", str(tiny_model_dir), "--data", str(groups), "--out", str(tmp_path / "out"), "--lr", "1e-4"]
    launch.main(["--nnodes=2", "--nproc_per_node=8", "--node-rank=1", "--", *train])
    ((path, argv),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
                    "--node-rank=1", "-m", "stablealign.training.train", *train]
