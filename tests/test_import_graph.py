"""pyipc's modules import each other without a circle, and the base class
imports no backend.

The graph is read from the source with ``ast``: every import of a pyipc
module, at module level or inside a function (a lazy import closes a
circle as surely, only later), except under ``if TYPE_CHECKING:`` (never
run). A cycle fails with its path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyipc"
BACKEND_MODULES = {"pyipc._native", "pyipc._backend"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _resolve(module: str, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module a ``from`` import names (None: not pyipc's)."""
    if node.level == 0:
        return node.module
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def edges(module: str) -> set[str]:
    """The pyipc modules ``module`` imports."""
    out: set[str] = set()
    for node in _imports(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            target = _resolve(module, node)
            if target is None:
                continue
            # "from . import _threads" imports a module; "from . import Context" a name.
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                     for a in node.names]
        out.update(n for n in names if n in MODULES and n != module)
    return out


GRAPH = {m: edges(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of ``graph`` as a path (first node repeated last), or None."""
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    assert "pyipc._checks" in GRAPH["pyipc._context"]
    assert "pyipc._pure.context" in GRAPH["pyipc._backend"]    # a lazy import counts
    assert "pyipc._pure.context" not in GRAPH["pyipc._pure.conn_table"]  # TYPE_CHECKING


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_a_cycle_is_found():
    """The search is not vacuous: a lazy import back from the base class
    (what _context did before) is a cycle."""
    graph = {m: set(e) for m, e in GRAPH.items()}
    graph["pyipc._context"].add("pyipc._backend")
    assert find_cycle(graph) is not None


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_base_class_imports_no_backend():
    reached = reachable("pyipc._context")
    assert not reached & BACKEND_MODULES
    assert not any(m.startswith("pyipc._pure") for m in reached)


def test_the_shared_modules_import_no_backend():
    for shared in ("pyipc._checks", "pyipc._events", "pyipc._types", "pyipc._threads"):
        reached = reachable(shared) | {shared}
        assert not reached & (BACKEND_MODULES | {"pyipc._context"}), shared
        assert not any(m.startswith("pyipc._pure") for m in reached), shared


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in
                                          ("pyipc.__main__", "pyipc._native")))
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """Imported first, on its own: a circle that only shows in one import
    order fails here (the native backend is imported by test_api's tests,
    and needs its library)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"],
                          cwd=PACKAGE.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
