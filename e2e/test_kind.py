"""End to end on a real cluster: apply the tiny example, serve an image, scale the denoiser.

Run through e2e/run.sh (kind), or against any cluster where the chart is
installed: `DISAGFUSION_E2E=1 pytest e2e -m e2e` (see e2e/README.md).
The tests share one pipeline and run in file order.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from e2e.cluster import ENABLED, SKIP_REASON, E2EConfig, Kubectl, eventually, http

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not ENABLED, reason=SKIP_REASON),
    pytest.mark.timeout(1800),
]

STAGES = ("encoder", "denoiser", "decoder")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def name_of(pipeline: dict[str, Any]) -> str:
    name: str = pipeline["metadata"]["name"]
    return name


def wait_ready(kubectl: Kubectl, e2e: E2EConfig, name: str) -> None:
    """`kubectl wait dfp/<name> --for=condition=Ready`, with diagnostics when it times out."""
    timeout = e2e.ready_timeout_s
    result = kubectl(
        "wait",
        f"dfp/{name}",
        "--for=condition=Ready",
        f"--timeout={timeout}s",
        timeout=timeout + 60,
        check=False,
    )
    if "condition met" not in result:
        pods = kubectl("get", "pods", "-o", "wide", check=False)
        raise AssertionError(
            f"dfp/{name} not Ready after {timeout}s\n{kubectl.describe('dfp', name)}\n{pods}"
        )


def generate(port: int, seed: int) -> bytes:
    status, body = http(
        "POST",
        f"http://127.0.0.1:{port}/v1/images/generations",
        {"prompt": "a red fox", "size": "64x64", "seed": seed, "num_inference_steps": 4},
    )
    assert status == 200, body[:2000]
    answer = json.loads(body)
    assert answer["data"][0]["seed"] == seed
    image = base64.b64decode(answer["data"][0]["b64_json"])
    assert image.startswith(PNG_MAGIC)
    return image


def gateway_ready(port: int) -> bool:
    return http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200


def gateway_port(pipeline: dict[str, Any]) -> int:
    port: int = pipeline["spec"].get("gateway", {}).get("port", 8000)
    return port


def patch_denoiser(kubectl: Kubectl, name: str, replicas: int) -> None:
    patch = {"spec": {"stages": {"denoiser": {"replicas": replicas}}}}
    kubectl("patch", "dfp", name, "--type", "merge", "-p", json.dumps(patch))


def sts_replicas(kubectl: Kubectl, name: str) -> tuple[int, int]:
    """(spec.replicas, status.readyReplicas) of a StatefulSet."""
    sts = kubectl.json("statefulset", name)
    return sts["spec"]["replicas"], sts.get("status", {}).get("readyReplicas", 0)


def test_pipeline_becomes_ready(e2e: E2EConfig, kubectl: Kubectl, pipeline: dict[str, Any]) -> None:
    name = name_of(pipeline)
    wait_ready(kubectl, e2e, name)
    for stage in STAGES:
        sts = kubectl.json("statefulset", f"{name}-{stage}")
        assert sts["spec"]["replicas"] == 1
        assert sts["status"].get("readyReplicas") == 1
        owners = sts["metadata"].get("ownerReferences", [])
        assert [(o["kind"], o["name"]) for o in owners] == [("DiffusionPipeline", name)]
        kubectl.json("service", f"{name}-{stage}")  # the headless Service exists
    deploy = kubectl.json("deployment", f"{name}-gateway")
    assert deploy["status"].get("readyReplicas") == deploy["spec"]["replicas"]
    status = kubectl.json("dfp", name)["status"]
    assert status.get("observedGeneration") == kubectl.json("dfp", name)["metadata"]["generation"]
    for stage in STAGES:
        assert status["stages"][stage]["readyReplicas"] == 1
    assert status["gateway"]["endpoint"]
    expected = e2e.worker_image or e2e.default_worker_image
    if expected is not None:  # spec.image if set, else the chart's workerImage, in every pod
        workloads = [("statefulset", f"{name}-{s}") for s in STAGES]
        for kind, child in [*workloads, ("deployment", f"{name}-gateway")]:
            (c,) = kubectl.json(kind, child)["spec"]["template"]["spec"]["containers"]
            assert c["image"] == expected, (child, c["image"])


def test_gateway_serves_an_image(
    e2e: E2EConfig, kubectl: Kubectl, pipeline: dict[str, Any]
) -> None:
    name = name_of(pipeline)
    wait_ready(kubectl, e2e, name)
    with kubectl.port_forward(f"svc/{name}-gateway", gateway_port(pipeline)) as port:
        eventually(lambda: gateway_ready(port), 120, "the gateway's /readyz")
        first = generate(port, seed=1)
        assert generate(port, seed=1) == first, "same seed, same image"
        status, metrics = http("GET", f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert re.search(rb'disagfusion_gateway_requests_total\{[^}]*code="200"', metrics)


def test_denoiser_follows_a_replicas_patch(
    e2e: E2EConfig, kubectl: Kubectl, pipeline: dict[str, Any]
) -> None:
    name = name_of(pipeline)
    sts = f"{name}-denoiser"
    wait_ready(kubectl, e2e, name)

    patch_denoiser(kubectl, name, 2)
    eventually(lambda: sts_replicas(kubectl, sts)[0] == 2, 120, f"{sts} spec.replicas = 2")
    eventually(lambda: sts_replicas(kubectl, sts) == (2, 2), e2e.ready_timeout_s, f"{sts} 2 ready")
    wait_ready(kubectl, e2e, name)
    eventually(
        lambda: kubectl.json("dfp", name)["status"]["stages"]["denoiser"]["readyReplicas"] == 2,
        120,
        "status.stages.denoiser.readyReplicas = 2",
    )
    with kubectl.port_forward(f"svc/{name}-gateway", gateway_port(pipeline)) as port:
        eventually(lambda: gateway_ready(port), 120, "the gateway's /readyz")
        for seed in range(4):  # both denoisers take work; every request still succeeds
            generate(port, seed)

    patch_denoiser(kubectl, name, 1)
    eventually(lambda: sts_replicas(kubectl, sts)[0] == 1, 120, f"{sts} spec.replicas = 1")
    eventually(
        lambda: sts_replicas(kubectl, sts) == (1, 1), e2e.ready_timeout_s, f"{sts} back to 1"
    )
    wait_ready(kubectl, e2e, name)
