"""The training command line, generated from ``StableAlignmentConfig``: one option per config field.

Each field ``some_field`` is ``--some-field VALUE`` (``--some-field/--no-some-field`` for a
boolean), typed by its annotation, with the help of its metadata. An option not given is absent
from the resulting overrides, so the dataclass default applies and ``__post_init__`` is the one
place that checks values: a bad value is one ``error: ...`` line and exit code 2. The shorter
spellings of the first command line stay as aliases (``--lr``, ``--epochs``, ``--batch-size``,
``--grad-accum``, ``--out``, ``--mean-flow``). Each option also reads one environment variable,
``STABLEALIGN_TRAIN_<FIELD>`` (``STABLEALIGN_TRAIN_LEARNING_RATE``; flags win): the name
``stable-align train`` gives it too (``STABLEALIGN_<CMD>_<FLAG>``), and one no service setting has,
so a job never picks up its trainer's ``STABLEALIGN_METRICS_PORT``. ``--model``, ``--data`` and
``--out`` are required.

Used by ``python -m stablealign.training.train`` (:func:`train_module_command`, the torchrun entry
of the trainer service's jobs), by ``stable-align train`` (:func:`with_config_options` adds the
options to a command that has its own, e.g. ``--submit``), and by the trainer service's runners
(:func:`config_options` describes the flags of every field). Importing this module is cheap:
typer is imported by the functions that build commands, torch only by a training run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stablealign.core.errors import StableAlignError
from stablealign.core.process import setup_process
from stablealign.training.config import StableAlignmentConfig
from stablealign.training.data import load_alignment_groups
from stablealign.training.train import check_model_path, train

ENV_PREFIX = "STABLEALIGN_TRAIN_"
# Older, shorter spellings (README, docs, tests, the trainer's job args): they keep working.
ALIASES: dict[str, tuple[str, ...]] = {
    "output_dir": ("--out",),
    "learning_rate": ("--lr",),
    "num_train_epochs": ("--epochs",),
    "per_device_train_batch_size": ("--batch-size",),
    "gradient_accumulation_steps": ("--grad-accum",),
}
# Older spellings of a boolean's "false" flag (besides --no-<field>).
NEGATIVE_ALIASES: dict[str, tuple[str, ...]] = {"max_flow": ("--mean-flow",)}
# Fields a training command cannot do without (their dataclass defaults are placeholders).
REQUIRED = ("model", "data", "output_dir")
KINDS = (bool, int, float, str)


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(flag: str) -> str:
    """``--learning-rate`` -> ``STABLEALIGN_TRAIN_LEARNING_RATE``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True)
class ConfigOption:
    """The command-line form of one ``StableAlignmentConfig`` field."""

    name: str  # the field
    kind: type  # bool | int | float | str
    flag: str  # --field-name
    aliases: tuple[str, ...]  # older spellings of the same option
    negatives: tuple[str, ...]  # a boolean's "false" flags: --no-field-name, then older spellings
    choices: tuple[str, ...]  # a string field's allowed values (metadata "choices"), () when free
    help: str
    default: Any
    required: bool

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *self.aliases)

    @property
    def compat_flag(self) -> str:
        """The oldest spelling: what a trainer image from before this module understands too."""
        return self.aliases[0] if self.aliases else self.flag

    @property
    def compat_negative(self) -> str:
        """A boolean's oldest "false" spelling ("" for other kinds)."""
        return self.negatives[-1] if self.negatives else ""

    @property
    def envvar(self) -> str:
        return env_name(self.flag)


@functools.cache
def config_options() -> tuple[ConfigOption, ...]:
    """One :class:`ConfigOption` per ``StableAlignmentConfig`` field, in field order."""
    hints = typing.get_type_hints(StableAlignmentConfig)
    options = []
    for f in dataclasses.fields(StableAlignmentConfig):
        kind = hints[f.name]
        if kind not in KINDS:
            raise TypeError(f"StableAlignmentConfig.{f.name}: {kind!r} has no command-line form (bool, int, float "
                            f"or str)")
        negatives = (_dashed("no_" + f.name), *NEGATIVE_ALIASES.get(f.name, ())) if kind is bool else ()
        options.append(ConfigOption(
            name=f.name, kind=kind, flag=_dashed(f.name), aliases=ALIASES.get(f.name, ()), negatives=negatives,
            choices=tuple(f.metadata.get("choices", ())), help=f.metadata.get("help", ""), default=f.default,
            required=f.name in REQUIRED))
    seen: dict[str, str] = {}
    for option in options:
        for flag in (*option.flags, *option.negatives):
            if seen.setdefault(flag, option.name) != option.name:
                raise TypeError(f"flag {flag} names both {seen[flag]} and {option.name}")
    return tuple(options)


