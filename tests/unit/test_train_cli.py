"""The train command line generated from ``StableAlignmentConfig``: every field reachable from
``stable-align train`` and ``python -m stablealign.training.train``, the old short spellings kept,
bad values one ``error:`` line and exit code 2; the trainer's job args derived from the same fields.

No training starts: ``run_training`` is replaced by a recorder where a command would train, and a
bad value fails in ``StableAlignmentConfig.__post_init__`` before any model is looked at.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner

from services.trainer.runners import TRAIN_ARG_ALIASES, TRAIN_ARGS, canonical_arg, train_flags, train_module_argv
from stablealign.core.errors import ValidationError
from stablealign.training import cli as training_cli
from stablealign.training.cli import ConfigOption, config_options, train_module_command
from stablealign.training.config import StableAlignmentConfig
from stablealign.v1 import trainer_pb2

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
FIELDS = [f.name for f in dataclasses.fields(StableAlignmentConfig)]
DEFAULTS = StableAlignmentConfig()
REQUIRED_ARGS = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
OPTIONS = {option.name: option for option in config_options()}
# Every spelling used before the command line was generated (README, docs, tests, the trainer's runners).
OLD_FLAGS = {
    "--epochs": ("num_train_epochs", "3", 3.0), "--lr": ("learning_rate", "1e-3", 1e-3),
    "--batch-size": ("per_device_train_batch_size", "4", 4), "--grad-accum": ("gradient_accumulation_steps", "2", 2),
    "--max-steps": ("max_steps", "5", 5), "--max-length": ("max_length", "128", 128),
    "--num-comp": ("num_comp", "2", 2), "--margin": ("margin", "3", 3.0), "--ratio": ("ratio", "0.5", 0.5),
    "--rating-scale": ("rating_scale", "10", 10.0), "--max-flow": ("max_flow", None, True),
    "--fsdp": ("fsdp", "full_shard", "full_shard"), "--no-bf16": ("bf16", None, False),
    "--gradient-checkpointing": ("gradient_checkpointing", None, True), "--save-steps": ("save_steps", "7", 7),
    "--logging-steps": ("logging_steps", "3", 3), "--warmup-ratio": ("warmup_ratio", "0.1", 0.1),
    "--seed": ("seed", "7", 7), "--no-resume": ("resume", None, False), "--metrics-port": ("metrics_port", "0", 0),
    "--out": ("output_dir", "elsewhere", "elsewhere"),
}


def _other_value(option: ConfigOption) -> tuple[list[str], object]:
    """Flags that set ``option`` to a valid value other than its default, and that value."""
    default = option.default
    if option.kind is bool:
        return ([option.negatives[0]] if default else [option.flag]), not default
    if option.kind is int:
        value = default + 3 if default >= 0 else 5
    elif option.kind is float:
        value = default / 2 if default > 0 else 0.5
    elif option.choices:
        value = next(choice for choice in option.choices if choice and choice != default)
    else:
        value = f"x-{option.name}"
    return [option.flag, str(value)], value


def _app_command():
    from stablealign_app.cli.main import app

    return typer.main.get_command(app)


ENTRIES = {
    "stable-align train": lambda args: (_app_command(), ["train", *args]),
    "python -m stablealign.training.train": lambda args: (train_module_command(), list(args)),
}


def _clean_environment(monkeypatch) -> None:
    for name in [name for name in os.environ if name.startswith("STABLEALIGN_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[dict, int | None]]:
    """Replaces the training run; no STABLEALIGN_* variable comes from this process's environment."""
    _clean_environment(monkeypatch)
    calls: list[tuple[dict, int | None]] = []
    monkeypatch.setattr(training_cli, "run_training", lambda config, stop_after=None: calls.append((config, stop_after)))
    return calls


def _invoke(entry: str, args: list[str], env: dict[str, str] | None = None):
    command, argv = ENTRIES[entry](args)
    return CliRunner().invoke(command, argv, env=env, catch_exceptions=False)


def _config(recorded) -> StableAlignmentConfig:
    assert len(recorded) == 1, recorded
    return StableAlignmentConfig(**recorded[0][0])


def test_one_option_per_config_field():
    assert [option.name for option in config_options()] == FIELDS
    for option in config_options():
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.help and option.help == StableAlignmentConfig.help()[option.name]
    flags = [flag for option in config_options() for flag in (*option.flags, *option.negatives)]
    assert len(flags) == len(set(flags))
    assert {o.name for o in config_options() if o.required} == {"model", "data", "output_dir"}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_reachable(entry, name, recorded):
    option = OPTIONS[name]
    flags, value = _other_value(option)
    if option.required:
        required = {"model": "m", "data": "d.jsonl", "output_dir": "o", name: str(value)}
        args = [arg for field, given in required.items() for arg in (OPTIONS[field].flag, given)]
    else:
        args = [*REQUIRED_ARGS, *flags]
    result = _invoke(entry, args)
    assert result.exit_code == 0, result.output
    cfg = _config(recorded)
    assert getattr(cfg, name) == value != getattr(DEFAULTS, name)
    # Only that field changed; a field not given keeps the dataclass default (None = not given).
    for other in FIELDS:
        if other not in (name, "model", "data", "output_dir"):
            assert getattr(cfg, other) == getattr(DEFAULTS, other), other
            assert other not in recorded[0][0]


