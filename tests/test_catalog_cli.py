"""The catalog CLI: query/history/verify/export/report through flows.cli.main (exit codes, output)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from _catalog_cases import make_failed_record, write_case

from catalog.store import open_catalog
from flows.cli import main


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i) for i in range(3)], commit_metadata={"spec_id": "s1"})
    cat.append_samples([make_failed_record(3)], commit_metadata={"spec_id": "s1"})
    return root


def test_cli_query_filters_and_formats(root, capsys, tmp_path):
    assert main(["catalog", "query", str(root), "--region", "abdomen", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["sample_id"] for r in rows) == ["case_0000", "case_0002"]
    assert rows[0]["organ_median"]["spleen"] == 45.0
    assert main(["catalog", "query", str(root), "--qc", "fail", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and '"case_0003"' in lines[1]
    assert main(["catalog", "query", str(root), "--as-of", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("(3 rows)")
    out = tmp_path / "r.parquet"
    assert main(["catalog", "query", str(root), "--sql", "SELECT sample_id, seed FROM samples ORDER BY seed",
                 "--format", "parquet", "--output", str(out)]) == 0
    assert pq.read_table(out)["seed"].to_pylist() == [1000, 1001, 1002, 1003]


def test_cli_bad_input_exits_2_with_one_line(root, capsys):
    assert main(["catalog", "query", str(root), "--sql", "SELECT nope FROM samples"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctfactory catalog: query_sql expects valid DuckDB SQL") and err.count("\n") == 1
    assert main(["catalog", "query", str(root), "--format", "parquet"]) == 2
    assert "expects --output FILE with --format parquet" in capsys.readouterr().err
    assert main(["catalog", "history", str(root.parent / "missing")]) == 2
    assert "expects a samples table at" in capsys.readouterr().err
    assert main(["catalog", "query", str(root), "--storage-option", "oops"]) == 2
    assert "--storage-option expects KEY=VALUE, but got 'oops'" in capsys.readouterr().err


def test_cli_history_lists_versions_with_metadata(root, capsys):
    import re

    assert main(["catalog", "history", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "version\ttime (UTC)\toperation\tmetadata"
    assert [line.split("\t")[0] for line in lines[1:]] == ["1", "0"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[1].split("\t")[1])  # ISO-8601, not epoch ms
    assert "spec_id=s1" in lines[1] and "ctfactory.rows=1" in lines[1]


def test_cli_query_table_shows_a_short_sorted_column_set(root, capsys):
    from flows.cli_catalog import DEFAULT_TABLE_COLUMNS

    assert main(["catalog", "query", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [c for c in DEFAULT_TABLE_COLUMNS]
    assert [line.split()[0] for line in out[1:-1]] == ["case_0000", "case_0001", "case_0002", "case_0003"]
    assert main(["catalog", "query", str(root), "--columns", "sample_id,seed", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["sample_id", "seed"] and out[-1] == "(2 rows)"
    assert main(["catalog", "query", str(root), "--all"]) == 0
    assert "organ_median" in capsys.readouterr().out.splitlines()[0]
    assert main(["catalog", "query", str(root), "--columns", "sample_ig"]) == 2
    assert "got column='sample_ig'. Did you mean 'sample_id'?" in capsys.readouterr().err


def test_cli_broken_pipe_ends_quietly(tmp_path):
    """``ctfactory ... | head`` used to end in a BrokenPipeError traceback (issue 12)."""
    import subprocess
    import sys

    for command in (["models", "info", "default"], ["catalog", "query", str(tmp_path / "none"), "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "flows", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first write: every write meets a broken pipe
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0 and err == "", err[-2000:]


def test_cli_verify_exit_codes(root, capsys):
    assert main(["catalog", "verify", str(root)]) == 0
    assert "0 missing, 0 mismatched" in capsys.readouterr().out
    (root / "labels" / "case_0001.nii.gz").unlink()
    assert main(["catalog", "verify", str(root)]) == 1
    assert "case_0001: missing" in capsys.readouterr().out


def test_cli_export_and_refusal(root, tmp_path, capsys):
    dest = tmp_path / "raw"
    assert main(["catalog", "export", str(root), "--format", "nnunet", "--dest", str(dest), "--dataset-id", "7"]) == 0
    assert (dest / "Dataset007_Demo" / "dataset.json").exists()
    assert "exported 3 cases of version 1 as nnunet" in capsys.readouterr().out
    assert main(["catalog", "export", str(root), "--format", "nnunet", "--dest", str(dest)]) == 2
    assert "expects an empty or new destination" in capsys.readouterr().err


@pytest.mark.parametrize("statement", [
    "SELECT * FROM read_csv('/etc/hostname')",
    "COPY (SELECT 1) TO '{root}/leak.csv'",
    "ATTACH '{root}/other.db'",
    "SET enable_external_access = true",
    "INSTALL httpfs",
])
def test_cli_query_sql_is_sandboxed(root, capsys, statement):
    """--sql sees the two catalog tables only: no local files, no writes, no way to lift the sandbox (issue 11)."""
    before = sorted(p.name for p in root.iterdir())
    assert main(["catalog", "query", str(root), "--sql", statement.format(root=root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctfactory catalog: query_sql expects valid DuckDB SQL") and err.count("\n") == 1
    assert sorted(p.name for p in root.iterdir()) == before
    assert main(["catalog", "query", str(root), "--sql", "SELECT count(*) AS n FROM samples", "--format", "json"]) == 0
