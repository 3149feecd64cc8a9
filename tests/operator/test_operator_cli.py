"""`disagfusion operator` started exactly as a user starts it, against KMock.

No test-only login handler: the subprocess gets a kubeconfig (server URL +
bearer-token user) in $KUBECONFIG and must log in the way it would against a
real cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from disagfusion.worker.local.launcher import free_port
from tests.operator.emulator import (
    CRD,
    DEPLOY,
    NS,
    STAGES,
    STS,
    SVC,
    Cluster,
    condition,
    eventually,
)
from tests.operator.kubeconfig import write_kubeconfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-local.yaml"
TOKEN = "s3cret-token"
NETPOL = kmock.resource("networking.k8s.io", "v1", "networkpolicies")
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
NODES = {"ipBlock": {"cidr": "172.18.0.0/16"}}
WORKER_IMAGE = "registry.example/disagfusion-worker:9"
pytestmark = pytest.mark.timeout(120)


def _operator_env(kubeconfig: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(kubeconfig)
    return env


async def _start_operator(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "disagfusion",
        "operator",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


async def test_operator_logs_in_with_a_kubeconfig_and_reconciles_the_example(
    cluster: Cluster, tmp_path: Path
) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.url, TOKEN)
    metrics_port = free_port()
    env = _operator_env(kubeconfig)
    env["DISAGFUSION_WORKER_IMAGE"] = WORKER_IMAGE  # as the chart sets it
    env["DISAGFUSION_METRICS_FROM"] = json.dumps([PROMETHEUS])
    env["DISAGFUSION_PROBES_FROM"] = json.dumps([NODES])
    proc = await _start_operator(env, "--all-namespaces", "--metrics-port", str(metrics_port))
    try:
        body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        body["metadata"]["namespace"] = NS  # kubectl apply -n ml -f examples/tiny-local.yaml
        await cluster.create(body)
        name = body["metadata"]["name"]
        for stage in STAGES:
            sts = await eventually(partial(cluster.get, STS, f"{name}-{stage}"), timeout=60)
            assert sts["spec"]["replicas"] == 1
            # The example sets no spec.image: the chart's worker image is used.
            assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == WORKER_IMAGE
            await eventually(partial(cluster.get, SVC, f"{name}-{stage}"))
        # The chart's peers are admitted to every stage worker's HTTP port.
        for stage in STAGES:
            policy = await eventually(partial(cluster.get, NETPOL, f"{name}-{stage}"))
            http = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 8080]
            assert http == [
                {"from": [PROMETHEUS, NODES], "ports": [{"protocol": "TCP", "port": 8080}]}
            ]
        await eventually(lambda: cluster.get(DEPLOY, f"{name}-gateway"))
        await eventually(lambda: cluster.get(SVC, f"{name}-gateway"))
        status = await eventually(
            lambda: condition(cluster.get(CRD, name), "Ready") and cluster.get(CRD, name)
        )
        assert status["status"]["gateway"]["endpoint"] == f"http://{name}-gateway.{NS}.svc:8000"
        # It authenticated as the kubeconfig's token user.
        auth = {r.headers.get("Authorization") for r in cluster.emulator._requests}
        assert f"Bearer {TOKEN}" in auth
        # The counter moves once the round that wrote the status returns.
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        seen: list[str] = []

        async def counted() -> bool:
            seen[:] = [await asyncio.to_thread(_scrape, metrics_url)]
            return 'disagfusion_operator_reconcile_total{result="ok"}' in seen[0]

        deadline = asyncio.get_running_loop().time() + 30
        while not await counted():
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.2)

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stdout is not None
    log = (await proc.stdout.read()).decode(errors="replace")
    assert "LoginError" not in log and "authentication has failed" not in log, log


async def test_operator_without_any_cluster_configuration_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    proc = await _start_operator(_operator_env(tmp_path / "missing-kubeconfig"))
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1, lines
    assert "KUBECONFIG" in lines[0] and "cluster" in lines[0]
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[{namespaceSelector: x}]", "DISAGFUSION_METRICS_FROM is not JSON"),
        ('[{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]', "set ipBlock, or"),
    ],
)
async def test_operator_with_bad_network_peers_from_the_chart_says_so_in_one_line(
    cluster: Cluster, tmp_path: Path, value: str, says: str
) -> None:
    env = _operator_env(write_kubeconfig(tmp_path / "kubeconfig", cluster.url, TOKEN))
    env["DISAGFUSION_METRICS_FROM"] = value
    proc = await _start_operator(env, "--metrics-port", "0")
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and says in lines[0], lines
    assert "DISAGFUSION_METRICS_FROM" in lines[0]
