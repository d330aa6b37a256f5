"""The rules every `stable-align` command follows, applied in one place: to the whole click command
tree, once it is built (:class:`RootGroup`), so no command can forget one.

Environment (``apply_rules``): every option reads one environment variable; flags win.

- Options that mean the same thing in every command share one: ``--nats`` -> ``STABLEALIGN_NATS_URL``,
  ``--log-level`` -> ``STABLEALIGN_LOG_LEVEL``, ``--log-format`` -> ``STABLEALIGN_LOG_FORMAT``.
- Every option of ``serve`` is a service setting: ``STABLEALIGN_<FLAG>`` (``--grpc-port`` ->
  ``STABLEALIGN_GRPC_PORT``), the names the services' settings read (DESIGN §3).
- Every other option of command ``CMD`` reads ``STABLEALIGN_<CMD>_<FLAG>``: the command path and the
  flag's first long name, spaces and dashes as underscores, upper case (``run --seed`` ->
  ``STABLEALIGN_RUN_SEED``, ``data build --out`` -> ``STABLEALIGN_DATA_BUILD_OUT``). So one export
  never changes another command.

Fail fast, in one line (``error: ...``):

- ``--nats`` must be a NATS URL (``nats://``, ``tls://``, ``ws://`` or ``wss://`` HOST:PORT; a bare
  ``host:port`` is refused like any other): a usage error (exit 2), checked when the option is read.
- ``--out`` must be writable (or creatable) before the command does anything (exit 2); not for
  ``jobs submit`` and ``train --submit``, whose ``--out`` is a path on the trainer's side.
- Usage errors (unknown flag, bad value, missing option) are one line and exit code 2; a command
  group given no command prints its help and exits 2. Runtime failures (a NATS server that cannot
  be reached within a few seconds, a failed world) exit 1.

Logging: ``--log-level``/``--log-format`` are options of the root (``stable-align --log-format json
run ...``) and of every command (``stable-align run --log-format json``); see ``stablealign.core.logs``.
"""

from __future__ import annotations

import enum
import functools
import inspect
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from stablealign.core.logs import current_logging
from stablealign.core.process import setup_process

try:  # typer >= 0.2x carries its own copy of click: the command tree is made of its classes
    from typer._click import exceptions as click_exceptions
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # an older typer builds on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
    from click.core import ParameterSource  # type: ignore[no-redef]
    from click.globals import get_current_context  # type: ignore[no-redef]

NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())

ENV_PREFIX = "STABLEALIGN_"
# How a command proves who it is to NATS (stablealign.nats.auth): options of every command that has --nats,
# named like the service settings they are (--nats-user -> STABLEALIGN_NATS_USER = ServiceSettings.nats_user).
NATS_AUTH_ENV = {"--nats-user": "STABLEALIGN_NATS_USER", "--nats-password": "STABLEALIGN_NATS_PASSWORD",
                 "--nats-password-file": "STABLEALIGN_NATS_PASSWORD_FILE", "--nats-creds": "STABLEALIGN_NATS_CREDS",
                 "--nats-ca": "STABLEALIGN_NATS_CA", "--nats-tls-cert": "STABLEALIGN_NATS_TLS_CERT",
                 "--nats-tls-key": "STABLEALIGN_NATS_TLS_KEY", "--nats-inbox-prefix": "STABLEALIGN_NATS_INBOX_PREFIX",
                 "--nats-world-js-prefix": "STABLEALIGN_NATS_WORLD_JS_PREFIX",
                 "--nats-trainer-js-prefix": "STABLEALIGN_NATS_TRAINER_JS_PREFIX"}
SHARED_ENV = {"--nats": "STABLEALIGN_NATS_URL", "--log-level": "STABLEALIGN_LOG_LEVEL",
              "--log-format": "STABLEALIGN_LOG_FORMAT", **NATS_AUTH_ENV}
NATS_AUTH_HELP = {
    "--nats-user": "NATS user (the server's users: world, agent, observer, trainer, cli).",
    "--nats-password": "Password of the NATS user (prefer its variable or --nats-password-file).",
    "--nats-password-file": "File holding the NATS user's password.",
    "--nats-creds": "NATS .creds file (JWT + NKey seed), instead of a user and password.",
    "--nats-ca": "CA file that signed the NATS server's certificate (tls:// URLs).",
    "--nats-tls-cert": "Client certificate for NATS mutual TLS.",
    "--nats-tls-key": "Key of the client certificate.",
    "--nats-inbox-prefix": "Prefix of this command's reply subjects (default: _INBOX_<user>, the user's own).",
    "--nats-world-js-prefix": "JetStream API prefix of the world's streams (default: $JS.API; the secured "
                              "server's cli user: $JS.WORLD.API).",
    "--nats-trainer-js-prefix": "JetStream API prefix of the trainer's streams (default: $JS.API; the secured "
                                "server's cli user: $JS.TRAINER.API).",
}
_NATS_META = "stablealign.nats_auth"
# Commands whose options are service settings: STABLEALIGN_<FLAG>, no command in the name.
SERVICE_COMMANDS = ("serve",)
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
# Commands whose --out names a file (the others: a directory) or a path on another machine.
OUT_IS_FILE = ("data build", "data hh-sft", "export", "judge")
OUT_IS_REMOTE = ("jobs submit",)
LogLevel = enum.Enum("LogLevel", {name: name for name in ("debug", "info", "warning", "error", "critical")},
                     type=str)
