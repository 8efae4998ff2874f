"""Catalog store: append, idempotent re-commit, versions, history, schema evolution, concurrency."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from _catalog_cases import SPEC_ID, make_failed_record, make_record

from catalog.errors import CatalogError, CatalogNotFoundError, RecordError, RecordExistsError, SchemaMismatchError
from catalog.schema import SAMPLES_SCHEMA, SCHEMA_VERSION, SampleRecord
from catalog.store import open_catalog

ROOT = Path(__file__).resolve().parents[1]


def test_append_samples_creates_versions_and_reads_back(tmp_path):
    cat = open_catalog(tmp_path)
    assert cat.version is None
    assert cat.append_samples([make_record(i) for i in range(3)], commit_metadata={"spec_id": SPEC_ID}) == 0
    assert cat.append_samples([make_failed_record(3)], commit_metadata={"spec_id": SPEC_ID}) == 1
    table = cat.read_table()
    assert table.num_rows == 4
    assert table.schema.names[: len(SAMPLES_SCHEMA)] == SAMPLES_SCHEMA.names
    row = {r["sample_id"]: r for r in table.to_pylist()}["case_0001"]
    assert row["output_size"] == [32, 32, 32]
    assert dict(row["organ_median"]) == {"liver": 61.0, "spleen": 45.0}
    assert row["schema_version"] == SCHEMA_VERSION
    assert str(row["created_at"].tzinfo) == "UTC"
    failed = {r["sample_id"]: r for r in table.to_pylist()}["case_0003"]
    assert failed["status"] == "failed" and failed["qc_pass"] is False and failed["image_uri"] is None


def test_append_samples_identical_rows_are_a_noop(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(i) for i in range(3)])
    # New objects get a new created_at, which the idempotence check ignores.
    assert cat.append_samples([make_record(i) for i in range(3)]) == 0
    assert cat.version == 0
    assert cat.read_table().num_rows == 3


def test_append_samples_adds_only_new_rows_of_a_partly_committed_batch(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0), make_record(1)])
    assert cat.append_samples([make_record(i) for i in range(4)]) == 1
    assert sorted(cat.read_table()["sample_id"].to_pylist()) == [f"case_000{i}" for i in range(4)]


def test_append_samples_same_record_with_other_timings_is_a_no_op(tmp_path):
    """Two runs of one spec on one root: the second commits the same case measured at another speed (issue 11)."""
    cat = open_catalog(tmp_path)
    version = cat.append_samples([make_record(i, timings_s={"generate": 1.0}) for i in range(2)])
    assert cat.append_samples([make_record(1, timings_s={"generate": 9.5, "qc": 0.1})]) == version
    rows = cat.read_table().to_pylist()
    assert len(rows) == 2 and dict(rows[1]["timings_s"]) in ({"generate": 1.0}, {"generate": 9.5, "qc": 0.1})
    with pytest.raises(RecordExistsError, match=r"sample_id='case_0001' with different image_sha256\."):
        cat.append_samples([make_record(1, image_sha256="f" * 64, timings_s={"generate": 2.0})])


def test_append_samples_changed_row_raises_record_exists(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(i) for i in range(3)])
    with pytest.raises(RecordExistsError, match=r"sample_id='case_0001' with different organ_median, seed\."):
        cat.append_samples([make_record(1, seed=7, organ_median={"liver": 1.0})])
    assert issubclass(RecordExistsError, FileExistsError) and issubclass(RecordExistsError, CatalogError)
    assert cat.version == 0


def test_append_samples_duplicate_in_batch_raises(tmp_path):
    with pytest.raises(RecordError, match=r"each sample_id once per batch, but got sample_id='case_0001' twice"):
        open_catalog(tmp_path).append_samples([make_record(1), make_record(1)])


def test_sample_record_rules():
    with pytest.raises(RecordError, match=r"expects status in \['passed', 'failed'\], but got status='ok'"):
        make_record(1, status="ok")
    with pytest.raises(RecordError, match=r"expects no files on a failed row, but got image_uri="):
        make_failed_record(1, image_uri="images/x.nii.gz")
    with pytest.raises(RecordError, match=r"expects qc_pass=False on a failed row, but got qc_pass=True"):
        make_failed_record(1, qc_pass=True)
    with pytest.raises(RecordError, match=r"expects output_size with 3 values, but got output_size=\[32, 32\]"):
        make_record(1, output_size=(32, 32))
    with pytest.raises(RecordError, match=r"expects label_sha256 on a passed row, but got label_sha256=None"):
        make_record(1, label_sha256=None)
    for bad in ("../x.nii.gz", "/etc/passwd", "s3://other/x.nii.gz"):  # issue 13: absolute paths and URIs too
        with pytest.raises(RecordError, match=rf"expects image_uri relative to the output root, but got image_uri={bad!r}"):
            make_record(1, image_uri=bad)


def test_append_dict_rows_with_unknown_column_raises(tmp_path):
    row = make_record(0).to_row() | {"colour": "red"}
    with pytest.raises(SchemaMismatchError, match=r"numeric metric columns starting with .*but got column='colour'"):
        open_catalog(tmp_path).append_samples([row])


def test_commit_metadata_and_history(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)], commit_metadata={"spec_id": SPEC_ID, "code_version": "0.1.0"})
    cat.append_samples([make_record(1)], commit_metadata={"spec_id": "other"})
    history = cat.history()
    assert [h["version"] for h in history] == [1, 0]
    assert history[1]["spec_id"] == SPEC_ID and history[1]["code_version"] == "0.1.0"
    assert history[0]["spec_id"] == "other" and history[0]["ctfactory.rows"] == "1"


def test_committed_sample_ids_by_status(tmp_path):
    cat = open_catalog(tmp_path)
    assert cat.committed_sample_ids() == set()
    cat.append_samples([make_record(0), make_failed_record(1)])
    assert cat.committed_sample_ids() == {"case_0000", "case_0001"}
    assert cat.committed_sample_ids(status="failed") == {"case_0001"}


def test_missing_catalog_and_version_raise_not_found(tmp_path):
    cat = open_catalog(tmp_path / "nothing")
    with pytest.raises(CatalogNotFoundError, match=r"expects a samples table at .*nothing/catalog/samples, but got none"):
        cat.read_table()
    cat.append_samples([make_record(0)])
    with pytest.raises(CatalogNotFoundError, match=r"expects a samples version in \[0, 0\], but got version=3\."):
        cat.read_table(as_of=3)
    assert issubclass(CatalogNotFoundError, FileNotFoundError)


def test_append_dataset_with_metric_columns_merges_schema(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(i) for i in range(3)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec": "name: demo\n", "n_samples": 3,
                        "metrics": {"diversity": 0.4}})
    version = cat.append_dataset({"dataset": "demo", "dataset_version": "2", "fd_radimagenet": 3.25})
    assert version == 1
    rows = cat.read_table("datasets").to_pylist()
    assert [r["dataset_version"] for r in sorted(rows, key=lambda r: r["dataset_version"])] == ["1", "2"]
    by_version = {r["dataset_version"]: r for r in rows}
    assert by_version["2"]["fd_radimagenet"] == 3.25 and by_version["1"]["fd_radimagenet"] is None
    assert by_version["1"]["samples_version"] == 0
    with pytest.raises(RecordError, match=r"append_dataset expects a non-empty dataset_version, but got dataset_version=None"):
        cat.append_dataset({"dataset": "demo"})


def test_older_schema_table_reads_and_appends(tmp_path):
    """A table written by an older schema (without the newer columns) still reads and takes appends."""
    old_names = [n for n in SAMPLES_SCHEMA.names if n not in ("device", "failure_reason", "timings_s")]
    old_schema = pa.schema([SAMPLES_SCHEMA.field(n) for n in old_names])
    old_rows = [{k: v for k, v in make_record(i).to_row().items() if k in old_names} for i in range(3)]
    uri = tmp_path / "catalog" / "samples"
    write_deltalake(str(uri), pa.Table.from_pylist(old_rows, schema=old_schema), mode="error")
    cat = open_catalog(tmp_path)
    old = cat.read_table()
    assert old.schema.names == SAMPLES_SCHEMA.names
    assert old["device"].to_pylist() == [None, None, None]
    assert cat.query({"body_region": "chest"}).num_rows == 1
    assert cat.sql("SELECT count(*) AS n FROM samples WHERE device IS NULL")["n"].to_pylist() == [3]
    # An identical old row is still a no-op; a new row adds the newer columns by schema merge.
    assert cat.append_samples([make_record(3, device="cuda:0")]) == 1
    both = {r["sample_id"]: r for r in cat.read_table().to_pylist()}
    assert both["case_0003"]["device"] == "cuda:0" and both["case_0000"]["device"] is None
    assert cat.read_table(as_of=0).num_rows == 3


def test_v4_table_reads_organ_hu_median_as_organ_median(tmp_path):
    """A table written before v5 (``organ_hu_median``, no ``modality``) reads and takes appends with the new names."""
    def v4_row(i: int) -> dict:
        row = make_record(i).to_row()
        row["organ_hu_median"] = row.pop("organ_median")
        row.pop("modality")
        row.pop("generation_batch")
        return {**row, "schema_version": 4}

    fields = [SAMPLES_SCHEMA.field("organ_median").with_name("organ_hu_median") if f.name == "organ_median" else f
              for f in SAMPLES_SCHEMA if f.name not in ("modality", "generation_batch")]
    uri = tmp_path / "catalog" / "samples"
    write_deltalake(str(uri), pa.Table.from_pylist([v4_row(i) for i in range(3)], schema=pa.schema(fields)))
    cat = open_catalog(tmp_path)
    old = cat.read_table()
    assert old.schema.names == SAMPLES_SCHEMA.names  # the old name is not shown
    assert dict(old.to_pylist()[1]["organ_median"]) == {"liver": 61.0, "spleen": 45.0}
    assert dict(cat.read_table(columns=["sample_id", "organ_median"]).to_pylist()[2]["organ_median"])["liver"] == 62.0
    # an identical row re-committed under the new name is the same record, not a conflict
    assert cat.append_samples([make_record(1)]) == 0
    assert cat.append_samples([make_record(3)]) == 1
    rows = {r["sample_id"]: r for r in cat.read_table().to_pylist()}
    assert set(rows) == {f"case_000{i}" for i in range(4)}
    assert all(dict(r["organ_median"])["spleen"] == 45.0 for r in rows.values())
    assert rows["case_0003"]["modality"] == rows["case_0000"]["modality"] == "CT"  # every row before v5 was CT
    assert rows["case_0000"]["generation_batch"] == 1  # and every case before v6 was denoised alone
    sql = cat.sql("SELECT sample_id, organ_median['liver'] AS liver FROM samples ORDER BY sample_id")
    assert sql["liver"].to_pylist() == [60.0, 61.0, 62.0, 63.0] and "organ_hu_median" not in sql.column_names
    assert "organ_hu_median" not in cat.sql("SELECT * FROM samples LIMIT 1").column_names


_WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from _catalog_cases import make_record
    from catalog.store import open_catalog
    cat = open_catalog({path!r})
    start = int(sys.argv[1])
    for batch in range(4):
        cat.append_samples([make_record(start + batch * 10 + k) for k in range(3)],
                           commit_metadata={{"writer": str(start)}})
""")


