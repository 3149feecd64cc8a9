"""A kubeconfig file for a KMock server: how the tests point the operator at it.

The operator logs in the way it does in production (kopf's login_via_client
reads $KUBECONFIG), so the tests give it a kubeconfig instead of a login
handler of their own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import yaml


def kubeconfig(server: str, token: str = "test-token", namespace: str = "default") -> str:
    """A kubeconfig with one context: `server` with a bearer-token user."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": server}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kmock",
                    "context": {"cluster": "kmock", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "kmock",
        }
    )


def write_kubeconfig(path: Path, server: str, token: str = "test-token") -> Path:
    path.write_text(kubeconfig(server, token))
    return path


@contextlib.contextmanager
def kubeconfig_env(server: str, token: str = "test-token") -> Iterator[Path]:
    """The suite's $KUBECONFIG (tests/conftest.py) points at `server` inside the block.

    The file is rewritten rather than the variable changed: the kubernetes
    client read the variable once, at import."""
    path = Path(os.environ["KUBECONFIG"])
    write_kubeconfig(path, server, token)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
