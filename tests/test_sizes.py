"""Sizes (issue 18): no module in ``rarn/`` or ``pipeline/`` over 400 lines, no function over 80
(docstring included), so each stays one idea a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("rarn", "pipeline") for p in (ROOT / d).rglob("*.py"))
MAX_MODULE, MAX_FUNCTION = 400, 80
# Over the limit in files another branch is editing now; split there, then remove from here.
PENDING: set[tuple[str, str]] = set()


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE, f"{path.name}: {lines} lines (at most {MAX_MODULE})"
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION
        and (path.name, n.name) not in PENDING
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION} lines: {', '.join(long)}"
