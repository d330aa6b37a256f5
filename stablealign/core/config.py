"""Settings from environment variables with typed defaults: one loader, built on pydantic-settings.

Every service describes its settings as a frozen ``Settings`` subclass (a pydantic-settings
``BaseSettings``) whose constraints are declared on the fields (``Field(ge=1)``, ``Literal[...]``;
a model validator only where a rule spans fields). Values come from defaults < ``STABLEALIGN_<FIELD>``
environment variables < explicit overrides (CLI flags win). Sequence fields read comma-separated
values; booleans accept true/false/1/0/yes/no/on/off. A bad value fails fast with a one-line
``ConfigError`` that names the environment variable, never a pydantic error dump.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from stablealign.core.errors import ConfigError
from stablealign.core.settings import process_environ

ENV_PREFIX = "STABLEALIGN_"
T = TypeVar("T", bound="Settings")

# What ``load_settings`` was given, for the settings being built in this context (thread / task).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("settings_environ", default=None)
_PREFIX: ContextVar[str | None] = ContextVar("settings_prefix", default=None)


def env_name(field_name: str, prefix: str = ENV_PREFIX) -> str:
    return f"{prefix}{field_name.upper()}"


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _is_sequence(annotation: Any) -> bool:
    if _is_optional(annotation):
        return any(_is_sequence(a) for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) in (tuple, list, set, frozenset)


def _from_env(raw: str, field: FieldInfo) -> Any:
    """The raw variable as pydantic should see it: comma-separated items for sequences, None for an
    optional field set to "" or "none"; everything else stays a string that the field's type converts."""
    annotation = field.annotation
    if annotation is str:
        return raw
    value = raw.strip()
    if _is_optional(annotation) and value.lower() in ("", "none"):
        return None
    if _is_sequence(annotation):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class EnvironSource(PydanticBaseSettingsSource):
    """``<prefix><FIELD>`` variables from ``os.environ``, or from the mapping given to ``load_settings``."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.environ: Mapping[str, str] = process_environ(_ENVIRON.get())
        self.prefix = _settings_prefix(settings_cls)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = env_name(field_name, self.prefix)
        return self.environ.get(name), name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            raw, _, _ = self.get_field_value(field, field_name)
            if raw is not None:
                values[field_name] = _from_env(raw, field)
        return values


def _settings_prefix(cls: type[BaseSettings]) -> str:
    """The prefix given to ``load_settings``, else the class's own ("" for variables that other tools
    name, such as ``WORLD_SIZE``), else ``STABLEALIGN_``."""
    for prefix in (_PREFIX.get(), cls.model_config.get("env_prefix")):
        if prefix is not None:
            return prefix
    return ENV_PREFIX


_TYPE_TEXT = {
    "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
    "float_parsing": "expected a number", "float_type": "expected a number",
    "bool_parsing": "expected a boolean (true/false)", "bool_type": "expected a boolean (true/false)",
    "string_type": "expected a string",
    "tuple_type": "expected a comma-separated list", "list_type": "expected a comma-separated list",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _one_problem(cls: type[BaseSettings], error: Mapping[str, Any], prefix: str) -> str:
    kind, loc, ctx = error["type"], error.get("loc") or (), error.get("ctx") or {}
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc or not isinstance(loc[0], str):
        return message  # a rule across fields: its validator's message names the variables
    field = loc[0]
    if kind == "extra_forbidden":
        return f"unknown setting {field!r} for {cls.__name__}"
    name = env_name(field, prefix)
    value = error.get("input")
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx.get(key)
        return f"{name} must be {op} {format(bound, 'g') if isinstance(bound, float) else bound}, got {value}"
    if kind == "literal_error":
        return f"{name}={value!r}: must be {str(ctx.get('expected', '')).replace(chr(39), '')}"
    return f"{name}={value!r}: {_TYPE_TEXT.get(kind, message)}"


def config_error(cls: type[BaseSettings], exc: ValidationError, prefix: str | None = None) -> ConfigError:
    """pydantic's ValidationError as one line naming each bad variable."""
    prefix = prefix or _settings_prefix(cls)
    problems = list(dict.fromkeys(_one_problem(cls, e, prefix) for e in exc.errors(include_url=False)))
    return ConfigError("; ".join(problems).replace("\n", " "))


