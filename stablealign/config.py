"""Settings from environment variables with typed defaults.

Every service describes its settings as a frozen dataclass; ``load_settings`` fills it from
``STABLEALIGN_<FIELD>`` variables, then from explicit overrides (CLI flags win), converting each
value to the field's type and failing fast with the variable's name on a bad value.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from stablealign.errors import ConfigError

ENV_PREFIX = "STABLEALIGN_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(field_name: str, prefix: str = ENV_PREFIX) -> str:
    return f"{prefix}{field_name.upper()}"


def _convert(raw: str, target: Any, name: str) -> Any:
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(target) if a is not type(None)]
        if raw.strip() == "" or raw.strip().lower() == "none":
            return None
        return _convert(raw, args[0], name)
    if target is bool:
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r}: expected a boolean (true/false)")
    if target is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if target is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if target is str:
        return raw
    if origin in (tuple, list):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        (inner, *_) = typing.get_args(target) or (str,)
        converted = [_convert(s, inner, name) for s in items]
        return tuple(converted) if origin is tuple else converted
    raise ConfigError(f"{name}: unsupported setting type {target!r}")


def load_settings(cls: type[T], overrides: Mapping[str, Any] | None = None, *,
                  environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> T:
    """Builds ``cls`` from defaults < environment < overrides (None overrides are ignored)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = env_name(field.name, prefix)
        if name in environ:
            values[field.name] = _convert(environ[name], hints[field.name], name)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in hints:
            raise ConfigError(f"unknown setting {key!r} for {cls.__name__}")
        values[key] = value
    try:
        settings = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """What every service process needs; services extend it with their own fields."""

    nats_url: str = "nats://127.0.0.1:4222"
    grpc_port: int = 0  # 0: pick a free port (logged); -1: no gRPC server
    grpc_host: str = "127.0.0.1"
    metrics_port: int = -1  # -1: no /metrics server; 0: pick a free port
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "auto"  # json | console | auto (json when stderr is not a terminal)
    # Requests in flight at once per process (NATS handlers and gRPC calls).
    max_concurrency: int = 256
    # Largest request accepted, bytes (gRPC and NATS).
    max_request_bytes: int = 1 << 20
    # Seconds to finish in-flight work after SIGTERM.
    shutdown_grace_seconds: float = 30.0
    instance: str = ""

    def validate(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError(f"{env_name('nats_url')}={self.nats_url!r}: expected a nats:// URL")
        if self.max_concurrency < 1:
            raise ConfigError(f"{env_name('max_concurrency')} must be >= 1")
        if self.log_format not in ("json", "console", "auto"):
            raise ConfigError(f"{env_name('log_format')} must be json, console or auto")
