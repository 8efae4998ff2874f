"""Issue 12 item 1: catalog and spec commands never import torch or MONAI (they cost seconds to import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _catalog_cases import make_failed_record, write_case

from catalog.store import open_catalog

SPECS = Path(__file__).resolve().parent.parent / "specs"
PROBE = """\
import sys
from flows.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "monai", "prefect") if m in sys.modules)
print("\\nPROBE", code, ",".join(heavy))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("light") / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i) for i in range(3)] + [make_failed_record(3)])
    return root


@pytest.mark.parametrize("command", [
    ["check-spec", str(SPECS / "demo.yaml")],
    ["check-spec", str(SPECS / "chest_tumor.yaml")],
    ["catalog", "query", "ROOT"],
    ["catalog", "query", "ROOT", "--sql", "SELECT count(*) AS n FROM samples"],
    ["catalog", "history", "ROOT"],
    ["catalog", "verify", "ROOT"],
    ["catalog", "export", "ROOT", "--format", "msd", "--dest", "DEST"],
])
def test_command_runs_without_torch_monai_or_prefect(command, root, tmp_path):
    argv = [str(root) if a == "ROOT" else str(tmp_path / "export") if a == "DEST" else a for a in command]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    probe = done.stdout.strip().splitlines()[-1].split(" ")
    assert probe[1] == "0", done.stderr[-2000:]
    assert probe[2:] in ([], [""]), f"{' '.join(command[:2])} imported {probe[2:]}"
