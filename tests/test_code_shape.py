"""The training package's shape (issue 13): no god-functions, no reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_FILES = sorted((ROOT / "training").rglob("*.py"))
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("path", TRAINING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_in_training_is_longer_than_80_lines(path: Path) -> None:
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]  # fmt: skip
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"


@pytest.mark.parametrize("path", TRAINING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_imports_no_private_name_of_another_module(path: Path) -> None:
    private = [
        f"from {node.module} import {alias.name} (line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in {"training", "models"}
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private, f"{path.relative_to(ROOT)}: {', '.join(private)}"
