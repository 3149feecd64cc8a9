"""Fixtures for the end-to-end tests against a real cluster (see e2e/README.md).

Every test here is marked `e2e` and skipped unless DISAGFUSION_E2E=1: the
suite needs a cluster (the current kubectl context, e.g. the kind cluster of
e2e/run.sh) where the chart is installed and the worker image is loadable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster import ENABLED, SKIP_REASON, E2EConfig, Kubectl, config, example_pipeline


@pytest.fixture(scope="session")
def e2e() -> E2EConfig:
    if not ENABLED:
        pytest.skip(SKIP_REASON)
    return config()


@pytest.fixture(scope="session")
def kubectl(e2e: E2EConfig) -> Kubectl:
    return Kubectl(e2e)


@pytest.fixture(scope="session")
def namespace(e2e: E2EConfig, kubectl: Kubectl) -> Iterator[str]:
    created = False
    if kubectl("get", "namespace", e2e.namespace, check=False).strip() == "":
        kubectl("create", "namespace", e2e.namespace)
        created = True
    yield e2e.namespace
    if created and not e2e.keep:
        kubectl("delete", "namespace", e2e.namespace, "--wait=false", check=False)


@pytest.fixture(scope="session")
def pipeline(e2e: E2EConfig, kubectl: Kubectl, namespace: str) -> Iterator[dict[str, Any]]:
    """The tiny example applied to the cluster; deleted (with its children) at the end."""
    body = example_pipeline(e2e)
    name = body["metadata"]["name"]
    kubectl("apply", "-f", "-", stdin=json.dumps(body))
    yield body
    if not e2e.keep:
        kubectl("delete", "dfp", name, "--wait=true", "--timeout=180s", check=False, timeout=240)