def test_two_processes_appending_at_once_both_land(tmp_path):
    # Create the table first; concurrent *creation* is not what this test is about.
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(9999)])
    script = _WRITER.format(tests=str(ROOT / "tests"), root=str(ROOT), path=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], stderr=subprocess.PIPE)
             for start in (0, 100)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    ids = cat.committed_sample_ids()
    assert len(ids) == 1 + 2 * 4 * 3
    assert cat.version == 8
    writers = sorted(h.get("writer", "") for h in cat.history())
    assert writers.count("0") == 4 and writers.count("100") == 4


def test_sample_record_to_row_matches_schema_order():
    row = make_record(2).to_row()
    assert list(row) == SAMPLES_SCHEMA.names
    assert isinstance(make_record(2), SampleRecord)


def test_optimize_keeps_rows_and_adds_a_version(tmp_path):
    cat = open_catalog(tmp_path)
    for i in range(3):
        cat.append_samples([make_record(i)])
    before = sorted(cat.read_table()["sample_id"].to_pylist())
    metrics = cat.optimize()
    assert metrics["numFilesRemoved"] == 3 and metrics["numFilesAdded"] == 1
    assert cat.version == 3
    assert sorted(cat.read_table()["sample_id"].to_pylist()) == before
    assert cat.history()[0]["ctfactory.operation"] == "optimize"
    assert cat.append_samples([make_record(1)]) == 3  # still idempotent after the rewrite


def test_damaged_catalog_reads_raise_one_line_read_error(tmp_path):
    """A deleted data file or a corrupt log entry is a CatalogReadError naming it, not a deltalake traceback."""
    from catalog.errors import CatalogReadError

    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)])
    cat.append_samples([make_record(1)])
    data = sorted((tmp_path / "catalog" / "samples").glob("*.parquet"))
    data[0].unlink()
    with pytest.raises(CatalogReadError, match=rf"^Catalog expects a readable samples table at .*catalog/samples, "
                                               rf"but got error=FileNotFoundError: .*{data[0].name} not found") as exc:
        cat.read_table()
    assert "\n" not in str(exc.value) and isinstance(exc.value, OSError)
    entry = tmp_path / "catalog" / "samples" / "_delta_log" / "00000000000000000001.json"
    entry.write_text("{not json")
    with pytest.raises(CatalogReadError, match=rf"^Catalog expects a readable Delta log entry {entry}, but got "
                                               r"error=JSONDecodeError: "):
        cat.history()
