"""spec.transport.tls: parsed and validated by field path, rendered as a Secret volume
and `--tls-*` flags in every worker and gateway pod, agreeing with the CRD's schema
and CEL rule; and the chart's optional cert-manager Certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml

from disagfusion.cli import build_parser
from disagfusion.cli.worker import tls_settings
from disagfusion.operator.children import render_all
from disagfusion.operator.render import TLS_VOLUME, Child, Owner
from disagfusion.operator.spec import TLS_KEYS, TLS_MOUNT, TlsSpec, parse_spec, validate_spec
from tests.operator.test_chart import CHART, K8S_VERSIONS, NAMESPACE, WATCHED, template

REPO = Path(__file__).resolve().parents[2]
CRDS = [REPO / "crds", CHART / "crds"]
CRD_NAME = "disagfusion.io_diffusionpipelines.yaml"
OWNER = Owner(name="sd", namespace="ml", uid="uid-1")
TLS = {"secretName": "sd-tls"}
CPU_POOL = {"name": "cpu", "accelerator": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2}


def spec(**transport: Any) -> dict[str, Any]:
    return {"model": {"source": "builtin:tiny-unet"}, "transport": transport}


def workloads(children: list[Child]) -> dict[str, dict[str, Any]]:
    return {
        f"{c.kind}/{c.name}": c.body for c in children if c.kind in ("StatefulSet", "Deployment")
    }


def pod(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["template"]["spec"])


# ---- spec ----------------------------------------------------------------------------


def test_tls_is_off_by_default_and_parsed_when_given() -> None:
    assert parse_spec(spec()).transport.tls is None
    assert parse_spec(spec(tls=TLS)).transport.tls == TlsSpec("sd-tls")
    allowed = parse_spec(spec(backend="torch", tls={**TLS, "allowPlaintextData": True}))
    assert allowed.transport.tls == TlsSpec("sd-tls", allow_plaintext_data=True)
    assert parse_spec(spec(backend="shm", tls=TLS)).transport.tls == TlsSpec("sd-tls")


@pytest.mark.parametrize(
    ("transport", "field"),
    [
        ({"tls": {}}, "spec.transport.tls.secretName: required"),
        ({"tls": {"secretName": "Not_A_Name"}}, "spec.transport.tls.secretName: 'Not_A_Name'"),
        ({"tls": {"secretName": ""}}, "spec.transport.tls.secretName: must be a non-empty"),
        ({"tls": "sd-tls"}, "spec.transport.tls: must be an object"),
        ({"tls": {**TLS, "caSecret": "x"}}, "spec.transport.tls.caSecret: unknown field"),
        (
            {"tls": {**TLS, "allowPlaintextData": "yes"}},
            "spec.transport.tls.allowPlaintextData: must be a boolean",
        ),
        (
            {"backend": "torch", "tls": TLS},
            "spec.transport.tls.allowPlaintextData: spec.transport.backend torch",
        ),
        (
            {"backend": "nixl", "tls": {**TLS, "allowPlaintextData": False}},
            "spec.transport.tls.allowPlaintextData: spec.transport.backend nixl",
        ),
    ],
)
def test_bad_tls_is_reported_by_field_path(transport: dict[str, Any], field: str) -> None:
    problems = validate_spec(spec(**transport))
    assert any(p.startswith(field) for p in problems), problems


def test_the_tls_mount_is_taken() -> None:
    clash = {
        "model": {"source": "x", "volume": {"emptyDir": {}}, "mountPath": TLS_MOUNT},
        "transport": {"tls": TLS},
    }
    assert any(p.startswith("spec.model.mountPath:") for p in validate_spec(clash))
    store = spec(tls=TLS) | {"gateway": {"jobStore": {"mountPath": TLS_MOUNT}}}
    assert any(p.startswith("spec.gateway.jobStore.mountPath:") for p in validate_spec(store))


# ---- render --------------------------------------------------------------------------


def test_without_tls_no_pod_mounts_a_secret_or_passes_a_tls_flag() -> None:
    for key, body in workloads(render_all(OWNER, parse_spec(spec()))).items():
        assert all(v["name"] != TLS_VOLUME for v in pod(body)["volumes"]), key
        assert not any(a.startswith("--tls") for a in pod(body)["containers"][0]["args"]), key


@pytest.mark.parametrize("pools", [False, True])
def test_every_worker_and_gateway_pod_mounts_the_secret_and_reads_it(
    pools: bool, tmp_path: Path
) -> None:
    raw = spec(tls=TLS)
    if pools:
        raw["stages"] = {
            "denoiser": {"pools": [CPU_POOL, {**CPU_POOL, "name": "cpu2", "accelerator": "cpu2"}]}
        }
    rendered = workloads(render_all(OWNER, parse_spec(raw)))
    expected = 5 if pools else 4
    assert len(rendered) == expected, sorted(rendered)
    # The Secret's files as the kubelet would put them, for the pods' own flag parser.
    from disagfusion.worker.security.certs import LocalCA

    ca = LocalCA()
    files = ca.write(tmp_path, "peer")
    for source, name in zip((files.cert, files.key, files.ca), TLS_KEYS, strict=True):
        (tmp_path / name).write_bytes(source.read_bytes())
    for key, body in rendered.items():
        spec_ = pod(body)
        (volume,) = [v for v in spec_["volumes"] if v["name"] == TLS_VOLUME]
        assert volume["secret"]["secretName"] == "sd-tls", key
        assert [i["key"] for i in volume["secret"]["items"]] == list(TLS_KEYS), key
        assert volume["secret"]["defaultMode"] == 0o440, key
        c = spec_["containers"][0]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == TLS_VOLUME]
        assert mount == {"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}, key
        args = build_parser().parse_args(c["args"])
        assert (args.tls_cert, args.tls_key, args.tls_ca) == tuple(
            f"{TLS_MOUNT}/{k}" for k in TLS_KEYS
        ), key
        assert args.tls_allow_plaintext_data is False, key
        for attr in ("tls_cert", "tls_key", "tls_ca"):
            setattr(args, attr, getattr(args, attr).replace(TLS_MOUNT, str(tmp_path)))
        tls = tls_settings(args, args.transport)
        assert tls is not None and tls.ca == ca.pem, key
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(body, version, strict=True)


def test_allow_plaintext_data_reaches_every_pod() -> None:
    s = parse_spec(spec(backend="torch", tls={**TLS, "allowPlaintextData": True}))
    for key, body in workloads(render_all(OWNER, s)).items():
        args = build_parser().parse_args(pod(body)["containers"][0]["args"])
        assert args.transport == "torch" and args.tls_allow_plaintext_data, key


def test_a_tls_change_changes_the_pods_input_hash() -> None:
    plain = workloads(render_all(OWNER, parse_spec(spec())))
    secure = workloads(render_all(OWNER, parse_spec(spec(tls=TLS))))
    for key in plain:
        assert plain[key]["metadata"]["annotations"] != secure[key]["metadata"]["annotations"]


# ---- the CRD -------------------------------------------------------------------------


def transport_schema(crd: Path) -> dict[str, Any]:
    doc = yaml.safe_load(crd.read_text())
    spec_ = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return dict(spec_["properties"]["transport"])


def test_both_crd_copies_carry_the_same_tls_schema() -> None:
    source, copy = (transport_schema(d / CRD_NAME) for d in CRDS)
    assert source == copy
    tls = source["properties"]["tls"]
    assert tls["required"] == ["secretName"]
    assert set(tls["properties"]) == {"secretName", "allowPlaintextData"}
    assert tls["properties"]["allowPlaintextData"]["default"] is False


@pytest.mark.parametrize("backend", ["grpc", "shm", "torch", "nixl"])
@pytest.mark.parametrize("allow", [None, False, True])
@pytest.mark.parametrize("with_tls", [False, True])
def test_the_cel_rule_and_the_operator_agree(
    backend: str, allow: bool | None, with_tls: bool
) -> None:
    schema = transport_schema(CRDS[0] / CRD_NAME)
    obj: dict[str, Any] = {"backend": backend}
    if with_tls:
        obj["tls"] = dict(TLS) if allow is None else {**TLS, "allowPlaintextData": allow}
    env = celpy.Environment()
    (rule,) = schema["x-kubernetes-validations"]
    program = env.program(env.compile(rule["rule"]))
    cel_ok = bool(program.evaluate({"self": celpy.json_to_cel(obj)}))
    operator_ok = not [p for p in validate_spec(spec(**obj)) if "allowPlaintextData" in p]
    assert cel_ok == operator_ok
    assert cel_ok == (not with_tls or backend in ("grpc", "shm") or bool(allow))


# ---- the chart's cert-manager Certificate --------------------------------------------


def test_the_chart_renders_no_certificate_by_default() -> None:
    assert not [d for d in template([]) if d["kind"] == "Certificate"]


def test_the_chart_certificate_writes_the_secret_the_pipelines_name() -> None:
    values = [
        "tls.certManager.enabled=true",
        "tls.certManager.issuerRef.name=pipeline-ca",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
        "tls.certManager.secretName=sd-tls",
        "tls.certManager.dnsNames[0]=extra.example",
        f"watchNamespace={WATCHED}",
    ]
    (cert,) = [d for d in template(values) if d["kind"] == "Certificate"]
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["metadata"]["namespace"] == WATCHED  # where the pipelines are
    s = cert["spec"]
    assert s["secretName"] == "sd-tls"
    assert s["dnsNames"] == ["disagfusion-peer", "extra.example"]
    assert {"server auth", "client auth"} <= set(s["usages"])
    assert s["issuerRef"] == {
        "name": "pipeline-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    other = [*values[:-1], "tls.certManager.namespace=ml"]
    (cert,) = [d for d in template(other) if d["kind"] == "Certificate"]
    assert cert["metadata"]["namespace"] == "ml"
    (cert,) = [d for d in template(values[:2]) if d["kind"] == "Certificate"]
    assert cert["metadata"]["namespace"] == NAMESPACE


def test_the_chart_certificate_needs_an_issuer() -> None:
    from tests.operator.test_chart import RELEASE, helm

    proc = helm(
        "template", RELEASE, str(CHART), "--set", "tls.certManager.enabled=true", check=False
    )
    assert proc.returncode != 0
    assert "/tls/certManager/issuerRef/name" in proc.stderr, proc.stderr
