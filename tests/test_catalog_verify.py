"""verify_catalog and repair_catalog: files, repeated sample_ids, Delta data files, leftovers and orphans."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from deltalake import write_deltalake
from _catalog_cases import make_failed_record, write_case

from catalog.errors import CatalogError, CatalogReadError, VerifyError
from catalog.schema import SAMPLES_SCHEMA, rows_to_table
from catalog.store import open_catalog
from catalog.verify import DuplicateSample, repair_catalog, verify_catalog


@pytest.fixture
def catalog_with_files(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i) for i in range(3)] + [make_failed_record(3)])
    return cat


def test_verify_clean_catalog_is_ok(catalog_with_files):
    report = verify_catalog(catalog_with_files)
    assert report.ok and report.rows_checked == 3 and report.files_checked == 6
    assert report.problems == () and report.orphans == ()
    report.raise_for_problems()


def test_verify_reports_missing_altered_and_orphan_files(catalog_with_files, tmp_path):
    (tmp_path / "images" / "case_0000.nii.gz").unlink()
    altered = tmp_path / "labels" / "case_0001.nii.gz"
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    altered.write_bytes(bytes(data))
    (tmp_path / "images" / "stray.nii.gz").write_bytes(b"x")
    report = verify_catalog(catalog_with_files)
    assert not report.ok
    assert [(p.sample_id, p.problem) for p in report.missing] == [("case_0000", "missing")]
    assert [(p.sample_id, p.problem) for p in report.mismatched] == [("case_0001", "sha256 mismatch")]
    assert report.orphans == ("images/stray.nii.gz",)
    assert "1 missing, 1 mismatched, 1 orphan files" in report.summary()
    with pytest.raises(VerifyError, match=r"verify expects every passing row's files to exist and match the "
                                          r"catalog, but got 2 problem\(s\), first sample_id='case_0000': missing"):
        report.raise_for_problems()
    assert issubclass(VerifyError, CatalogError)


def test_verify_size_mismatch(catalog_with_files, tmp_path):
    path = tmp_path / "images" / "case_0002.nii.gz"
    path.write_bytes(path.read_bytes() + b"\0")
    report = verify_catalog(catalog_with_files, orphans=False)
    assert [(p.sample_id, p.problem) for p in report.problems] == [("case_0002", "size mismatch")]


def test_verify_as_of_older_version_ignores_later_rows(catalog_with_files, tmp_path):
    catalog_with_files.append_samples([write_case(tmp_path, 7)])
    (tmp_path / "images" / "case_0007.nii.gz").unlink()
    assert not verify_catalog(catalog_with_files).ok
    old = verify_catalog(catalog_with_files, as_of=0)
    assert old.ok and old.version == 0
    # The label of case 7 is not referenced at version 0, so it is an orphan there.
    assert old.orphans == ("labels/case_0007.nii.gz",)


def _commit_blindly(cat, record):
    """Append a row the way 3874b3d could under concurrent writers: a blind append, no existence check."""
    write_deltalake(cat.table_uri("samples"), rows_to_table([record.to_row()], SAMPLES_SCHEMA), mode="append",
                    schema_mode="merge")


def _age(path: Path, seconds: float) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_verify_reports_duplicate_sample_ids(catalog_with_files):
    _commit_blindly(catalog_with_files, make_failed_record(3, seed=5))
    report = verify_catalog(catalog_with_files)
    assert report.duplicates == (DuplicateSample("case_0003", 2),)
    assert not report.ok and report.problems == ()
    assert "0 orphan files, 1 duplicate sample_ids, 0 leftover files" in report.summary()
    assert "  duplicate: case_0003 (2 rows)" in report.summary().splitlines()
    with pytest.raises(VerifyError, match=r"^verify expects one row per sample_id, but got 1 repeated, first sample_id="
                                          r"'case_0003' \(2 rows\)\. Run `ctfactory catalog verify ROOT --repair`\.$"):
        report.raise_for_problems()
    assert verify_catalog(catalog_with_files, as_of=0).duplicates == ()  # one row at version 0


def _leave_crash_leftovers(root: Path) -> dict[str, Path]:
    """Files a kill leaves behind, an hour old: temp files of an atomic write and of a Delta commit, and a
    Parquet file written but never committed; plus the temp file of a write still in progress."""
    samples = root / "catalog" / "samples"
    files = {
        "temp": root / "images" / f".case_0009.nii.gz.{'ab' * 16}.tmp",
        "commit_temp": samples / "_delta_log" / "_commit_0f0e0d0c-0b0a-4909-8807-060504030201.json.tmp",
        "untracked": samples / "part-00000-0badc0de-c000.snappy.parquet",
        "recent": root / "labels" / f".case_0010.nii.gz.{'cd' * 16}.tmp",
    }
    files["temp"].write_bytes(b"partial")
    files["commit_temp"].write_text("{}")
    shutil.copy(min(samples.glob("*.parquet")), files["untracked"])
    for key in ("temp", "commit_temp", "untracked"):
        _age(files[key], 3600)
    files["recent"].write_bytes(b"a write in progress")
    return files


def test_verify_lists_stray_temp_and_untracked_files_by_age(catalog_with_files, tmp_path):
    catalog_with_files.append_samples([write_case(tmp_path, 5)])
    catalog_with_files.optimize()  # the two files it replaces stay referenced by versions 0 and 1
    _leave_crash_leftovers(tmp_path)
    report = verify_catalog(catalog_with_files)
    stale = [(f.kind, f.path) for f in report.stale_leftovers]
    assert stale == [("stray temp", "catalog/samples/_delta_log/_commit_0f0e0d0c-0b0a-4909-8807-060504030201.json.tmp"),
                     ("untracked data", "catalog/samples/part-00000-0badc0de-c000.snappy.parquet"),
                     ("stray temp", f"images/.case_0009.nii.gz.{'ab' * 16}.tmp")]
    recent = [(f.kind, f.path) for f in report.recent_leftovers]
    assert recent == [("stray temp", f"labels/.case_0010.nii.gz.{'cd' * 16}.tmp")]
    assert all(3500 < f.age_s < 3700 for f in report.stale_leftovers) and report.recent_leftovers[0].age_s < 60
    assert not report.ok and report.problems == () and report.duplicates == () and report.orphans == ()
    assert "3 leftover files (+1 younger than 900 s)" in report.summary()
    assert "  leftover untracked data (3600 s old): catalog/samples/part-00000-0badc0de-c000.snappy.parquet" in (
        report.summary().splitlines())
    assert verify_catalog(catalog_with_files, min_age_s=7200).ok  # all young enough to be in progress
    assert catalog_with_files.read_table(as_of=0).num_rows == 4  # time travel still reads the replaced files


def test_repair_removes_stale_leftovers_and_keeps_earliest_row(catalog_with_files, tmp_path):
    _commit_blindly(catalog_with_files, make_failed_record(3, seed=5))
    _commit_blindly(catalog_with_files, make_failed_record(3, seed=6))
    files = _leave_crash_leftovers(tmp_path)
    report = verify_catalog(catalog_with_files)
    assert report.duplicates == (DuplicateSample("case_0003", 3),)
    result = repair_catalog(catalog_with_files, report)
    assert [f.path for f in result.removed] == [f.path for f in report.stale_leftovers]
    assert not any(files[k].exists() for k in ("temp", "commit_temp", "untracked")) and files["recent"].exists()
    assert result.deduplicated == ("case_0003",) and result.version == 3  # ONE commit after versions 0-2
    rows = {r["sample_id"]: r for r in catalog_with_files.read_table().to_pylist()}
    assert len(rows) == catalog_with_files.read_table().num_rows == 4 and rows["case_0003"]["seed"] == 1003
    assert catalog_with_files.history()[0]["ctfactory.operation"] == "remove_duplicate_samples"
    assert catalog_with_files.read_table(as_of=2).num_rows == 6  # the repeated rows stay in history
    after = verify_catalog(catalog_with_files)
    assert after.ok and after.duplicates == () and [f.path for f in after.leftovers] == [
        f"labels/.case_0010.nii.gz.{'cd' * 16}.tmp"]
    assert "repair: kept the earliest row of 1 repeated sample_ids (case_0003) in version 3" in result.summary()


def test_verify_missing_or_resized_data_file_is_a_read_error(catalog_with_files, tmp_path):
    catalog_with_files.append_samples([write_case(tmp_path, 5)])
    data = sorted((tmp_path / "catalog" / "samples").glob("*.parquet"), key=os.path.getmtime)
    data[-1].write_bytes(data[-1].read_bytes()[:-10])
    with pytest.raises(CatalogReadError, match=(
            rf"^Catalog expects every data file of the samples table at version 1 to exist with its logged size, "
            rf"but got file={re.escape(str(data[-1]))} \(\d+ bytes, the log says \d+\)\. Restore it from a backup")):
        verify_catalog(catalog_with_files)
    assert verify_catalog(catalog_with_files, as_of=0).ok  # version 0 does not reference it
    data[0].unlink()
    with pytest.raises(CatalogReadError, match=rf"at version 0 .*but got file={re.escape(str(data[0]))} \(missing\)"):
        verify_catalog(catalog_with_files, as_of=0)
    assert issubclass(CatalogReadError, OSError) and issubclass(CatalogReadError, CatalogError)


@pytest.mark.parametrize("damage", ["{not json", ""])
def test_verify_corrupt_log_entry_is_a_read_error_naming_it(catalog_with_files, tmp_path, damage):
    catalog_with_files.append_samples([write_case(tmp_path, 5)])
    entry = tmp_path / "catalog" / "samples" / "_delta_log" / "00000000000000000001.json"
    entry.write_text(damage)
    cause = "JSONDecodeError: Expecting property name" if damage else "ValueError: .* is empty"
    with pytest.raises(CatalogReadError, match=rf"^Catalog expects a readable Delta log entry {re.escape(str(entry))}, "
                                               rf"but got error={cause}.*The Delta log is damaged"):
        verify_catalog(catalog_with_files)


def test_verify_and_repair_on_s3():
    """Leftovers, untracked files and repeated rows are found and repaired through fsspec on S3 too."""
    import fsspec
    from s3_server import local_s3_server

    with local_s3_server(bucket="verify-repair") as s3:
        cat = open_catalog("s3://verify-repair/ds", storage_options=s3.delta_options)
        cat.append_samples([make_failed_record(i) for i in range(3)])
        repeated = rows_to_table([make_failed_record(2, seed=9).to_row()], SAMPLES_SCHEMA)
        write_deltalake(cat.table_uri("samples"), repeated, mode="append", storage_options=s3.delta_options)
        fs = fsspec.filesystem("s3", **s3.fsspec_options)
        committed = sorted(p for p in fs.ls("verify-repair/ds/catalog/samples") if p.endswith(".parquet"))
        fs.copy(committed[0], "verify-repair/ds/catalog/samples/part-00000-0badc0de-c000.snappy.parquet")
        fs.pipe_file(f"verify-repair/ds/images/.case_0009.nii.gz.{'ab' * 16}.tmp", b"partial")
        report = verify_catalog(cat, min_age_s=0)
        assert report.duplicates == (DuplicateSample("case_0002", 2),)
        assert [(f.kind, f.path) for f in report.stale_leftovers] == [
            ("untracked data", "catalog/samples/part-00000-0badc0de-c000.snappy.parquet"),
            ("stray temp", f"images/.case_0009.nii.gz.{'ab' * 16}.tmp")]
        result = repair_catalog(cat, report)
        assert len(result.removed) == 2 and result.version == 2
        assert not fs.exists("verify-repair/ds/catalog/samples/part-00000-0badc0de-c000.snappy.parquet")
        assert verify_catalog(cat, min_age_s=0).ok and cat.read_table(as_of=1).num_rows == 4
        first = cat.delta_table("samples", version=0).get_add_actions(flatten=True).column("path")[0].as_py()
        fs.rm(f"verify-repair/ds/catalog/samples/{first}")
        with pytest.raises(CatalogReadError, match=rf"at version 0 to exist .*but got file=s3://verify-repair/ds/"
                                                   rf"catalog/samples/{first} \(missing\)"):
            verify_catalog(cat, as_of=0)