def _shown_default(option: ConfigOption) -> str:
    if option.kind is bool:
        return "true" if option.default else "false"
    if option.default == "":
        return "''"
    return str(option.default)


def typer_parameters() -> list[inspect.Parameter]:
    """The options as the keyword-only parameters of a typer command function (default None: not given)."""
    import typer

    params = []
    for option in config_options():
        if option.kind is bool:
            # click takes extra "false" spellings as declarations with an empty "true" side.
            decls = [f"{option.flag}/{option.negatives[0]}", *(f" /{flag}" for flag in option.negatives[1:])]
            decls += [f"{alias}/{_dashed('no_' + alias[2:])}" for alias in option.aliases]
        else:
            decls = list(option.flags)
        info = typer.Option(... if option.required else None, *decls, envvar=option.envvar, help=option.help,
                            show_default=False if option.required else _shown_default(option))
        annotation = option.kind if option.required else option.kind | None
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    return params


def with_config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds one option per config field to a typer command function.

    ``func`` takes ``config: dict[str, Any]`` — the fields that were given (flag or environment),
    by field name; a field not given is absent — besides its own typer parameters, which it keeps.
    """
    hints = typing.get_type_hints(func)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(func).parameters.values() if p.name != "config"]
    generated = typer_parameters()
    names = [p.name for p in generated]
    clash = sorted(set(names) & {p.name for p in own})
    if clash:
        raise TypeError(f"{func.__name__}: parameters {clash} are config fields already")

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        config = {name: value for name in names if (value := kwargs.pop(name, None)) is not None}
        return func(config=config, **kwargs)

    command.__signature__ = inspect.Signature([*generated, *own])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in (*generated, *own)}
    return command


def fail(exc: BaseException) -> typing.NoReturn:
    """One ``error: ...`` line on stderr, exit code 2."""
    import typer

    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2) from None


def _setup_logging() -> None:
    """INFO lines, in the format of ``STABLEALIGN_LOG_FORMAT`` / level of ``STABLEALIGN_LOG_LEVEL`` when set
    (a training job's pod sets the format; a command line that set up logging already keeps its choice)."""
    setup_process()


def run_training(config: dict[str, Any], stop_after: int | None = None) -> None:
    """Builds the config from the given fields, trains, and prints how the run ended.

    A bad value, a missing model or a malformed data file is one ``error: ...`` line and exit code 2.
    """
    import typer

    try:
        cfg = StableAlignmentConfig(**config)
        check_model_path(cfg.model)  # before the heavy imports: a typo fails in a second
        _setup_logging()
        result = train(cfg, stop_after_steps=stop_after)
    except (StableAlignError, FileNotFoundError) as exc:
        fail(exc)
    if result.stopped_early:
        typer.echo(f"stopped after step {result.steps}/{result.total_steps} (as asked); resume with the same command")
    else:
        loss = "-" if result.final_loss is None else f"{result.final_loss:.6f}"
        typer.echo(f"trained {result.steps} steps (resumed from {result.resumed_from}); final loss {loss}; "
                   f"model in {result.output_dir}")


def check_training(config: dict[str, Any]) -> StableAlignmentConfig:
    """What a run would refuse before its first step, checked without loading a model: the config's own
    checks, the model directory, and every line of the data file. Raises ``StableAlignError``."""
    cfg = StableAlignmentConfig(**config)
    check_model_path(cfg.model)
    load_alignment_groups(cfg.data, max_chars=cfg.dataloader_max_chars, rating_scale=cfg.rating_scale)
    return cfg


TRAIN_HELP = "Stable Alignment training (accelerate; torchrun + FSDP on GPUs); resumable."
STOP_AFTER_HELP = "Tests: stop after N steps of this run, as if killed."
CHECK_ONLY_HELP = ("Check the flags, the model directory and the data file, then exit (0: a run would start; "
                   "2: it would not). The training Job's launcher runs this before torchrun.")


def train_module_command() -> Any:
    """The click command of ``python -m stablealign.training.train``: the config options, ``--stop-after``
    and ``--check-only``."""
    import typer

    def train_entry(config: dict[str, Any],
                    stop_after: int | None = typer.Option(None, "--stop-after", hidden=True,
                                                          help=STOP_AFTER_HELP),
                    check_only: bool = typer.Option(False, "--check-only", help=CHECK_ONLY_HELP)) -> None:
        if check_only:
            try:
                check_training(config)
            except (StableAlignError, FileNotFoundError) as exc:
                fail(exc)
            return
        run_training(config, stop_after)

    train_entry.__doc__ = TRAIN_HELP
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(with_config_options(train_entry))
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """``python -m stablealign.training.train`` (the torchrun entry): the config options of ``stable-align train``
    (one per ``StableAlignmentConfig`` field), ``--stop-after`` and ``--check-only``."""
    train_module_command().main(args=argv, prog_name="python -m stablealign.training.train")
