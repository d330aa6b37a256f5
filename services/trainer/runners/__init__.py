"""Job runners: where a training job's process lives (a local subprocess, or a Kubernetes Job).

A runner turns a validated ``JobSpec`` into a running training (``stable-align train`` /
``python -m stablealign.training.train``), reports its log lines and progress through a
``JobReporter``, and returns how it ended. The scheduler (``services.trainer.queue``) owns the job
state; runners never write it themselves, so both runners end jobs the same way.

``JobSpec.args`` holds extra training settings by name: any ``StableAlignmentConfig`` field but the
three that are ``JobSpec`` fields of their own (model, data, output_dir), or one of the older short
names (lr, epochs, batch_size, grad_accum). ``TRAIN_ARGS`` is derived from the config's fields
(``stablealign.training.cli``), never kept by hand. An unknown name is a ``ValidationError``, never
a flag smuggled onto a command line, and each value is checked against its type and the config's
own checks before any process starts.
"""

from __future__ import annotations

import abc
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from services.trainer.settings import TrainerSettings
from stablealign.core.config import env_name
from stablealign.core.errors import ConfigError, ValidationError
from stablealign.training.cli import config_options
from stablealign.training.config import StableAlignmentConfig
from stablealign.v1 import trainer_pb2


@dataclass(frozen=True)
class TrainArg:
    """One allowed training flag: the CLI flag, its value type, and for booleans the negative form."""

    flag: str
    kind: str  # int | float | bool | choice | str
    choices: tuple[str, ...] = ()
    negative: str = ""  # a bool's "false" flag (e.g. --no-bf16)


# StableAlignmentConfig fields that are JobSpec fields of their own, not args.
SPEC_FIELDS = {"model": "model", "data": "data", "output_dir": "output_dir", "out": "output_dir"}


def _derive_train_args() -> tuple[dict[str, TrainArg], dict[str, str]]:
    """``TRAIN_ARGS`` (field name -> flag) and ``TRAIN_ARG_ALIASES`` (short name -> field) from the config.

    The flag a job gets is the oldest spelling of each option (``--lr``, ``--mean-flow``), which a
    trainer image from before the generated command line understands too.
    """
    args: dict[str, TrainArg] = {}
    aliases: dict[str, str] = {}
    for option in config_options():
        if option.name in SPEC_FIELDS:
            continue
        kind = "choice" if option.choices else option.kind.__name__
        args[option.name] = TrainArg(option.compat_flag, kind, option.choices, option.compat_negative)
        for alias in option.aliases:
            aliases[alias.lstrip("-").replace("-", "_")] = option.name
    return args, aliases


# The training settings a job may set, by StableAlignmentConfig field name (dashes or underscores).
TRAIN_ARGS, TRAIN_ARG_ALIASES = _derive_train_args()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def canonical_arg(name: str) -> str:
    """The config field a job arg names (``lr`` / ``--learning-rate`` -> ``learning_rate``)."""
    key = name.strip().lstrip("-").replace("-", "_").lower()
    key = TRAIN_ARG_ALIASES.get(key, key)
    if key in SPEC_FIELDS:
        raise ValidationError(f"training argument {name!r}: set the job's {SPEC_FIELDS[key]} instead")
    if key not in TRAIN_ARGS:
        raise ValidationError(f"unknown training argument {name!r}; allowed: {sorted(TRAIN_ARGS)}")
    return key


def train_module_argv(spec: trainer_pb2.JobSpec, gpus: int, fsdp_default: str = "full_shard") -> list[str]:
    """``-m stablealign.training.train --model ... --data ... --out ... <flags>`` for one job, any runner.

    With more than one GPU the job shards with FSDP (``full_shard`` unless its args say otherwise):
    a plain DDP replica of a 7B model per GPU would not fit.
    """
    args = dict(spec.args)
    if gpus > 1 and not any(k.replace("-", "_").lower() == "fsdp" for k in args):
        args["fsdp"] = fsdp_default
    return ["-m", "stablealign.training.train", "--model", spec.model, "--data", spec.data,
            "--out", spec.output_dir, *train_flags(args)]


