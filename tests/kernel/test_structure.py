"""The code's shape, measured: no function in the library is longer than 80 lines, and the entry points' `main`
functions read as short stories (under 50 lines). Import layering is checked by `make lint` (import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("ftctl", "tasks", "methods", "launch")
LONGEST = 80


def functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_no_function_over_80_lines():
    long = [
        f"{path.relative_to(REPO)}:{name} ({length} lines)"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for name, length in functions(path)
        if length > LONGEST
    ]
    assert not long, long


@pytest.mark.parametrize("module", ["launch/train.py", "launch/evaluate.py"])
def test_entry_point_main_is_short(module):
    lengths = dict(functions(REPO / module))
    assert lengths["main"] < 50, lengths["main"]


def test_the_measure_sees_a_long_function(tmp_path):
    """The measure itself can fail: a 90-line function is seen as 90 lines."""
    source = tmp_path / "long.py"
    source.write_text("def f():\n" + "    x = 1\n" * 89)
    assert functions(source) == [("f", 90)]
