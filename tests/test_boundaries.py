"""Policy modules stay pure: no network, clock, kopf, kubernetes, grpc or torch imports.

The same policy code must run in the workers, the operator, the tests and the
simulator, so it may only compute on what it is given (see DESIGN.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POLICY_MODULES = [
    "worker/dispatch.py",
    "worker/api.py",
    "worker/params.py",
    "worker/restarts.py",
    "operator/spec.py",
    "operator/render.py",
    "operator/conditions.py",
    "operator/traces.py",
    "operator/simulate.py",
    "operator/baselines.py",
    "operator/planner.py",
    "operator/profile.py",
    "operator/builtin_profiles.py",
    "operator/observe.py",
]
FORBIDDEN = {
    "aiohttp",
    "asyncio",
    "grpc",
    "kopf",
    "kubernetes",
    "requests",
    "socket",
    "subprocess",
    "time",
    "torch",
    "diffusers",
    "transformers",
    "urllib",
    "prometheus_client",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", POLICY_MODULES)
def test_policy_module_imports_no_io(module: str) -> None:
    bad = imported_roots(REPO / module) & FORBIDDEN
    assert not bad, f"{module} imports {sorted(bad)}; keep policy pure and pass data in"


def test_no_top_level_operator_package_shadows_the_stdlib() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter"), operator.__file__
