"""The package's layout: imports point one way, and each process's folder stays its own.

The graph counts every import of a raylight module, at the top of a file or inside a
function (a function-level import cannot hide a cycle from it). Imports under
``if TYPE_CHECKING:`` are left out: they never run, they only name a type. Importing a
submodule runs its parent package's ``__init__`` too; those implicit edges are left out,
as import linters do (the root ``__init__`` re-exports the public names and would be in
every cycle otherwise).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raylight"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            found += [n for child in node.orelse for n in _imports(ast.Module([child], []))]
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        found += _imports(node)
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    targets = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    import raylight.rank.hooks\n")
    assert [alias.name for node in _imports(tree) for alias in node.names] == [
        "raylight.rank.hooks"
    ]


def _imported_by(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        name: targets
        for name, targets in _graph().items()
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    }


def _reaching(graph: dict[str, set[str]], forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        name: {t for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)}
        for name, targets in graph.items()
        if any(t == f or t.startswith(f + ".") for t in targets for f in forbidden)
    }


def test_rank_and_shared_modules_never_import_the_driver():
    bad = _reaching(
        _imported_by(("raylight.rank", "raylight.shared")), ("raylight.driver", "raylight.trainer")
    )
    assert not bad, f"rank/shared modules importing the driver side: {bad}"


def test_the_user_facing_base_classes_import_nothing_of_the_engine():
    bad = _reaching(
        _imported_by(("raylight.module", "raylight.datamodule", "raylight.core")),
        ("raylight.rank", "raylight.driver", "raylight.trainer"),
    )
    assert not bad, f"module.py / datamodule.py / core importing the engine: {bad}"
