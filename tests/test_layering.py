"""The pure libraries must not import Prefect, read argv/env, or print; the application layer imports no Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_PACKAGES = ("maisi_core", "catalog")


def _python_files():
    for pkg in PURE_PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "factory").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_application_layer_imports_neither_prefect_nor_the_flows(path: Path):
    """Issue 13: ``factory`` is plain; ``flows`` wires it into Prefect, never the other way round."""
    for name in _imports(path):
        assert not name.split(".")[0].startswith("prefect"), f"{path}: imports {name}"
        assert name.split(".")[0] != "flows", f"{path}: imports {name}"


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


def _catalog_imports_of_maisi_core() -> set[str]:
    """The ``maisi_core`` modules the catalog imports anywhere (module level or inside functions)."""
    found = set()
    for path in sorted((ROOT / "catalog").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("maisi_core"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("maisi_core"))
    return found


def test_catalog_never_pulls_in_torch_or_monai():
    """Issue 13: every catalog module, and every maisi_core module it imports (even lazily), is torch-free."""
    import subprocess
    import sys

    modules = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "catalog").rglob("*.py")
                      if p.stem != "__init__"} | _catalog_imports_of_maisi_core())
    assert "catalog.viewer.server" in modules  # subpackages too
    assert "maisi_core.anatomy.labels" in modules  # the scan sees the lazy imports
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = sorted(m for m in ('torch', 'monai', 'prefect') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {modules} loads {done.stdout.strip()}"
