"""The rooms of the house stay apart (DESIGN.md), checked by folder.

- Policy is pure: every module under scheduling/, every operator module but
  the named I/O ones, and the named pure worker modules import no network,
  clock, kopf, kubernetes, grpc or torch. A new file there is covered without
  editing this test.
- worker/ never imports operator/, and operator/ never imports worker/; both
  may import scheduling/ and proto/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The operator's I/O: the Kubernetes client, kopf handlers, metrics, the
# process, Prometheus queries and the autoscale timer. Everything else there is pure.
OPERATOR_IO = {
    "operator/kube.py",
    "operator/handlers.py",
    "operator/context.py",
    "operator/metrics.py",
    "operator/run.py",
    "operator/autoscale/prometheus.py",
    "operator/autoscale/timer.py",
}
PURE_WORKER = [
    "worker/params.py",
    "worker/gateway/api.py",
    "worker/gateway/slo.py",
    "worker/runtime/dispatch.py",
    "worker/local/restarts.py",
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
    "matplotlib",
}


def _modules(folder: str) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py"))


def pure_modules() -> list[str]:
    operator = [m for m in _modules("operator") if m not in OPERATOR_IO]
    return _modules("scheduling") + operator + PURE_WORKER


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_walk_sees_the_rooms() -> None:
    pure = pure_modules()
    assert "scheduling/hybrid.py" in pure and "scheduling/sim/simulate.py" in pure
    assert "operator/render.py" in pure and "operator/autoscale/observe.py" in pure
    assert "operator/kube.py" not in pure
    assert all((REPO / m).is_file() for m in OPERATOR_IO | set(PURE_WORKER))


@pytest.mark.parametrize("module", pure_modules())
def test_policy_module_imports_no_io(module: str) -> None:
    bad = roots(imports(REPO / module)) & FORBIDDEN
    assert not bad, f"{module} imports {sorted(bad)}; keep policy pure and pass data in"


@pytest.mark.parametrize(
    ("folder", "other"),
    [("worker", "disagfusion.operator"), ("operator", "disagfusion.worker")],
)
def test_the_data_plane_and_the_controller_never_import_each_other(folder: str, other: str) -> None:
    crossing = {
        module: sorted(n for n in imports(REPO / module) if n == other or n.startswith(other + "."))
        for module in _modules(folder)
    }
    assert not {m: n for m, n in crossing.items() if n}, f"{folder}/ imports {other}"


def test_the_purity_check_catches_an_io_import(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text("def f():\n    import time\n    from kubernetes import client\n")
    assert roots(imports(module)) & FORBIDDEN == {"time", "kubernetes"}


def test_no_top_level_operator_package_shadows_the_stdlib() -> None:
    # In a fresh interpreter started at the repository root, as `python -m` is.
    found = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not found.startswith(str(REPO)), found
