"""gRPC TLS settings: the server's certificate (and, for mTLS, the CA its clients' certificates must
chain to), and a client's trust and identity. Loaded and checked at start-up, never per call.

Why a settings module of its own: every service takes the server half (``ServiceSettings`` mixes in
``GrpcServerTlsSettings``) and every gRPC client the client half (``rpc.GrpcClientTlsSettings``), and a
half-configured TLS must fail before anything listens — a certificate without its key, a file that
cannot be read or holds no PEM block — with one line naming the variable, never a traceback and
never a silent fall-back to plaintext.

Server (``STABLEALIGN_<FIELD>``): ``GRPC_TLS_CERT`` + ``GRPC_TLS_KEY`` turn TLS on; ``GRPC_TLS_CLIENT_CA``
also requires a client certificate signed by that CA (mTLS); ``GRPC_HEALTH_PORT`` serves
``grpc.health.v1`` alone in plaintext for probes that cannot speak TLS (the kubelet's ``grpc:`` probe).
``GRPC_METHOD_CALLERS`` (JSON) names per method the client certificates that may call it
(``stablealign.serving.grpc_authz``). Client: ``GRPC_CA`` (the CA to trust; TLS with the system's roots when only a
client certificate is set), ``GRPC_CLIENT_CERT`` + ``GRPC_CLIENT_KEY`` (mTLS identity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, model_validator

# Not imported from stablealign.core.config: config mixes these settings into ServiceSettings.
Port = Annotated[int, Field(ge=-1, le=65535)]


def env_name(field: str) -> str:
    return f"STABLEALIGN_{field.upper()}"


def read_pem(path: str, field: str) -> bytes:
    """The file's bytes; ValueError (-> one-line ConfigError) naming the variable when it cannot be read
    or holds no PEM block."""
    name = env_name(field)
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}={path!r}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{name}={path!r}: not a PEM file (no -----BEGIN block)")
    return data


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes read at start-up: what ``grpc.ssl_*_credentials`` take."""

    certificate: bytes | None = None
    private_key: bytes | None = None
    ca: bytes | None = None


def _pair(values: BaseModel, cert_field: str, key_field: str) -> None:
    cert, key = getattr(values, cert_field), getattr(values, key_field)
    if bool(cert) != bool(key):
        have, missing = (cert_field, key_field) if cert else (key_field, cert_field)
        raise ValueError(f"{env_name(have)} is set but {env_name(missing)} is not: TLS needs both the certificate "
                         "and its private key")


class GrpcServerTlsSettings(BaseModel):
    """The gRPC server's TLS (mixed into ``ServiceSettings``)."""

    grpc_tls_cert: str = Field("", description=(
        "PEM certificate (chain) of the gRPC server; with grpc_tls_key it turns TLS on (\"\": plaintext)."))
    grpc_tls_key: str = Field("", description="PEM private key of grpc_tls_cert.")
    grpc_tls_client_ca: str = Field("", description=(
        "PEM CA bundle: when set, clients must present a certificate signed by it (mTLS)."))
    grpc_health_port: Port = Field(-1, description=(
        "A plaintext port serving only grpc.health.v1, for probes that cannot do TLS (-1: none; 0: a free "
        "port). Only meaningful with TLS on; bound on grpc_host."))
    grpc_method_callers: str = Field("", description=(
        "JSON: per gRPC method (short name, e.g. CreateWorld; \"*\" for any other), the client certificates' "
        "common names allowed to call it (stablealign.serving.grpc_authz). Needs grpc_tls_client_ca. \"\": every client "
        "certificate may call every method."))

    @model_validator(mode="after")
    def _tls_is_complete(self) -> GrpcServerTlsSettings:
        _pair(self, "grpc_tls_cert", "grpc_tls_key")
        if self.grpc_tls_client_ca and not self.grpc_tls_cert:
            raise ValueError(f"{env_name('grpc_tls_client_ca')} is set but {env_name('grpc_tls_cert')} and "
                             f"{env_name('grpc_tls_key')} are not: client certificates need TLS")
        if self.method_callers() and not self.grpc_tls_client_ca:
            raise ValueError(f"{env_name('grpc_method_callers')} is set but {env_name('grpc_tls_client_ca')} is "
                             "not: callers are named by their client certificates (mTLS)")
        self.grpc_server_tls()  # every file readable and PEM, now
        return self

    def method_callers(self) -> dict[str, tuple[str, ...]]:
        """``grpc_method_callers`` parsed: method -> common names; ValueError naming the variable if malformed."""
        if not self.grpc_method_callers.strip():
            return {}
        try:
            table = json.loads(self.grpc_method_callers)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{env_name('grpc_method_callers')}: not JSON ({exc.msg})") from None
        if not (isinstance(table, dict) and all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                                                for names in table.values())):
            raise ValueError(f"{env_name('grpc_method_callers')}: must be a JSON object of method -> list of "
                             'certificate common names, e.g. {"CreateWorld": ["operator"]}')
        return {method: tuple(names) for method, names in table.items()}

    def grpc_server_tls(self) -> TlsMaterial | None:
        """The server's certificate, key and client CA (None: plaintext)."""
        if not self.grpc_tls_cert:
            return None
        return TlsMaterial(certificate=read_pem(self.grpc_tls_cert, "grpc_tls_cert"),
                           private_key=read_pem(self.grpc_tls_key, "grpc_tls_key"),
                           ca=read_pem(self.grpc_tls_client_ca, "grpc_tls_client_ca")
                           if self.grpc_tls_client_ca else None)