class Settings(BaseSettings):
    """Base of every settings class: frozen (hashable), ``STABLEALIGN_<FIELD>`` variables, typos rejected.

    Constructing one reads the environment too (pydantic-settings); ``load_settings`` is the entry
    point that also takes an explicit environment mapping and ignores None overrides. Other
    ``STABLEALIGN_*`` variables are ignored: only the fields' own variables are read.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(type(self), exc) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, EnvironSource(settings_cls)  # explicit values win over the environment


@contextmanager
def _environment(environ: Mapping[str, str] | None, prefix: str | None) -> Iterator[None]:
    environ_token, prefix_token = _ENVIRON.set(environ), _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(prefix_token)
        _ENVIRON.reset(environ_token)


def load_settings(cls: type[T], overrides: Mapping[str, Any] | None = None, *,
                  environ: Mapping[str, str] | None = None, prefix: str | None = None) -> T:
    """Builds ``cls`` from defaults < environment < overrides (None overrides are ignored).

    ``environ``: the variables to read instead of ``os.environ``; ``prefix``: instead of the class's
    ``env_prefix``. ConfigError (one line, naming the variable) for a bad value or an unknown override.
    """
    if not (isinstance(cls, type) and issubclass(cls, Settings)):
        raise TypeError(f"{cls!r} is not a stablealign.core.config.Settings class")
    values: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in cls.model_fields:
            raise ConfigError(f"unknown setting {key!r} for {cls.__name__}")
        values[key] = value
    with _environment(environ, prefix):
        return cls(**values)


def _nats_url(url: str) -> str:
    if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
        raise ValueError("expected a nats:// URL")
    return url


NatsUrl = Annotated[str, AfterValidator(_nats_url)]
Port = Annotated[int, Field(ge=-1, le=65535)]


class ProcessSettings(Settings):
    """What any process of the product reads, a service or not (a training job, a worker): its log lines and
    its /metrics address (``stablealign.core.process.setup_process`` applies the first)."""

    log_level: str = "INFO"
    log_format: Literal["json", "console", "auto"] = Field(
        "auto", description="json | console | auto (json in a Kubernetes pod, human lines elsewhere).")
    metrics_host: str = Field("127.0.0.1", description="/metrics bind address.")


class PathSettings(Settings):
    """Where the product finds its files and programs; each default is resolved by its reader (the
    repository's folders), so "" means "the default"."""

    data_dir: str = Field("", description="SANDBOX data (stablealign.sandbox.data); default: shared/data beside the "
                                          "repository or the working directory.")
    cache_dir: str = Field("", description="Embedding vector cache; off/0/false/no/none: no cache; default: "
                                           "$XDG_CACHE_HOME/stablealign or ~/.cache/stablealign.")
    models_dir: str = Field("", description="Where `stable-align model pull` puts models; default: models/ at "
                                            "the repository root.")
    model_roots: str = Field("", description="Directories whose models a request may name, comma-separated "
                                             "(default: models_dir).")
    nats_server_bin: str = Field("", description="The nats-server program (default: beside Python, then $PATH).")


class BackendSettings(Settings):
    """The LLM backends' own defaults, read when a backend is built."""

    openai_chat_model: str = Field("", description="Chat model of the openai backend when a request names none.")
    llm_max_concurrency: int | None = Field(None, ge=1, description=(
        "Calls one backend admits at once; default: what the backend can serve (stablealign.llm.backends)."))


class TrainingProcessSettings(Settings):
    """What a training process reads besides its config: how it was started."""

    fsdp_cpu: bool = Field(True, description="Without a GPU, shard the model with FSDP on the CPU (gloo) when "
                                             "launched with several processes; false: plain data parallel.")
    job_id: str = Field("", description="Set by the trainer service for the runs it starts: progress goes out "
                                        "as job rows.")


class HostSettings(Settings):
    """Variables that other tools set, read under their own names (no prefix)."""

    model_config = SettingsConfigDict(env_prefix="")

    kubernetes_service_host: str = Field("", description="Set in a Kubernetes pod: log lines default to JSON.")
    xdg_cache_home: str = Field("", description="The user's cache folder (XDG).")
    openai_base_url: str = Field("", description="The OpenAI SDK's server URL.")


class LaunchSettings(Settings):
    """A distributed launcher's variables (torchrun, accelerate), under their own names."""

    model_config = SettingsConfigDict(env_prefix="")

    world_size: int = Field(1, ge=1, description="Processes in the training run.")
    rank: int = Field(0, ge=0, description="This process's rank.")


class NatsClientSettings(Settings):
    """A NATS client's credentials and TLS (``stablealign.nats.auth.NatsClientOptions``), part of every
    service's settings; the server's users and their permissions come from stablealign/nats/permissions.py."""

    nats_user: str = Field("", description="NATS user (one per role: world, agent, observer, trainer, cli).")
    nats_password: str = Field("", repr=False, description="Password of the NATS user (prefer the _FILE variant).")
    nats_password_file: str = Field("", description="File holding the NATS user's password (e.g. a mounted Secret).")
    nats_creds: str = Field("", description="NATS .creds file (JWT + NKey seed), instead of a user and password.")
    nats_ca: str = Field("", description="PEM file of the CA that signed the NATS server's certificate (tls://).")
    nats_tls_cert: str = Field("", description="Client certificate for NATS mutual TLS (with nats_tls_key).")
    nats_tls_key: str = Field("", description="Key of the NATS client certificate.")
    nats_inbox_prefix: str = Field("", description=(
        "Prefix of this client's reply subjects; \"\": _INBOX_<nats_user> (the only inboxes the server lets that "
        "user subscribe), _INBOX without a user. Set it for a .creds user or a server that allows only _INBOX."))
    nats_world_js_prefix: str = Field("", description=(
        "JetStream API prefix of the world's streams (records, memories, worlds bucket); \"\": $JS.API. A user of "
        "the secured server's CLIENTS account (cli, agent, observer) sets $JS.WORLD.API."))
    nats_trainer_js_prefix: str = Field("", description=(
        "JetStream API prefix of the trainer's streams (job logs, jobs bucket); \"\": $JS.API. A user of the "
        "secured server's CLIENTS account (cli) sets $JS.TRAINER.API."))
