"""Throwaway certificates for `serve --local --tls` and tests (the `cryptography` package).

One CA per run, one certificate per process, each for both server and client
auth, each carrying PEER_NAME (what every channel verifies, tls.py) plus the
local names: localhost, 127.0.0.1, ::1. The CA's key is never written: nothing
can mint another certificate of the run once it has started.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagfusion.worker.security.tls import PEER_NAME

VALID_FOR = datetime.timedelta(days=7)
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    """What `--tls-cert`, `--tls-key` and `--tls-ca` name for one process."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _x509() -> Any:
    try:
        from cryptography import x509
    except ImportError:
        raise RuntimeError(
            "making throwaway certificates needs the cryptography package:"
            " pip install 'cryptography>=42'"
        ) from None
    return x509


class LocalCA:
    """A CA that lives in memory and issues certificates for local processes."""

    def __init__(self, name: str = "disagfusion local CA") -> None:
        x509 = _x509()
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(self.cert.public_bytes(Encoding.PEM))

    def issue(
        self, name: str, dns_names: Iterable[str] = (), ips: Iterable[str] = ()
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, unencrypted PKCS#8 key PEM) for `name`, for server and
        client auth, with PEER_NAME, `name` and the local names as SANs."""
        x509 = _x509()
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        names = dict.fromkeys([PEER_NAME, name, *LOCAL_NAMES, *dns_names])
        sans = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys([*LOCAL_IPS, *ips])
        ]
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return bytes(cert.public_bytes(serialization.Encoding.PEM)), bytes(key_pem)

    def write_ca(self, directory: Path) -> Path:
        path = directory / "ca.crt"
        path.write_bytes(self.pem)
        return path

    def write(self, directory: Path, name: str) -> CertFiles:
        """`name`.crt and `name`.key (mode 0600) in `directory`, beside ca.crt."""
        ca = directory / "ca.crt"
        if not ca.exists():
            self.write_ca(directory)
        cert_pem, key_pem = self.issue(name)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        return CertFiles(cert, key, ca)
