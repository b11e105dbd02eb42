"""The rooms of ``rarn/`` and the one direction of their imports (issue 18).

Every ``import`` in ``rarn/`` (module level, inside functions and under ``TYPE_CHECKING`` alike,
read with ``ast`` so nothing is executed) must point to its own room or to a room on a lower
floor; the modules must not import each other in a circle. The package root ``rarn/__init__.py``
is the front door above every room (its lazy exports name them all) and is not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RARN = Path(__file__).resolve().parents[1] / "rarn"

# room -> floor: a room imports only rooms on lower floors (never one on its own floor but its own)
FLOORS: dict[str, int] = {
    "space": 0,  # op registry, PRIMITIVES, Genotype: the search space
    "config": 0,  # typed configs; registries check their own names (rarn.config.rules)
    "checkpoint": 1,
    "stats": 1,
    "data": 2,
    "models": 3,
    "lipschitz": 4,
    "robust": 5,
    "nas": 6,
    "study": 7,
}


def _module_name(path: Path, root: Path = RARN) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = RARN) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``rarn`` import in the file, wherever it sits."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "rarn"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "rarn":
                continue
            # ``from rarn.x import y`` may import the submodule rarn.x.y
            out += [(node.lineno, name)]
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported rarn module: line}, for the modules that exist."""
    files = {_module_name(p): p for p in RARN.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges: dict[str, int] = {}
        for line, target in _imports(path):
            if target in files and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root


def test_every_module_is_in_a_room() -> None:
    rooms = {_room(m) for m in _graph()} - {None}
    assert rooms <= set(FLOORS), f"rooms without a floor in FLOORS: {rooms - set(FLOORS)}"


def test_imports_never_run_back_up() -> None:
    bad = []
    for module, edges in _graph().items():
        here = _room(module)
        if here is None:
            continue
        for target, line in edges.items():
            there = _room(target)
            if there is None:
                bad.append(f"{module}:{line} imports the package root")
            elif there != here and FLOORS[there] >= FLOORS[here]:
                bad.append(
                    f"{module}:{line} ({here}, floor {FLOORS[here]}) imports {target} "
                    f"({there}, floor {FLOORS[there]})"
                )
    assert not bad, "imports running back up between rooms:\n" + "\n".join(bad)


def test_config_and_space_import_no_other_room() -> None:
    for module, edges in _graph().items():
        if _room(module) in ("config", "space"):
            others = {_room(t) for t in edges} - {_room(module)}
            assert not others, f"{module} imports {others}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t in e if _room(t) is not None} for m, e in _graph().items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source", ["import rarn.data.sources", "from ..data import sources"])
def test_the_walker_sees_relative_and_absolute_imports(tmp_path: Path, source: str) -> None:
    pkg = tmp_path / "rarn" / "nas"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text(f"def f():\n    {source}\n")
    assert any(t.startswith("rarn.data") for _, t in _imports(f, tmp_path / "rarn"))
