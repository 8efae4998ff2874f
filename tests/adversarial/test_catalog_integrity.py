"""A damaged, crashed or unreachable catalog through the ``ctfactory`` CLI: exact exit codes, one-line errors.

Findings of the outside adversarial run on 3874b3d: a corrupt ``_delta_log`` entry or a deleted Parquet
data file gave a DeltaError/FileNotFoundError traceback (exit 1) from ``catalog verify`` and ``query``,
and verify said nothing of repeated sample_ids or of what a kill leaves behind. Now ``catalog verify``
exits 0 clean, 1 problems found, 2 could not read; every catalog command reports an unreadable catalog
as one line naming the file and the cause (exit 2); ``verify --repair`` removes leftovers older than
``--min-age`` and repeated rows. Nothing is ever written outside the root.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from deltalake import write_deltalake
from _catalog_cases import make_failed_record, write_case

from catalog.schema import SAMPLES_SCHEMA, rows_to_table
from catalog.store import open_catalog
from flows.cli import main

COMMANDS = {
    "verify": ["catalog", "verify", "{root}"],
    "query": ["catalog", "query", "{root}", "--qc", "pass"],
    "query --sql": ["catalog", "query", "{root}", "--sql", "SELECT count(*) AS n FROM samples"],
    "history": ["catalog", "history", "{root}"],
    "export": ["catalog", "export", "{root}", "--format", "msd", "--dest", "{out}/export"],
    "report": ["report", "{root}", "--dest", "{out}/card.html"],
}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i) for i in range(2)])
    cat.append_samples([write_case(root, 2), make_failed_record(3)])
    return root


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def _run(command: str, root: Path, out: Path, *extra: str) -> int:
    argv = [a.format(root=root, out=out) for a in COMMANDS[command]]
    return main([*argv, *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def _data_files(root: Path) -> list[Path]:
    """The samples table's Parquet files, oldest first (version 0's file first)."""
    return sorted((root / "catalog" / "samples").glob("*.parquet"), key=os.path.getmtime)


DAMAGES = {
    # damage -> (how, the file name the one-line error must name)
    "corrupt log entry": lambda root: _write(root / "catalog" / "samples" / "_delta_log" / "00000000000000000001.json",
                                             b'{"commitInfo": {"timestamp": 1, '),
    "deleted data file": lambda root: _unlink(_data_files(root)[-1]),
    "truncated data file": lambda root: _write(_data_files(root)[-1], _data_files(root)[-1].read_bytes()[:200]),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def _unlink(path: Path) -> str:
    path.unlink()
    return path.name


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_unreadable_catalog_exits_2_with_one_line_naming_the_file(root, tmp_path, capsys, damage, command):
    named = DAMAGES[damage](root)
    before_root, before_outside = _tree(root), _tree(tmp_path)
    code = _run(command, root, tmp_path)
    if command == "history" and damage != "corrupt log entry":
        assert code == 0  # history reads the log only, not the data files
        return
    assert code == 2
    err = _one_line(capsys)
    who = "report" if command == "report" else "catalog"
    assert err.startswith(f"ctfactory {who}: ") and named in err, err
    assert "expects" in err and "but got" in err and "Traceback" not in err
    assert _tree(root) == before_root and _tree(tmp_path) == before_outside  # nothing written anywhere


def test_verify_exit_codes_clean_problems_and_repair(root, tmp_path, capsys):
    out = tmp_path / "outside"
    out.mkdir()
    assert main(["catalog", "verify", str(root)]) == 0
    assert "0 orphan files, 0 duplicate sample_ids, 0 leftover files (+0 younger than 900 s)" in capsys.readouterr().out
    # what 3874b3d's race left: a sample_id committed twice; what a kill leaves: a temp file
    write_deltalake(str(root / "catalog" / "samples"), rows_to_table([make_failed_record(3, seed=5).to_row()],
                                                                     SAMPLES_SCHEMA), mode="append")
    temp = root / "images" / f".case_0007.nii.gz.{'e' * 32}.tmp"
    temp.write_bytes(b"partial")
    stamp = time.time() - 1000
    os.utime(temp, (stamp, stamp))
    before_outside = _tree(out)
    assert main(["catalog", "verify", str(root)]) == 1
    text = capsys.readouterr().out
    assert "1 duplicate sample_ids, 1 leftover files" in text and "  duplicate: case_0003 (2 rows)" in text
    # the temp file is younger than --min-age: maybe a write in progress, so listed, kept and not a problem
    assert main(["catalog", "verify", str(root), "--repair", "--min-age", "2000"]) == 0
    text = capsys.readouterr().out
    assert "repair: kept the earliest row of 1 repeated sample_ids (case_0003) in version 3" in text
    assert "after repair:" in text and "0 duplicate sample_ids, 0 leftover files (+1 younger than 2000 s)" in text
    assert temp.exists()
    assert main(["catalog", "verify", str(root)]) == 1  # older than the default 900 s: a leftover
    assert f"  leftover stray temp (1000 s old): images/{temp.name}" in capsys.readouterr().out
    assert main(["catalog", "verify", str(root), "--repair"]) == 0
    text = capsys.readouterr().out
    assert f"repair: removed stray temp (1000 s old): images/{temp.name}" in text and not temp.exists()
    assert main(["catalog", "verify", str(root)]) == 0
    assert [r["seed"] for r in open_catalog(root).read_table().to_pylist() if r["sample_id"] == "case_0003"] == [1003]
    assert _tree(out) == before_outside


def test_verify_repair_refuses_as_of_and_bad_min_age(root, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["catalog", "verify", str(root), "--repair", "--as-of", "0"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["catalog", "verify", str(root), "--min-age", "-5"])
    assert exc.value.code == 2 and "--min-age expects a number of seconds >= 0, but got '-5'" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["verify", "query", "query --sql", "history"])
def test_unreachable_s3_exits_2_with_one_line(tmp_path, capsys, command):
    options = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1", "max_retries": "0"}
    extra = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    assert _run(command, "s3://nowhere/ds", tmp_path, *extra) == 2
    err = _one_line(capsys)
    assert err.startswith("ctfactory catalog: Catalog expects a readable samples table at "
                          "s3://nowhere/ds/catalog/samples, but got error=OSError: ") and "Connection refused" in err
    assert _tree(tmp_path) == {}


def test_root_that_is_a_file_exits_2(tmp_path, capsys):
    not_a_dir = tmp_path / "root"
    not_a_dir.write_text("not a catalog")
    assert main(["catalog", "verify", str(not_a_dir)]) == 2
    assert "expects a samples table at" in _one_line(capsys)
