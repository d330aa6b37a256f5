"""`stable-align serve agent|observer|world|trainer`: one service process in the foreground.

Each service package exposes ``SETTINGS`` (a ``ServiceSettings`` dataclass) and
``build(context) -> ServiceParts`` in ``services/<name>/main.py``; service-specific settings
come from ``STABLEALIGN_<FIELD>`` environment variables. The flags are generated from the settings
(``SETTING_FLAGS``: type and help of each field), and every flag reads the variable of the setting it
overrides (``--grpc-port`` -> ``STABLEALIGN_GRPC_PORT``; set by ``stablealign_app.cli.rules``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

import typer

from stablealign.core.config import load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.logs import current_logging
from stablealign.core.process import setup_process
from stablealign.nats.auth import NotAuthorizedError
from stablealign.serving.service import serve_forever
from stablealign.serving.settings import ServiceSettings
from stablealign_app.cli.rules import get_current_context, nats_setting_values


class ServiceName(str, Enum):
    agent = "agent"
    observer = "observer"
    world = "world"
    trainer = "trainer"


# The service settings that are flags of `serve` (every setting also reads STABLEALIGN_<FIELD>): --<field>,
# dashed, except nats_url, whose flag is the --nats every command shares. Their type and help are the
# setting's own (ServiceSettings); --log-level/--log-format are every command's (cli.rules).
SETTING_FLAGS = ("nats_url", "grpc_port", "metrics_port", "grpc_host", "metrics_host", "instance", "grpc_tls_cert",
                 "grpc_tls_key", "grpc_tls_client_ca", "grpc_health_port")
FLAG_NAMES = {"nats_url": "--nats"}


def setting_parameters(settings: type[ServiceSettings] = ServiceSettings,
                       names: tuple[str, ...] = SETTING_FLAGS) -> list[inspect.Parameter]:
    """One typer option per setting (default None: not given, so the variable or the setting's default applies)."""
    params = []
    for name in names:
        field = settings.model_fields[name]
        if field.annotation not in (int, float, str):
            raise TypeError(f"{settings.__name__}.{name}: {field.annotation!r} has no flag form here")
        info = typer.Option(None, FLAG_NAMES.get(name, "--" + name.replace("_", "-")), help=field.description)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=field.annotation | None))
    return params


def with_setting_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the setting options to a typer command; ``func`` takes ``flags: dict[str, Any]`` (by setting
    name; None: not given) besides its own parameters, which come first."""
    hints = typing.get_type_hints(func)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(func).parameters.values() if p.name != "flags"]
    generated = setting_parameters()
    names = [p.name for p in generated]

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        return func(*args, flags={name: kwargs.pop(name) for name in names}, **kwargs)

    command.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in (*own, *generated)}
    return command


@with_setting_options
def serve(service: ServiceName = typer.Argument(..., help="Which service to run."), *,
          flags: dict[str, Any]) -> None:
    """Run one service until SIGTERM, then drain in-flight work and exit 0."""
    module = importlib.import_module(f"services.{service.value}.main")
    # What `stable-align --log-level/--log-format`, `serve --log-level/--log-format` or their variables set.
    level, fmt = current_logging()
    overrides = {**flags, "log_level": level, "log_format": fmt,
                 **nats_setting_values(get_current_context(silent=True))}
    try:
        settings = load_settings(module.SETTINGS, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_process(settings, lock=True)
    try:
        code = asyncio.run(serve_forever(service.value, settings, module.build))
    except ConfigError as exc:  # e.g. a busy port at start: one line, not a traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except NotAuthorizedError as exc:  # NATS refused the credentials: retrying them cannot help
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(NotAuthorizedError.EXIT_CODE) from None
    raise typer.Exit(code)