@pytest.mark.parametrize("entry", ENTRIES)
def test_old_spellings_still_work(entry, recorded):
    for flag, (name, raw, value) in OLD_FLAGS.items():
        recorded.clear()
        args = [*REQUIRED_ARGS, flag] if raw is None else [*REQUIRED_ARGS, flag, raw]
        result = _invoke(entry, args)
        assert result.exit_code == 0, (flag, result.output)
        assert getattr(_config(recorded), name) == value, flag
    recorded.clear()
    assert _invoke(entry, [*REQUIRED_ARGS, "--max-flow", "--mean-flow"]).exit_code == 0  # the last one wins
    assert _config(recorded).max_flow is False


def _train_params(entry: str) -> dict:
    command, _ = ENTRIES[entry]([])
    if entry == "stable-align train":
        command = command.commands["train"]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("entry", ENTRIES)
def test_environment_variables_and_flags_win(entry, recorded):
    # One variable per option, the same in both entries; none a service setting's (STABLEALIGN_METRICS_PORT).
    params = _train_params(entry)
    for option in config_options():
        assert params[option.name].envvar == "STABLEALIGN_TRAIN_" + option.name.upper() == option.envvar
    env = {"STABLEALIGN_TRAIN_LEARNING_RATE": "0.25", "STABLEALIGN_TRAIN_SAVE_TOTAL_LIMIT": "9",
           "STABLEALIGN_TRAIN_GROUP_BY_LENGTH": "false", "STABLEALIGN_METRICS_PORT": "9090"}
    assert _invoke(entry, REQUIRED_ARGS, env=env).exit_code == 0
    cfg = _config(recorded)
    assert (cfg.learning_rate, cfg.save_total_limit, cfg.group_by_length) == (0.25, 9, False)
    assert cfg.metrics_port == -1
    recorded.clear()
    assert _invoke(entry, [*REQUIRED_ARGS, "--learning-rate", "0.5"], env=env).exit_code == 0
    assert _config(recorded).learning_rate == 0.5


def test_stop_after_and_app_only_options(recorded):
    assert _invoke("python -m stablealign.training.train", [*REQUIRED_ARGS, "--stop-after", "2"]).exit_code == 0
    assert recorded[0][1] == 2
    for args in (["--submit"], ["--runner", "kubernetes"], ["--trainer-nats", "nats://x:4222"]):
        result = _invoke("python -m stablealign.training.train", [*REQUIRED_ARGS, *args])
        assert result.exit_code == 2, args  # the torchrun entry trains; submitting is the app's
    result = _invoke("stable-align train", ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for flag in ("--submit", "--trainer-nats", "--runner", "--learning-rate", "--lr", "--dataloader-max-chars"):
        assert flag in result.output
    assert "--stop-after" not in result.output
    train = _app_command().commands["train"]
    declared = {flag for param in train.params for flag in (*param.opts, *param.secondary_opts)}
    for option in config_options():
        assert {*option.flags, *option.negatives} <= declared, option.name


def test_submit_sends_every_given_field_as_a_job_arg(monkeypatch):
    import services.trainer.client as client

    sent: list[trainer_pb2.JobSpec] = []

    async def submit_job(nats, spec):
        sent.append(spec)
        return trainer_pb2.Job(spec=trainer_pb2.JobSpec(job_id="job-1"), state=trainer_pb2.JOB_STATE_QUEUED)

    monkeypatch.setattr(client, "submit_job", submit_job)
    result = _invoke("stable-align train", [*REQUIRED_ARGS, "--lr", "1e-4", "--no-group-by-length", "--submit",
                                            "--trainer-nats", "nats://x:4222", "--lr-scheduler-type", "constant"])
    assert result.exit_code == 0, result.output
    assert "submitted job job-1" in result.output
    (spec,) = sent
    assert (spec.model, spec.data, spec.output_dir, spec.runner) == ("m", "d.jsonl", "o", "local")
    assert dict(spec.args) == {"learning_rate": "0.0001", "group_by_length": "false", "lr_scheduler_type": "constant"}
    train_flags(spec.args)  # what the service will accept


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "error: learning_rate must be > 0"),
    (["--fsdp", "everything"], "error: fsdp must be one of ('', 'full_shard', 'shard_grad_op')"),
    (["--lr-scheduler-type", "linear"], "error: lr_scheduler_type must be cosine or constant"),
    (["--max-steps", "0"], "error: max_steps must be -1 or >= 1"),
    (["--dataloader-max-chars", "3"], "error: dataloader_max_chars must be >= 16"),
])
def test_bad_values_are_one_error_line_and_exit_2(entry, args, message, monkeypatch):
    _clean_environment(monkeypatch)
    result = _invoke(entry, [*REQUIRED_ARGS, *args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [message]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args", [
    ["--lr", "fast"], ["--batch-size", "1.5"], ["--no-such-flag"], ["--model", "m", "--data", "d.jsonl"],
])
def test_usage_errors_exit_2(entry, args, recorded):
    result = _invoke(entry, args if args[0] == "--model" else [*REQUIRED_ARGS, *args])
    assert result.exit_code == 2 and not recorded
    assert "Traceback" not in result.output


