"""`stable-align serve agent|observer|world|trainer`: one service process in the foreground.

Each service package exposes ``SETTINGS`` (a ``ServiceSettings`` dataclass) and
``build(context) -> ServiceParts`` in ``services/<name>/main.py``; service-specific settings
come from ``STABLEALIGN_<FIELD>`` environment variables.
"""

from __future__ import annotations

import asyncio
import importlib
from enum import Enum

import typer

from stablealign.config import load_settings
from stablealign.errors import ConfigError
from stablealign.logs import setup_logging
from stablealign.service import serve_forever


class ServiceName(str, Enum):
    agent = "agent"
    observer = "observer"
    world = "world"
    trainer = "trainer"


def serve(
    service: ServiceName = typer.Argument(..., help="Which service to run."),
    nats: str = typer.Option(None, "--nats", envvar="STABLEALIGN_NATS_URL", help="NATS server URL."),
    grpc_port: int = typer.Option(None, "--grpc-port", envvar="STABLEALIGN_GRPC_PORT",
                                  help="gRPC port (0: a free port, -1: no gRPC)."),
    metrics_port: int = typer.Option(None, "--metrics-port", envvar="STABLEALIGN_METRICS_PORT",
                                     help="Prometheus /metrics port (-1: none)."),
    grpc_host: str = typer.Option(None, "--grpc-host", envvar="STABLEALIGN_GRPC_HOST", help="gRPC bind address."),
    metrics_host: str = typer.Option(None, "--metrics-host", envvar="STABLEALIGN_METRICS_HOST",
                                     help="/metrics bind address."),
    log_level: str = typer.Option(None, "--log-level", envvar="STABLEALIGN_LOG_LEVEL"),
    log_format: str = typer.Option(None, "--log-format", envvar="STABLEALIGN_LOG_FORMAT", help="json|console|auto"),
    instance: str = typer.Option(None, "--instance", envvar="STABLEALIGN_INSTANCE", help="Replica name in logs."),
) -> None:
    """Run one service until SIGTERM, then drain in-flight work and exit 0."""
    module = importlib.import_module(f"services.{service.value}.main")
    overrides = {"nats_url": nats, "grpc_port": grpc_port, "metrics_port": metrics_port, "grpc_host": grpc_host,
                 "metrics_host": metrics_host, "log_level": log_level, "log_format": log_format,
                 "instance": instance}
    try:
        settings = load_settings(module.SETTINGS, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    raise typer.Exit(asyncio.run(serve_forever(service.value, settings, module.build)))