def train_flags(args: Mapping[str, str]) -> list[str]:
    """``{"lr": "2e-5", "bf16": "false"}`` -> ``["--no-bf16", "--lr", "2e-5"]``, validated, in a stable order.

    Each value is checked against its field's type, then all of them together by
    ``StableAlignmentConfig`` (a bad value fails here, at submit time, not in the job).
    """
    seen: dict[str, str] = {}
    for name, value in args.items():
        key = canonical_arg(name)
        if key in seen:
            raise ValidationError(f"training argument {key!r} given twice")
        seen[key] = value
    flags: list[str] = []
    typed: dict[str, object] = {}
    for key in sorted(seen):
        spec, raw = TRAIN_ARGS[key], str(seen[key]).strip()
        if spec.kind == "bool":
            value = raw.lower()
            if value in _TRUE:
                flags.append(spec.flag)
                typed[key] = True
            elif value in _FALSE:
                flags.append(spec.negative)
                typed[key] = False
            else:
                raise ValidationError(f"training argument {key}={raw!r}: expected true or false")
            continue
        if spec.kind == "int":
            try:
                typed[key] = int(raw)
            except ValueError:
                raise ValidationError(f"training argument {key}={raw!r}: expected an integer") from None
        elif spec.kind == "float":
            try:
                number = float(raw)
            except ValueError:
                raise ValidationError(f"training argument {key}={raw!r}: expected a number") from None
            if not math.isfinite(number):
                raise ValidationError(f"training argument {key}={raw!r}: expected a finite number")
            typed[key] = number
        else:
            if spec.kind == "choice" and raw not in spec.choices:
                raise ValidationError(f"training argument {key}={raw!r}: expected one of {list(spec.choices)}")
            typed[key] = raw
        if spec.kind == "choice" and raw == "":
            continue  # the default (fsdp ''): a flag with an empty value would not survive a shell
        flags += [spec.flag, raw]
    try:
        StableAlignmentConfig(model="-", data="-", **typed)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ValidationError(f"training arguments: {exc}") from None
    return flags


def check_gpus(gpus: int, settings: TrainerSettings) -> None:
    """A job's GPUs per node within what the operator allows (``trainer_max_gpus``): a requester must not be
    able to ask a node for more than the operator sized the pool (or this machine) for."""
    if gpus < 0 or gpus > settings.trainer_max_gpus:
        raise ValidationError(f"gpus must be between 0 and {settings.trainer_max_gpus} "
                              f"({env_name('trainer_max_gpus')}), got {gpus}")


def metrics_from_json(text: str) -> dict[str, float]:
    """The numeric fields of one train_log.jsonl record (``loss``, ``loss/sft``, ``step``...); {} otherwise."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(record, dict) or "event" in record or ("loss" not in record and "step" not in record):
        return {}  # not a train_log.jsonl record (e.g. a structured log line)
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


_PROGRESS = re.compile(r"\|\s*(\d+)/(\d+)\b.*?\bloss=([-+0-9.eE]+)(?:.*?\btok_s=([0-9.eE+]+))?")


def metrics_from_progress(line: str) -> dict[str, float]:
    """Step, loss and tokens/s from the trainer's progress bar (``2/7 [..., loss=9.04, tok_s=262]``).

    A Kubernetes job's train_log.jsonl is on the pod's volume; its log stream is what we see.
    """
    match = _PROGRESS.search(line)
    if not match:
        return {}
    step, total, loss, tok_s = match.groups()
    values = {"step": float(step), "total_steps": float(total)}
    try:
        values["loss"] = float(loss)
        if tok_s:
            values["tokens_per_second"] = float(tok_s)
    except ValueError:
        pass
    return values


class JobReporter(Protocol):
    """What a runner tells the scheduler while a job runs."""

    # Time of the last log line stored before a re-attach (a resumed log stream skips older lines).
    last_log_time: float

    async def log(self, line: str, at: float | None = None) -> None: ...

    async def metrics(self, values: Mapping[str, float]) -> None: ...

    async def handle(self, handle: str) -> None: ...

    async def note(self, message: str) -> None: ...


@dataclass(frozen=True)
class RunResult:
    state: int  # a terminal trainer_pb2.JobState
    exit_code: int = 0
    message: str = ""


class Runner(abc.ABC):
    """A place where training jobs run."""

    name: str = ""
    # Whether a job outlives the trainer service (then it is re-attached after a restart).
    detached: bool = False

    @abc.abstractmethod
    def prepare(self, spec: trainer_pb2.JobSpec) -> trainer_pb2.JobSpec:
        """Validates ``spec`` for this runner (ValidationError) and returns it with defaults filled."""

    @abc.abstractmethod
    async def run(self, job: trainer_pb2.Job, reporter: JobReporter, *, reattach: bool = False) -> RunResult:
        """Runs (or, with ``reattach``, resumes watching) the job until it ends.

        Cancelling the task stops watching; a local runner also stops the process.
        """

    @abc.abstractmethod
    async def cancel(self, job: trainer_pb2.Job) -> None:
        """Asks the job to stop; ``run`` then returns."""

    async def close(self) -> None:
        """Releases clients and threads (service shutdown)."""
