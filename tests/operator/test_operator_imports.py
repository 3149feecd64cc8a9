"""The operator's modules import each other without cycles.

handlers.py registers the autoscale timer, so it imports autoscale/timer.py;
the timer must never import handlers.py back (what they share is context.py).
Imports under `if TYPE_CHECKING:` and inside functions count too: a cycle
hidden there is still a cycle the next refactor trips over.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator"
PREFIX = "disagfusion.operator."


def module_name(path: Path) -> str:
    parts = path.relative_to(OPERATOR).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return PREFIX + ".".join(parts)


def operator_imports(path: Path, known: set[str]) -> set[str]:
    """The operator modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` names a module; `from mod import name` names mod.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in OPERATOR.rglob("*.py")}
    known = set(files)
    return {name: operator_imports(path, known) - {name} for name, path in files.items()}


def test_the_graph_sees_the_modules() -> None:
    graph = import_graph()
    timer, handlers = PREFIX + "autoscale.timer", PREFIX + "handlers"
    assert {timer, handlers, PREFIX + "autoscale.plan", PREFIX + "context"} <= set(graph)
    assert timer in graph[handlers]  # the registration: the one allowed direction
    assert PREFIX + "context" in graph[timer]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> what it imports), or None."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        return list(err.args[1])
    return None


def test_no_import_cycle() -> None:
    found = cycle(import_graph())
    assert found is None, f"operator import cycle: {' -> '.join(found or [])}"
    # As the timer importing handlers back would be seen:
    graph = import_graph()
    graph[PREFIX + "autoscale.timer"].add(PREFIX + "handlers")
    assert cycle(graph) is not None


def test_the_autoscaler_never_imports_the_handlers() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(PREFIX + "autoscale"):
            assert PREFIX + "handlers" not in deps, f"{name} imports handlers"


def test_hidden_imports_count(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from disagfusion.operator.handlers import Context\n"
        "def f():\n"
        "    from disagfusion.operator.autoscale import timer\n"
    )
    known = {PREFIX + "handlers", PREFIX + "autoscale.timer", PREFIX + "autoscale"}
    assert operator_imports(module, known) == known
