"""verify_catalog: sha256 and size of every passing row's files, and orphan volumes."""

from __future__ import annotations

import pytest
from test_catalog_support import make_failed_record, write_case

from catalog.errors import CatalogError, VerifyError
from catalog.store import open_catalog
from catalog.verify import verify_catalog


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