def test_module_entry_imports_no_app_and_no_torch():
    code = ("import sys\n"
            "from stablealign.training.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print(sorted(m for m in sys.modules if m.startswith(('stablealign_app', 'services', 'torch'))))\n"
            "import services.trainer.runners\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "300"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["[]", "False"]
    assert "--dataloader-max-chars" in out.stdout


def test_module_entry_bad_value_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "stablealign.training.train", *REQUIRED_ARGS, "--warmup-ratio", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: warmup_ratio must be in [0, 1)"]


# --- the trainer service's job args -------------------------------------------------------------------


def test_job_args_are_the_config_fields():
    assert set(TRAIN_ARGS) == set(FIELDS) - {"model", "data", "output_dir"}
    assert TRAIN_ARG_ALIASES == {"lr": "learning_rate", "epochs": "num_train_epochs",
                                 "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps"}
    assert canonical_arg("--learning-rate") == canonical_arg("lr") == "learning_rate"
    for name in ("model", "data", "output_dir", "out"):
        with pytest.raises(ValidationError, match="set the job's"):
            canonical_arg(name)
    with pytest.raises(ValidationError, match="unknown training argument 'rm_rf'"):
        canonical_arg("rm_rf")


@pytest.mark.parametrize("name", sorted(set(FIELDS) - {"model", "data", "output_dir"}))
def test_every_job_arg_reaches_the_training_config(name, recorded):
    """JobSpec.args -> the runner's argv -> ``python -m stablealign.training.train`` -> the config."""
    flags, value = _other_value(OPTIONS[name])
    raw = str(value).lower() if isinstance(value, bool) else str(value)
    spec = trainer_pb2.JobSpec(model="m", data="d.jsonl", output_dir="o", args={name.replace("_", "-"): raw})
    argv = train_module_argv(spec, gpus=1)
    assert argv[:2] == ["-m", "stablealign.training.train"]
    result = _invoke("python -m stablealign.training.train", argv[2:])
    assert result.exit_code == 0, (argv, result.output)
    cfg = _config(recorded)
    assert getattr(cfg, name) == value
    assert (cfg.model, cfg.data, cfg.output_dir) == ("m", "d.jsonl", "o")


def test_job_args_keep_the_old_flags_and_are_checked():
    flags = train_flags({"lr": "2e-5", "bf16": "false", "max_flow": "no", "epochs": "3", "fsdp": ""})
    assert flags == ["--no-bf16", "--lr", "2e-5", "--mean-flow", "--epochs", "3"]  # by field name
    for args, match in [({"lr": "fast"}, "expected a number"), ({"max_steps": "two"}, "expected an integer"),
                        ({"lr": "nan"}, "expected a finite number"), ({"bf16": "maybe"}, "expected true or false"),
                        ({"fsdp": "all"}, "expected one of"), ({"lr": "1", "learning_rate": "2"}, "given twice"),
                        ({"lr": "-1"}, "learning_rate must be > 0"), ({"warmup_ratio": "1"}, r"warmup_ratio must")]:
        with pytest.raises(ValidationError, match=match):
            train_flags(args)


@pytest.mark.parametrize("bf16,cuda,native,fsdp,expected", [
    (True, False, True, False, "bf16"),  # a CPU that multiplies bf16 natively: autocast
    (True, False, False, False, "no"),  # emulated bf16 is slower than float32
    (True, False, True, True, "no"),  # FSDP on CPU stays float32
    (False, False, True, False, "no"),
])
def test_bf16_only_where_the_cpu_computes_it(monkeypatch, bf16, cuda, native, fsdp, expected):
    import torch

    from stablealign.llm.backends import batching
    from stablealign.training.train import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(batching, "native_bf16", lambda: native)
    assert mixed_precision(bf16, fsdp=fsdp) == expected
