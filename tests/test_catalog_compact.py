"""Compaction (issue 16, item 5: the setting that moves the 10^5-case bottleneck): ``Catalog.compact``,
``ctfactory catalog optimize`` and ``runtime.compact_every``."""

from __future__ import annotations

from _catalog_cases import make_record
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from flows.cli import main


def _files(cat) -> int:
    return len(cat.delta_table("samples").file_uris())


def test_compact_merges_small_files_keeps_rows_and_time_travel(tmp_path):
    cat = open_catalog(tmp_path)
    for i in range(10):
        cat.append_samples([make_record(i)])
    rows = sorted(r["sample_id"] for r in cat.read_table().to_pylist())
    assert _files(cat) == 10
    metrics = cat.compact()
    assert (metrics["numFilesRemoved"], metrics["numFilesAdded"], metrics["version"]) == (10, 1, 10)
    assert _files(cat) == 1 and sorted(r["sample_id"] for r in cat.read_table().to_pylist()) == rows
    assert cat.read_table(as_of=4).num_rows == 5  # older versions still read
    assert (tmp_path / "catalog" / "samples" / "_delta_log" / "00000000000000000010.checkpoint.parquet").is_file()
    assert cat.compact()["version"] == 10  # nothing left to merge: no new version
    # the records' volumes do not exist (made-up rows); the Delta files are all accounted for, none stray
    assert verify_catalog(cat, orphans=False, min_age_s=0).leftovers == ()


def test_catalog_optimize_command(tmp_path, capsys):
    cat = open_catalog(tmp_path)
    for i in range(4):
        cat.append_samples([make_record(i)])
    assert main(["catalog", "optimize", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "samples version 3 -> 4: compacted 4 files into 1; checkpoint written\n"
    assert main(["catalog", "optimize", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "samples version 4: nothing to compact; checkpoint written\n"
    assert main(["catalog", "optimize", str(tmp_path), "--z-order"]) == 0
    assert capsys.readouterr().out.startswith("samples version 4 -> 5: z-ordered 1 files into 1")
    assert main(["catalog", "optimize", str(tmp_path / "empty")]) == 2
    assert "catalog optimize expects a catalog with a samples table" in capsys.readouterr().err


def test_flow_compacts_every_n_commits(prefect_backend, tmp_path):
    from _specs import tiny_spec
    from flows.generate import run_generate

    spec = tiny_spec(tmp_path / "ds", name="compacting", seed=21, count=5,
                     runtime="{generator: 'sleep:0', batch_size: 1, compact_every: 2}")
    assert run_generate(spec)["generated"] == 5
    cat = open_catalog(tmp_path / "ds")
    operations = [h.get("ctfactory.operation", h.get("operation")) for h in reversed(cat.history())]
    assert operations.count("compact") == 2  # after commits 2 and 4
    assert cat.read_table().num_rows == 5 and _files(cat) == 2  # the compacted four and the fifth
    assert verify_catalog(cat).ok


def test_verify_reads_a_checkpoint(tmp_path):
    """Found with compaction: the checkpoint reader got the parent struct of ``add.path`` and crashed."""
    from catalog.log import logged_data_files

    cat = open_catalog(tmp_path)
    for i in range(3):
        cat.append_samples([make_record(i)])
    cat.delta_table("samples").create_checkpoint()  # delta-rs writes one every 100 commits by itself
    files = logged_data_files(cat.table_uri("samples"))
    assert len(files) == 3 and all(name.endswith(".parquet") and "/" not in name for name in files)
    assert verify_catalog(cat, min_age_s=0).leftovers == ()  # read through the checkpoint, no crash


def test_a_failed_compaction_does_not_fail_the_run(prefect_backend, tmp_path, monkeypatch):
    from catalog.store import Catalog
    from _specs import tiny_spec
    from flows.generate import run_generate

    def lost_race(self, **kwargs):
        raise RuntimeError("CommitFailedError: a concurrent transaction deleted the same data (test)")

    monkeypatch.setattr(Catalog, "compact", lost_race)
    spec = tiny_spec(tmp_path / "ds", name="compact-fails", seed=22, count=3,
                     runtime="{generator: 'sleep:0', batch_size: 1, compact_every: 1}")
    summary = run_generate(spec)
    assert summary["generated"] == 3 and open_catalog(tmp_path / "ds").read_table().num_rows == 3
