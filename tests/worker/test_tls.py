"""mTLS between stages (`--tls-cert/--tls-key/--tls-ca`, `serve --local --tls`).

Real processes and real handshakes: a `disagfusion worker` subprocess with TLS
admits only peers holding a certificate of its CA; `serve --local --tls`
serves an image over the HTTP API with every hop on mTLS.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.local.launcher import free_port
from disagfusion.worker.security.certs import CertFiles, LocalCA
from disagfusion.worker.security.tls import (
    PEER_NAME,
    TlsError,
    check_data_plane,
    data_plane_problem,
    load_tls,
)
from tests.worker.commands import running
from tests.worker.serve_local import ServeLocal, wait_gone

HOST = "127.0.0.1"
PNG = b"\x89PNG\r\n\x1a\n"
TOPOLOGY = '{"monolithic": ["127.0.0.1:1"]}'


@dataclass(frozen=True)
class Pki:
    ca: LocalCA
    files: CertFiles  # the worker's
    peer: CertFiles  # another member of the pipeline
    stranger: CertFiles  # signed by a different CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    ca = LocalCA("test CA")
    return Pki(ca, ca.write(ours, "worker"), ca.write(ours, "peer"), LocalCA().write(theirs, "x"))


# ---- loading the files ---------------------------------------------------------------


def _load(files: CertFiles, **overrides: str | None) -> object:
    paths: dict[str, str | None] = {
        "cert": str(files.cert),
        "key": str(files.key),
        "ca": str(files.ca),
    }
    paths.update(overrides)
    return load_tls(paths["cert"], paths["key"], paths["ca"])


def test_the_three_files_load(pki: Pki) -> None:
    tls = load_tls(str(pki.files.cert), str(pki.files.key), str(pki.files.ca))
    assert tls is not None
    assert tls.ca == pki.ca.pem and b"PRIVATE KEY" in tls.private_key
    assert load_tls(None, None, None) is None


@pytest.mark.parametrize(
    ("given", "missing"),
    [({"key": None, "ca": None}, "--tls-key, --tls-ca"), ({"cert": None}, "--tls-cert")],
)
def test_some_flags_without_the_others(pki: Pki, given: dict[str, None], missing: str) -> None:
    with pytest.raises(TlsError, match=f"without {missing}: mTLS needs all three"):
        _load(pki.files, **given)


def test_unreadable_empty_and_non_pem_files_are_named(pki: Pki, tmp_path: Path) -> None:
    absent = tmp_path / "absent.pem"
    with pytest.raises(TlsError, match=f"--tls-ca {absent}: cannot read it"):
        _load(pki.files, ca=str(absent))
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(TlsError, match=f"--tls-cert {empty}: the file is empty"):
        _load(pki.files, cert=str(empty))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TlsError, match=f"--tls-key {junk}: not a PEM private key"):
        _load(pki.files, key=str(junk))
    with pytest.raises(TlsError, match=f"--tls-ca {junk}: not a PEM certificate"):
        _load(pki.files, ca=str(junk))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TlsError, match=f"--tls-cert {broken}: not a usable PEM certificate"):
        _load(pki.files, cert=str(broken))


def test_a_key_of_another_certificate_or_an_encrypted_key_is_refused(
    pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(TlsError, match=f"not the key of --tls-cert {pki.files.cert}"):
        _load(pki.files, key=str(pki.peer.key))
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.files.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsError, match=f"--tls-key {locked}: the key is encrypted"):
        _load(pki.files, key=str(locked))


def test_backends_that_bypass_grpc(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    tls = load_tls(str(pki.files.cert), str(pki.files.key), str(pki.files.ca))
    assert data_plane_problem("grpc", tls) is None
    assert data_plane_problem("torch", None) is None
    for backend in ("torch", "nixl"):
        problem = data_plane_problem(backend, tls)
        assert problem and f"--transport {backend} with mTLS" in problem
        assert "--tls-allow-plaintext-data" in problem
        with pytest.raises(TlsError):
            check_data_plane(backend, tls)
    caplog.set_level("INFO")
    check_data_plane("shm", tls)  # same host: allowed, and logged why
    assert "never leaves the host" in caplog.text
    allowed = load_tls(str(pki.files.cert), str(pki.files.key), str(pki.files.ca), True)
    check_data_plane("torch", allowed)
    assert "NOT encrypted" in caplog.text
    with pytest.raises(TlsError, match="only makes sense with"):
        load_tls(None, None, None, allow_plaintext_data=True)


def test_every_issued_certificate_carries_the_peer_name(pki: Pki) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki.files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert PEER_NAME in sans.get_values_for_type(x509.DNSName)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert (pki.files.key.stat().st_mode & 0o777) == 0o600


# ---- bad flags on the command line: exit 2, one line ---------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagfusion", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _worker_argv(*extra: str) -> list[str]:
    ports = ["--port", str(free_port()), "--http-port", str(free_port())]
    return ["worker", "--role", "decoder", *ports, *extra]


def test_bad_tls_flags_exit_2_with_one_line(pki: Pki, tmp_path: Path) -> None:
    f = pki.files
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    cases = [
        (_worker_argv("--tls-cert", str(f.cert)), "without --tls-key, --tls-ca"),
        (
            _worker_argv("--tls-cert", str(f.cert), "--tls-key", str(f.key), "--tls-ca", "/no"),
            "--tls-ca /no: cannot read it",
        ),
        (
            _worker_argv(*f.flags(), "--transport", "torch"),
            "--transport torch with mTLS",
        ),
        (_worker_argv("--tls-allow-plaintext-data"), "only makes sense with"),
        (
            [
                *("gateway", "--grpc-port", str(free_port()), "--topology", TOPOLOGY),
                *("--tls-cert", str(f.cert), "--tls-key", str(junk), "--tls-ca", str(f.ca)),
            ],
            f"--tls-key {junk}: not a PEM private key",
        ),
        (
            ["serve", "--local", "--port", str(free_port()), "--tls-allow-plaintext-data"],
            "--tls-allow-plaintext-data only makes sense with --tls",
        ),
        (
            ["serve", "--local", "--port", str(free_port()), "--tls", "--transport", "torch"],
            "--transport torch with mTLS",
        ),
    ]
    for argv, expected in cases:
        proc = _cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0], (expected, lines[0])


# ---- a worker's Stage port with mTLS, as a process -----------------------------------


def _credentials(files: CertFiles | None, ca: Path) -> grpc.ChannelCredentials:
    if files is None:  # server-only TLS: we check the worker, it cannot check us
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> pb.HealthReply:
    options = [("grpc.ssl_target_name_override", PEER_NAME)]
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        reply: pb.HealthReply = pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=5)
        return reply


def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _health(address, credentials)
    code = err.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


@pytest.fixture(scope="module")
def tls_worker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    args = _worker_argv(*pki.files.flags())
    args[args.index("--port") + 1] = str(port)
    address = f"{HOST}:{port}"

    def up() -> bool:
        try:
            _health(address, _credentials(pki.peer, pki.files.ca))
        except grpc.RpcError:
            return False
        return True

    with running(args, log, up):
        yield address


def test_a_peer_with_a_certificate_of_the_pipelines_ca_is_accepted(
    pki: Pki, tls_worker: str
) -> None:
    reply = _health(tls_worker, _credentials(pki.peer, pki.files.ca))
    assert reply.stage == "decoder"


def test_a_plaintext_peer_is_refused_at_the_handshake(pki: Pki, tls_worker: str) -> None:
    assert _refused(tls_worker, None) == grpc.StatusCode.UNAVAILABLE


def test_a_peer_without_a_client_certificate_is_refused(pki: Pki, tls_worker: str) -> None:
    assert _refused(tls_worker, _credentials(None, pki.files.ca)) == grpc.StatusCode.UNAVAILABLE


def test_a_peer_with_a_certificate_of_another_ca_is_refused(pki: Pki, tls_worker: str) -> None:
    # It trusts the worker (our CA as its root) but its own certificate is the other CA's.
    foreign = grpc.ssl_channel_credentials(
        root_certificates=pki.files.ca.read_bytes(),
        private_key=pki.stranger.key.read_bytes(),
        certificate_chain=pki.stranger.cert.read_bytes(),
    )
    assert _refused(tls_worker, foreign) == grpc.StatusCode.UNAVAILABLE
    # And one of the other CA throughout does not accept the worker either.
    assert _refused(tls_worker, _credentials(pki.stranger, pki.stranger.ca)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    # The worker still serves its own (the refusals were per connection).
    assert _health(tls_worker, _credentials(pki.peer, pki.files.ca)).stage == "decoder"


# ---- serve --local --tls, end to end -------------------------------------------------


@pytest.mark.timeout(420)  # about 11 s on the build machine: not marked slow
def test_serve_local_tls_serves_an_image_with_every_hop_on_mtls(tmp_path: Path) -> None:
    with ServeLocal(tmp_path, "--tls") as server:
        server.wait_serving()
        body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 1}
        request = urllib.request.Request(
            server.url + "/v1/images/generations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as resp:
            answer = json.loads(resp.read())
        assert base64.b64decode(answer["data"][0]["b64_json"]).startswith(PNG)

        children = server.children()
        assert {p.role for p in children} == {"gateway", "encoder", "denoiser", "decoder"}
        certs = {Path(p.flag("--tls-cert")).name for p in children}
        assert certs == {"gateway.crt", "encoder-0.crt", "denoiser-0.crt", "decoder-0.crt"}
        assert len({p.flag("--tls-ca") for p in children}) == 1  # one CA for all
        gateway = server.worker("gateway")
        ca = Path(gateway.flag("--tls-ca"))
        member = CertFiles(Path(gateway.flag("--tls-cert")), Path(gateway.flag("--tls-key")), ca)
        cert_dir = ca.parent
        assert (cert_dir.stat().st_mode & 0o777) == 0o700
        results = f"{HOST}:{gateway.flag('--result-port')}"
        stage = f"{HOST}:{server.worker('decoder').flag('--port')}"
        for address in (results, stage):  # plaintext refused, a member accepted
            assert _refused(address, None) == grpc.StatusCode.UNAVAILABLE
            _health(address, _credentials(member, ca))
        # The clients' Generate port stays plaintext: it answers (it serves no Stage).
        generate = f"{HOST}:{gateway.flag('--grpc-port')}"
        assert _refused(generate, None) == grpc.StatusCode.UNIMPLEMENTED
        server.signal()
        assert server.proc.wait(120) == 0
        for child in children:
            wait_gone(child.pid)
    assert not cert_dir.exists(), "the throwaway certificates outlived serve --local"
