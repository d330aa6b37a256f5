"""The world-spec options of `stable-align run` and `pipeline`, generated from the world service's table.

Each option that sets a WorldSpec field is one ``services.world.spec.SpecField``: its flag, type,
default, choices and help are read from there, as ``stable-align train``'s options are read from
``StableAlignmentConfig`` (``stablealign.training.cli``), so the command line, :func:`build_spec
<services.world.spec.build_spec>`, the bench and CreateWorld's checks cannot drift apart. The
environment variable of each option (``STABLEALIGN_RUN_SEED``) is set by ``cli.rules`` like every
other option's. Bounds are not checked here: the world service checks them, so a spec sent by any
client meets the same rule and the same message.
"""

from __future__ import annotations

import enum
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import typer

from services.world.spec import FIELDS, OPTION_FIELDS, SpecField


@functools.cache
def choice_type(field: SpecField) -> type[enum.Enum]:
    """The option's choices as the str enum typer shows (``Setting``: all_good|all_bad|...)."""
    return enum.Enum(field.name.title().replace("_", ""), {c: c for c in field.choices}, type=str)


def _fields(names: Iterable[str] | None) -> list[SpecField]:
    if names is None:
        return list(OPTION_FIELDS)
    fields = []
    for name in names:
        field = FIELDS.get(name)
        if field is None or not field.option:
            raise TypeError(f"{name!r} is not a world-spec option (services.world.spec.SPEC_FIELDS)")
        fields.append(field)
    return fields


def spec_parameters(names: Iterable[str] | None = None,
                    help: Mapping[str, str] | None = None) -> list[inspect.Parameter]:
    """The options of the world-spec fields ``names`` (default: all of run's), as keyword-only typer
    parameters; ``help`` replaces a field's help where a command gives the value a wider job (the
    pipeline's ``--seed`` also seeds training)."""
    help = help or {}
    params = []
    for field in _fields(names):
        annotation: Any = choice_type(field) if field.choices else field.kind
        default = annotation(field.default) if field.choices else field.default
        info = typer.Option(default, field.cli_flag, help=help.get(field.name, field.help), show_default=True)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    return params


def with_spec_options(names: Iterable[str] | None = None, *,
                      help: Mapping[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Adds the options of the world-spec fields ``names`` (default: all of run's) to a typer command.

    The command function takes ``spec_options: dict[str, Any]`` — every one of those fields' values by
    field name (a choice as its string) — besides its own typer parameters, which follow them.
    """
    generated = spec_parameters(names, help)
    spec_names = [p.name for p in generated]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(func).parameters.values() if p.name != "spec_options"]
        clash = sorted(set(spec_names) & {p.name for p in own})
        if clash:
            raise TypeError(f"{func.__name__}: parameters {clash} are world-spec options already")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in spec_names}
            values = {name: getattr(value, "value", value) for name, value in values.items()}
            return func(spec_options=values, **kwargs)

        command.__signature__ = inspect.Signature([*generated, *own])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in (*generated, *own)}
        return command

    return decorate


def spec_args(values: Mapping[str, Any]) -> list[str]:
    """The `stable-align run` flags that give these world-spec fields these values (``--size 3 ...``)."""
    args: list[str] = []
    for name, value in values.items():
        args += [_fields([name])[0].cli_flag, str(getattr(value, "value", value))]
    return args
