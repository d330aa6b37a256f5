"""`stable-align`: the console script. Sub-commands live in sibling modules, one concern each.

The rules every command follows — one environment variable per flag (``STABLEALIGN_NATS_URL``,
``STABLEALIGN_LOG_LEVEL``, ``STABLEALIGN_LOG_FORMAT`` shared; ``serve``'s flags ``STABLEALIGN_<FLAG>``;
every other flag ``STABLEALIGN_<CMD>_<FLAG>``; flags win), the fail-fast checks and one-line errors —
are applied to the whole command tree in one place: ``stablealign_app.cli.rules``. Logging is set up
once, here, for every command.
"""

from __future__ import annotations

import typer

from stablealign.core.process import setup_process
from stablealign_app.cli import serve as serve_cli
from stablealign_app.cli.rules import LOG_FORMAT_HELP, LOG_LEVEL_HELP, LogFormat, LogLevel, RootGroup

app = typer.Typer(
    name="stable-align",
    help="Stable Alignment (arXiv 2305.16960): simulate a society of LLM agents over NATS and train on its records.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=RootGroup,
)


@app.callback()
def root(
    log_level: LogLevel = typer.Option(LogLevel.info, "--log-level", case_sensitive=False, help=LOG_LEVEL_HELP),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", case_sensitive=False, help=LOG_FORMAT_HELP),
) -> None:
    """Logging for every command, set up once (a command's own --log-level/--log-format win)."""
    setup_process(log_level=log_level.value, log_format=log_format.value, lock=True)


app.command("serve")(serve_cli.serve)


def _register_optional() -> None:
    """Adds the command groups; each module registers its own commands on ``app``."""
    import importlib

    for module in ("stablealign_app.cli.sandbox",
                   "stablealign_app.cli.resume",
                   "stablealign_app.cli.training",
                   "stablealign_app.cli.jobs",
                   "stablealign_app.cli.pipeline"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_optional()


def main() -> None:
    """The console script ``stable-align`` (and ``python -m stablealign_app.cli.main``)."""
    typer.main.get_command(app).main(prog_name="stable-align")


if __name__ == "__main__":
    main()