LogFormat = enum.Enum("LogFormat", {name: name for name in ("auto", "console", "json")}, type=str)
LOG_LEVELS = tuple(level.value for level in LogLevel)
LOG_FORMATS = tuple(fmt.value for fmt in LogFormat)
LOG_LEVEL_HELP = "Log level of this process (and of the services it runs)."
LOG_FORMAT_HELP = ("auto: JSON in a Kubernetes pod, human lines elsewhere; console: human lines; json: one JSON "
                   "object per line.")


def env_var(command_path: Sequence[str], flag: str) -> str:
    """The environment variable of ``flag`` (its first long name) in command ``command_path``."""
    if flag in SHARED_ENV:
        return SHARED_ENV[flag]
    name = flag.lstrip("-")
    words = [name] if command_path and command_path[0] in SERVICE_COMMANDS else [*command_path, name]
    return ENV_PREFIX + "_".join(words).replace("-", "_").replace(" ", "_").upper()


def is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def primary_flag(option: Any) -> str:
    """The name the environment variable comes from: ``--nats`` if the option has it, else its first long name."""
    longs = [o for o in option.opts if o.startswith("--")]
    if "--nats" in longs:
        return "--nats"
    return longs[0] if longs else option.opts[0]


def check_nats_url(ctx: Any, param: Any, value: Any) -> Any:
    """A click callback: ``value`` must be a NATS URL (or empty: the command's default applies)."""
    if value in (None, ""):
        return value
    scheme, sep, rest = str(value).partition("://")
    if not sep or scheme.lower() not in NATS_SCHEMES or not rest.strip("/"):
        source = ctx.get_parameter_source(param.name) if param.name else None
        origin = f" (from {param.envvar})" if source is ParameterSource.ENVIRONMENT else ""
        raise typer.BadParameter(f"{value!r}{origin} is not a NATS URL: expected nats://HOST:PORT "
                                 f"(or tls://, ws://, wss://)", ctx=ctx, param=param)
    return value


def unwritable(path: Path, *, directory: bool) -> str | None:
    """Why ``path`` cannot be written (created if missing), or None. Nothing is created."""
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            return f"{path} exists and is not a directory"
        if not directory and path.is_dir():
            return f"{path} is a directory"
        if directory and not _can_create_in(path):
            return f"{path} is not writable"
        if not directory and not _can_create_in(path.parent):
            return f"{path.parent} is not writable"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is a file, not a directory"
    if not _can_create_in(ancestor):
        return f"cannot create {path}: {ancestor} is not writable"
    return None


