"""mTLS between the gateway and the stages: PEM files in, grpc credentials out.

Every gRPC server a stage talks to (a worker's Stage port, the gateway's result
port) requires a client certificate signed by the pipeline's CA, and every
channel to a peer presents this process's certificate and trusts only that CA.

Server names: peers dial pod DNS names (`<sts>-<i>.<svc>.<ns>.svc`), the
gateway's pod IP (its result address) and 127.0.0.1 locally, and in a cluster
every pod of a pipeline mounts the same Secret. No one hostname scheme covers
all of those with one certificate, so every channel checks the server's
certificate against the fixed name PEER_NAME (`grpc.ssl_target_name_override`)
that every certificate of a pipeline carries as a DNS SAN. The trust is the
pipeline's CA plus client certificates on both ends, not the hostname: a
certificate says "a member of this pipeline", never "this pod".

Data-plane backends that bypass gRPC (`data_plane_problem`): torch and nixl move
tensor bytes over their own sockets in plaintext, so TLS refuses them unless
plaintext data is allowed explicitly; shm never leaves the host (segments are
mode 0600 files under /dev/shm of the same user), so it is allowed and logged.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# The DNS SAN every certificate of a pipeline carries; what channels verify against.
PEER_NAME = "disagfusion-peer"
# Backends that move tensor bytes outside the gRPC stream, and why each is (not) safe.
NETWORK_BACKENDS = {
    "torch": "torch.distributed (gloo/NCCL) sends tensor bytes unencrypted over its own TCP",
    "nixl": "NIXL/UCX moves tensor bytes unencrypted over its own transport (RDMA or TCP)",
}
SAME_HOST_BACKENDS = {
    "shm": "shared memory never leaves the host (mode 0600 segments of the same user);"
    " only its handles go on the mTLS stream",
}


class TlsError(ValueError):
    """A TLS setting that cannot be used; the message is one line naming the flag or file."""


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate chain and key, and the pipeline's CA (all PEM)."""

    cert_chain: bytes
    private_key: bytes
    ca: bytes
    allow_plaintext_data: bool = False  # torch/nixl may move bytes outside TLS


_CERT = b"-----BEGIN CERTIFICATE-----"


def _read(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TlsError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    if not data.strip():
        raise TlsError(f"{flag} {path}: the file is empty")
    return data


def _is_private_key(data: bytes) -> bool:
    # PKCS#8 ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"), PKCS#1 ("RSA ..."), SEC1 ("EC ...").
    return b"-----BEGIN " in data and b"PRIVATE KEY-----" in data


def load_tls(
    cert: str | None,
    key: str | None,
    ca: str | None,
    allow_plaintext_data: bool = False,
) -> TlsConfig | None:
    """The TLS config the three flags name, None when none is given; TlsError (one
    line, naming the flag and file) when only some are, or a file is unusable."""
    flags = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    given = [f for f, v in flags.items() if v]
    if not given:
        if allow_plaintext_data:
            raise TlsError(
                "--tls-allow-plaintext-data only makes sense with --tls-cert, --tls-key, --tls-ca"
            )
        return None
    missing = [f for f, v in flags.items() if not v]
    if missing:
        raise TlsError(
            f"{', '.join(given)} given without {', '.join(missing)}:"
            " mTLS needs all three of --tls-cert, --tls-key and --tls-ca"
        )
    assert cert and key and ca
    chain, private = _read("--tls-cert", cert), _read("--tls-key", key)
    roots = _read("--tls-ca", ca)
    if _CERT not in chain:
        raise TlsError(f"--tls-cert {cert}: not a PEM certificate (no {_CERT.decode()})")
    if not _is_private_key(private):
        raise TlsError(f"--tls-key {key}: not a PEM private key (no -----BEGIN ... PRIVATE KEY)")
    if _CERT not in roots:
        raise TlsError(f"--tls-ca {ca}: not a PEM certificate (no {_CERT.decode()})")
    _check_with_openssl(cert, key, ca, chain)
    return TlsConfig(chain, private, roots, allow_plaintext_data)


def _check_with_openssl(cert: str, key: str, ca: str, chain: bytes) -> None:
    """Parse the files as the handshake will, so a broken one fails at start rather
    than at the first peer: the CA and certificate must parse, and the key must be
    unencrypted and match the certificate."""
    for flag, path, pem in (("--tls-ca", ca, None), ("--tls-cert", cert, chain)):
        try:
            if pem is None:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
            else:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                    cadata=pem.decode("ascii", "replace")
                )
        except (ssl.SSLError, OSError, ValueError):
            raise TlsError(f"{flag} {path}: not a usable PEM certificate") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_encrypted)
    except _Encrypted:
        raise TlsError(f"--tls-key {key}: the key is encrypted; give it unencrypted") from None
    except (ssl.SSLError, OSError):
        raise TlsError(
            f"--tls-key {key}: not a usable PEM private key, or not the key of --tls-cert {cert}"
        ) from None


class _Encrypted(Exception):
    pass


def _encrypted() -> str:
    raise _Encrypted


# ---- grpc ----------------------------------------------------------------------------


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """A server that admits only clients with a certificate from the pipeline's CA."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.ca,
        require_client_auth=True,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """A channel that presents our certificate and trusts only the pipeline's CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.private_key, certificate_chain=tls.cert_chain
    )


def channel_options(tls: TlsConfig | None) -> list[tuple[str, Any]]:
    """Options a channel to a peer adds: the fixed name its certificate is checked against."""
    return [] if tls is None else [("grpc.ssl_target_name_override", PEER_NAME)]


def open_channel(
    address: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to a peer: mTLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, channel_credentials(tls), options=[*options, *channel_options(tls)]
    )


def add_port(server: Any, address: str, tls: TlsConfig | None) -> int:
    """Listen on `address` (mTLS with `tls`); the bound port, 0 when it cannot bind."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, server_credentials(tls)))


# ---- the process's configuration -----------------------------------------------------

_process_tls: TlsConfig | None = None


def configure(tls: TlsConfig | None) -> None:
    """Set the TLS of this process: a `ChannelCache()` made afterwards uses it (the
    stage runtime makes its own channels; a process has one identity)."""
    global _process_tls
    _process_tls = tls


def configured() -> TlsConfig | None:
    return _process_tls


def data_plane_problem(backend: str, tls: TlsConfig | None) -> str | None:
    """Why `backend` cannot be used under `tls`; None when it can."""
    if tls is None or backend == "grpc" or backend in SAME_HOST_BACKENDS:
        return None
    if tls.allow_plaintext_data:
        return None
    why = NETWORK_BACKENDS.get(backend, f"{backend} moves tensor bytes outside the gRPC stream")
    return (
        f"--transport {backend} with mTLS: {why}; use --transport grpc or shm, or accept"
        " plaintext tensor bytes with --tls-allow-plaintext-data"
    )


def check_data_plane(backend: str, tls: TlsConfig | None) -> None:
    """Raise TlsError when `backend` cannot be used under `tls`; when it can although
    its bytes bypass gRPC, log why."""
    problem = data_plane_problem(backend, tls)
    if problem:
        raise TlsError(problem)
    if tls is None or backend == "grpc":
        return
    if backend in SAME_HOST_BACKENDS:
        log.info("mTLS with --transport %s: allowed, %s", backend, SAME_HOST_BACKENDS[backend])
        return
    why = NETWORK_BACKENDS.get(backend, f"{backend} moves tensor bytes outside the gRPC stream")
    log.warning(
        "mTLS with --transport %s: tensor bytes are NOT encrypted (%s);"
        " allowed by --tls-allow-plaintext-data",
        backend,
        why,
    )
