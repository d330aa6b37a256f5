"""A throwaway certificate authority for TLS tests: a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate, written as PEM files into a directory.

Why generated in the test: TLS on the NATS client port and on gRPC (mTLS included) must be tested
against real servers with real handshakes, and a committed key would be a key anyone can read.
Keys are EC P-256 (fast to generate); certificates live for one day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestCertificates:
    """Paths of the PEM files: ``ca`` signs ``server_cert`` (127.0.0.1, localhost) and ``client_cert``."""

    __test__ = False  # not a pytest class

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail the handshake


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *,
          server: bool, client: bool | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for a server (names 127.0.0.1 and localhost) or a client; ``client=True`` on a server
    certificate allows both (a NATS cluster route is each server's client and server at once)."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client if client is not None else not server:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_certificates(directory: Path) -> TestCertificates:
    """Writes a CA, a server and a client certificate (and an unrelated CA) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("stable-align test CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "localhost", server=True)
    client_key, client_cert = _leaf(ca_key, ca_cert, "stable-align test client", server=False)
    _, other_cert = _ca("some other CA")
    return TestCertificates(
        ca=_write_cert(ca_cert, directory / "ca.pem"),
        server_cert=_write_cert(server_cert, directory / "server.pem"),
        server_key=_write_key(server_key, directory / "server-key.pem"),
        client_cert=_write_cert(client_cert, directory / "client.pem"),
        client_key=_write_key(client_key, directory / "client-key.pem"),
        other_ca=_write_cert(other_cert, directory / "other-ca.pem"),
    )


def make_secret_layout(directory: Path, common_name: str = "nats") -> Path:
    """A new CA and one certificate for 127.0.0.1/localhost usable as server and client, as the files of the
    Kubernetes Secret nats-tls (``tls.crt``, ``tls.key``, ``ca.crt``): what components/nats-tls mounts for
    the NATS client port and the cluster routes. Each call makes a CA of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(f"{common_name} test CA")
    key, cert = _leaf(ca_key, ca_cert, common_name, server=True, client=True)
    _write_cert(ca_cert, directory / "ca.crt")
    _write_cert(cert, directory / "tls.crt")
    _write_key(key, directory / "tls.key")
    return directory


def make_ca_with_clients(directory: Path, *names: str) -> Path:
    """A new CA (``ca.crt``), a server certificate for 127.0.0.1/localhost (``tls.crt``, ``tls.key``) and one
    client certificate per common name (``<name>.crt``, ``<name>.key``): callers told apart by their name."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("stable-align test gRPC CA")
    _write_cert(ca_cert, directory / "ca.crt")
    key, cert = _leaf(ca_key, ca_cert, "localhost", server=True)
    _write_cert(cert, directory / "tls.crt")
    _write_key(key, directory / "tls.key")
    for name in names:
        key, cert = _leaf(ca_key, ca_cert, name, server=False)
        _write_cert(cert, directory / f"{name}.crt")
        _write_key(key, directory / f"{name}.key")
    return directory