def _can_create_in(directory: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _with_out_check(callback: Callable[..., Any], param: Any, directory: bool) -> Callable[..., Any]:
    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        value = kwargs.get(param.name or "")
        if value not in (None, "") and not kwargs.get("submit"):  # train --submit: the trainer's path
            reason = unwritable(Path(value), directory=directory)
            if reason:
                raise typer.BadParameter(reason, ctx=get_current_context(silent=True), param=param)
        return callback(*args, **kwargs)

    return checked


def _chain(first: Callable[..., Any] | None, then: Callable[..., Any]) -> Callable[..., Any]:
    if first is None:
        return then
    return lambda ctx, param, value: then(ctx, param, first(ctx, param, value))


def _relog(which: str) -> Callable[..., Any]:
    """A command's own --log-level/--log-format: given on its command line, it wins over the root's."""

    def apply(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
            value = getattr(value, "value", value)
            level, fmt = current_logging()
            setup_process(log_level=value if which == "level" else level,
                          log_format=value if which == "format" else fmt, lock=True)
        return value

    return apply


def log_options() -> list[Any]:
    """--log-level/--log-format for a command that has none of its own (not passed to its function),
    made by typer itself so that they are options of the same kind as the command's own."""
    probe = typer.Typer(add_completion=False)  # the app has no completion options: nor do its commands

    @probe.command()
    def command(
        log_level: LogLevel = typer.Option(None, "--log-level", case_sensitive=False, expose_value=False,
                                           callback=_relog("level"), help=LOG_LEVEL_HELP + " Also before the command."),
        log_format: LogFormat = typer.Option(None, "--log-format", case_sensitive=False, expose_value=False,
                                             callback=_relog("format"), help=LOG_FORMAT_HELP),
    ) -> None:
        """Not run: only its options are used."""

    return list(typer.main.get_command(probe).params)


def _remember_nats(flag: str) -> Callable[..., Any]:
    """Keeps the value of one --nats-* option in the context; the last one read installs them all."""

    def remember(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        values = ctx.meta.setdefault(_NATS_META, {})
        values[flag] = value
        if len(values) == len(NATS_AUTH_ENV):
            install_nats_options(ctx, values)
        return value

    return remember


def nats_setting_values(ctx: Any) -> dict[str, str]:
    """The --nats-* values given to this command (flags or variables) as service settings (``nats_user``...)."""
    values = ctx.meta.get(_NATS_META, {}) if ctx is not None else {}
    return {flag.removeprefix("--").replace("-", "_"): value for flag, value in values.items() if value}


def install_nats_options(ctx: Any, values: dict[str, Any]) -> None:
    """Makes the command's credentials what ``bus.connect`` uses (``natsauth.use_client_options``), until
    the command ends; a bad value (a file that is not there) is a usage error naming the variable."""
    from stablealign.core.errors import ConfigError
    from stablealign.nats.auth import NatsClientOptions, reset_client_options, use_client_options

    try:
        options = NatsClientOptions.from_settings(types.SimpleNamespace(**nats_setting_values(ctx)))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx) from None
    token = use_client_options(options)
    ctx.call_on_close(lambda: reset_client_options(token))


def nats_auth_options() -> list[Any]:
    """The --nats-* options of a command that connects to NATS (not passed to its function)."""
    probe = typer.Typer(add_completion=False)
    parameters = [inspect.Parameter(flag.removeprefix("--").replace("-", "_"), inspect.Parameter.KEYWORD_ONLY,
                                    annotation=str | None,
                                    default=typer.Option(None, flag, expose_value=False, help=NATS_AUTH_HELP[flag],
                                                         callback=_remember_nats(flag)))
                  for flag in NATS_AUTH_ENV]

    def command(**_: Any) -> None:
        """Not run: only its options are used."""

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    probe.command()(command)
    return list(typer.main.get_command(probe).params)


def _nats_alias(option: Any) -> None:
    """An option holding a NATS URL under another name (``--trainer-nats``) is ``--nats`` too."""
    longs = [o for o in option.opts if o.startswith("--")]
    if "--nats" not in longs and any(o.endswith("-nats") for o in longs):
        option.opts.insert(0, "--nats")


def apply_rules(command: Any, path: tuple[str, ...] = ()) -> None:
    """Sets every option's environment variable and the fail-fast checks, through the whole tree."""
    if getattr(command, "_stablealign_rules", False):
        return
    command._stablealign_rules = True  # type: ignore[attr-defined]
    if path and not is_group(command):
        flags = {primary_flag(p) for p in command.params if is_option(p)}
        if not {"--log-level", "--log-format"} & flags:
            command.params.extend(log_options())
        if any(is_option(p) and any(o == "--nats" or o.endswith("-nats") for o in p.opts) for p in command.params) \
                and not set(NATS_AUTH_ENV) & flags:
            command.params.extend(nats_auth_options())
    for param in command.params:
        if not is_option(param) or param.name == "help":
            continue
        _nats_alias(param)
        flag = primary_flag(param)
        param.envvar = env_var(path, flag)
        param.show_envvar = True
        if flag == "--nats":
            param.callback = _chain(param.callback, check_nats_url)
        if "--out" in param.opts and path and command.callback and " ".join(path) not in OUT_IS_REMOTE:
            command.callback = _with_out_check(command.callback, param, directory=" ".join(path) not in OUT_IS_FILE)
    if is_group(command):
        for name, sub in command.commands.items():
            apply_rules(sub, (*path, name))


def exit_code(exc: BaseException, default: int) -> int:
    """A failed command's exit code: ``NotAuthorizedError.EXIT_CODE`` (3) when NATS refused the
    credentials — not the 1 of "cannot reach", so a script can tell them apart — else ``default``."""
    from stablealign.nats.auth import NotAuthorizedError

    return NotAuthorizedError.EXIT_CODE if isinstance(exc, NotAuthorizedError) else default


def one_line(exc: Any) -> str:
    """``error: <message>`` on one line; a usage error names the help to read."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_exceptions.UsageError) and not isinstance(exc, click_exceptions.BadParameter) \
            and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return f"error: {message}"


class RootGroup(TyperGroup):
    """The `stable-align` group: applies the rules to the tree when it is built, and prints click's
    errors as one ``error: ...`` line (exit 2 for usage errors)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        apply_rules(self)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:
            sys.exit(2)  # the help is printed already: a group without its command is a usage error
        except click_exceptions.ClickException as exc:
            typer.echo(one_line(exc), err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
