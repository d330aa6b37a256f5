"""The evaluation's measures where the answer is known, on a real (tiny) model and real training:
SFT on chosen answers raises the reference-normalised accuracy on those pairs, and the report of
`stable-align eval` holds every measure, the judge's agreement, and the compared models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stablealign.sandbox.data import load_hh_pairs

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-known")


@pytest.fixture(scope="module")
def hh_file(workdir) -> Path:
    """A user's own HH-RLHF file (scored whole) of 48 prior-split pairs: never the eval split."""
    path = workdir / "hh.jsonl"
    pairs = load_hh_pairs(None, "prior")[:48]
    path.write_text("".join(json.dumps({"chosen": p.chosen_dialogue, "rejected": p.rejected_dialogue}) + "\n"
                            for p in pairs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(workdir) -> Path:
    from stablealign_app.tinymodel import build_tiny_model

    return build_tiny_model(workdir / "tiny", seed=0)


@pytest.fixture(scope="module")
def sft_on_chosen(workdir, hh_file, tiny_model) -> Path:
    from stablealign.training.config import StableAlignmentConfig
    from stablealign.training.data import hh_sft_groups, write_groups
    from stablealign.training.train import train

    data = workdir / "chosen.jsonl"
    groups = hh_sft_groups(hh_path=hh_file)
    assert len(groups) == 48 and all(len(g.responses) == 1 for g in groups)
    write_groups(groups, data)
    out = workdir / "sft"
    train(StableAlignmentConfig(model=str(tiny_model), data=str(data), output_dir=str(out), max_steps=36,
                                per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3,
                                max_length=160, save_steps=0, seed=5, warmup_ratio=0.0))
    return out


def test_sft_on_chosen_answers_raises_the_reference_normalised_accuracy(hh_file, tiny_model, sft_on_chosen):
    from stablealign.training.evaluate import preference_accuracy, reference_normalised_accuracy
    from stablealign.training.generate import load_model

    base = preference_accuracy(*load_model(tiny_model), hh_file, max_length=160)
    trained = preference_accuracy(*load_model(sft_on_chosen), hh_file, max_length=160)
    assert base["pairs"] == trained["pairs"] == 48 and base["split"] == "all"
    result = reference_normalised_accuracy(base, trained)
    assert result["accuracy"] > 0.7 and result["ci95"][0] > 0.5, result
    assert result["mean_margin"] > 0
    assert trained["chosen_nll"] < base["chosen_nll"]  # the chosen answers themselves got likelier
    same = reference_normalised_accuracy(base, preference_accuracy(*load_model(tiny_model), hh_file, max_length=160))
    assert same["accuracy"] == 0.5 and same["ties"] == 48


def test_eval_report_holds_every_measure_the_judge_and_compared_models(workdir, tiny_model, sft_on_chosen):
    out = workdir / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "stablealign_app.cli.main", "eval", "--model", str(sft_on_chosen), "--base",
         str(tiny_model), "--compare", f"again={sft_on_chosen}", "--out", str(out), "--limit", "24",
         "--observer-backend", "offline", "--questions", "4", "--judge-pairs", "40", "--max-length", "160"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    judge = report["judge"]
    assert judge["variant"] == report["judge_variant"] == "llm-expected" and judge["split"] == "eval"
    assert judge["scored"] + judge["missing"] == 40 and 0 <= judge["agreement"] <= 1
    assert "judge llm-expected: agreement with human preference" in result.stdout
    for name, part in (("base", report["base"]), ("trained", report["trained"]), ("again", report["compare"]["again"])):
        assert part["preference"]["pairs"] == 24, name
        assert part["guard"]["answers"] == 4 and part["guard"]["chosen_nll"] > 0
        assert part["alignment"]["judge"] == "llm-expected" and part["alignment"]["rated"] == 4
    ref = report["difference"]["reference_normalised_accuracy"]
    assert ref["pairs"] == 24 and 0 <= ref["accuracy"] <= 1
    # The same model compared twice reads the same against the base.
    assert report["compare_difference"]["again"]["reference_normalised_accuracy"]["items"] == ref["items"]
    assert ref["per_token"]["pairs"] == 24
    versus = report["trained_versus"]["again"]  # the model against itself: no difference, paired
    assert versus["reference_normalised_accuracy"]["delta"] == versus["reference_normalised_per_token"]["delta"] == 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_bad_comparisons_in_one_line(workdir, tiny_model):
    base = [sys.executable, "-m", "stablealign_app.cli.main", "eval", "--model", str(tiny_model), "--out",
            str(workdir / "bad")]
    for extra, message in ((["--base", str(tiny_model), "--compare", "nameless"], "--compare takes NAME=PATH"),
                           (["--base", str(tiny_model), "--compare", f"base={tiny_model}"], "cannot be named base"),
                           (["--compare", f"x={tiny_model}"], "needs the base model"),
                           (["--observer-backend", "offline", "--judge", "nope"], "unknown judge 'nope'")):
        result = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr


def test_judge_command_measures_named_judges_and_refuses_bad_ones_in_one_line(workdir):
    cli = [sys.executable, "-m", "stablealign_app.cli.main", "judge"]
    out = workdir / "judge" / "agreement.json"
    result = subprocess.run(cli + ["--observer-backend", "offline", "--variant", "llm-argmax", "--variant",
                                   "llm-ensemble", "--split", "prior", "--limit", "30", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prior split" in result.stdout and "llm-ensemble" in result.stdout
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["llm-argmax", "llm-ensemble"]
    assert all(r["split"] == "prior" and r["scored"] + r["missing"] == 30 for r in rows)
    listed = subprocess.run(cli + ["--list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "probe:" in listed.stdout and "llm-argmax:" in listed.stdout
    for extra, message in ((["--variant", "llm-expected"], "asks a chat model: give --observer-backend"),
                           (["--variant", "oracle", "--observer-backend", "offline"], "unknown judge 'oracle'"),
                           (["--split", "test", "--observer-backend", "offline"], "unknown HH-RLHF split 'test'")):
        bad = subprocess.run(cli + extra, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2, (extra, bad.stderr[-2000:])
        assert message in bad.stderr and "Traceback" not in bad.stderr
