"""`stable-align`: the console script. Sub-commands live in sibling modules, one concern each.

Every flag also reads ``STABLEALIGN_<FLAG>`` from the environment; flags win.
"""

from __future__ import annotations

import typer

from stablealign_app.cli import serve as serve_cli

app = typer.Typer(
    name="stable-align",
    help="Stable Alignment (arXiv 2305.16960): simulate a society of LLM agents over NATS and train on its records.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("serve")(serve_cli.serve)


def _register_optional() -> None:
    """Adds the command groups; each module registers its own commands on ``app``."""
    import importlib

    for module in ("stablealign_app.cli.sandbox", "stablealign_app.cli.training", "stablealign_app.cli.jobs",
                   "stablealign_app.cli.pipeline"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_optional()

if __name__ == "__main__":
    app()
