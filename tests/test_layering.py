"""The pure libraries must not import Prefect, read argv/env, or print."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_PACKAGES = ("maisi_core", "catalog")


def _python_files():
    for pkg in PURE_PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", list(_python_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_library_imports_no_prefect_and_reads_no_environment(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert not name.split(".")[0].startswith("prefect"), f"{path}: imports {name}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert not (node.value.id == "os" and node.attr in {"environ", "getenv"}), f"{path}: reads env"
            assert not (node.value.id == "sys" and node.attr == "argv"), f"{path}: reads argv"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{path}: calls print"
