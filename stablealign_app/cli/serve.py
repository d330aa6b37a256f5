"""`stable-align serve agent|observer|world|trainer`: one service process in the foreground.

Each service package exposes ``SETTINGS`` (a ``ServiceSettings`` dataclass) and
``build(context) -> ServiceParts`` in ``services/<name>/main.py``; service-specific settings
come from ``STABLEALIGN_<FIELD>`` environment variables, and every flag here reads the variable of the
setting it overrides (``--grpc-port`` -> ``STABLEALIGN_GRPC_PORT``; set by ``stablealign_app.cli.rules``).
"""

from __future__ import annotations

import asyncio
import importlib
from enum import Enum

import typer

from stablealign.config import load_settings
from stablealign.errors import ConfigError
from stablealign.logs import current_logging
from stablealign.natsauth import NotAuthorizedError
from stablealign.process import setup_process
from stablealign.service import serve_forever
from stablealign_app.cli.rules import (
    LOG_FORMAT_HELP,
    LOG_LEVEL_HELP,
    LogFormat,
    LogLevel,
    get_current_context,
    nats_setting_values,
)


class ServiceName(str, Enum):
    agent = "agent"
    observer = "observer"
    world = "world"
    trainer = "trainer"


def serve(
    service: ServiceName = typer.Argument(..., help="Which service to run."),
    nats: str = typer.Option(None, "--nats", help="NATS server URL."),
    grpc_port: int = typer.Option(None, "--grpc-port", help="gRPC port (0: a free port, -1: no gRPC)."),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Prometheus /metrics port (-1: none)."),
    grpc_host: str = typer.Option(None, "--grpc-host", help="gRPC bind address."),
    metrics_host: str = typer.Option(None, "--metrics-host", help="/metrics bind address."),
    log_level: LogLevel = typer.Option(None, "--log-level", case_sensitive=False,
                                       help=LOG_LEVEL_HELP + " Also before the command."),
    log_format: LogFormat = typer.Option(None, "--log-format", case_sensitive=False, help=LOG_FORMAT_HELP),
    instance: str = typer.Option(None, "--instance", help="Replica name in logs."),
    grpc_tls_cert: str = typer.Option(None, "--grpc-tls-cert", help="PEM certificate of the gRPC server; with "
                                                                     "--grpc-tls-key turns TLS on."),
    grpc_tls_key: str = typer.Option(None, "--grpc-tls-key", help="PEM private key of --grpc-tls-cert."),
    grpc_tls_client_ca: str = typer.Option(None, "--grpc-tls-client-ca", help="PEM CA: require client "
                                                                               "certificates signed by it (mTLS)."),
    grpc_health_port: int = typer.Option(None, "--grpc-health-port", help="Plaintext port serving only gRPC "
                                                                           "health, for probes (with TLS; -1: none)."),
) -> None:
    """Run one service until SIGTERM, then drain in-flight work and exit 0."""
    module = importlib.import_module(f"services.{service.value}.main")
    # Not given here: what `stable-align --log-level/--log-format` (or their environment variables) set.
    root_level, root_format = current_logging()
    overrides = {"nats_url": nats, "grpc_port": grpc_port, "metrics_port": metrics_port, "grpc_host": grpc_host,
                 "metrics_host": metrics_host, "log_level": log_level.value if log_level else root_level,
                 "log_format": log_format.value if log_format else root_format, "instance": instance,
                 "grpc_tls_cert": grpc_tls_cert, "grpc_tls_key": grpc_tls_key,
                 "grpc_tls_client_ca": grpc_tls_client_ca, "grpc_health_port": grpc_health_port,
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
