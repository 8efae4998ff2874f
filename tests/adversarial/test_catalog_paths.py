"""A catalog row that names a file outside its root is never read, copied or hashed (issue 13).

Only the write side used to check for escapes: ``catalog verify`` hashed, ``catalog export`` copied and the
card loaded whatever path a (tampered or hand-edited) row named, ``/etc/passwd`` included.
"""

from __future__ import annotations

import pytest

from _catalog_cases import write_case
from catalog.errors import CatalogPathError
from catalog.export import export_dataset, load_nifti
from catalog.fs import resolve_inside
from catalog.store import open_catalog
from catalog.verify import verify_catalog

ESCAPES = ["/etc/passwd", "../outside.nii.gz", "images/../../outside.nii.gz", "file:///etc/passwd",
           "s3://other-bucket/x.nii.gz", "images\\..\\..\\x.nii.gz", "C:/x.nii.gz"]


@pytest.mark.parametrize("uri", ESCAPES)
def test_resolve_inside_refuses_every_way_out(tmp_path, uri):
    with pytest.raises(CatalogPathError, match="expects a (relative path inside|path that stays inside)"):
        resolve_inside(str(tmp_path), uri)
    with pytest.raises(CatalogPathError):
        resolve_inside("s3://bucket/ds", uri)


def test_a_symlink_inside_the_root_pointing_out_is_refused(tmp_path):
    (tmp_path / "secret.txt").write_text("x")
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.nii.gz").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CatalogPathError, match="resolves to"):
        resolve_inside(str(root), "images/link.nii.gz")
    assert resolve_inside(str(root), "images/x.nii.gz") == str((root / "images" / "x.nii.gz").resolve())


@pytest.fixture()
def tampered(tmp_path):
    """A root with one honest case and one row edited (outside the catalog API) to name a file outside."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    outside = tmp_path / "outside.nii.gz"
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0), write_case(root, 1)])
    (root / "images" / "case_0001.nii.gz").rename(outside)
    table = cat.read_table("samples")
    uris = pc.if_else(pc.equal(table["sample_id"], "case_0001"), pa.scalar(str(outside)), table["image_uri"])
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", uris)
    write_deltalake(cat.table_uri("samples"), table, mode="overwrite")
    return open_catalog(root), tmp_path


def test_verify_reports_the_row_and_reads_nothing_outside(tampered):
    cat, base = tampered
    report = verify_catalog(cat)
    problems = [str(p) for p in report.problems]
    assert f"case_0001: outside the root: {base / 'outside.nii.gz'}" in problems
    assert not report.ok


def test_export_and_loading_refuse_the_row(tampered, tmp_path):
    cat, base = tampered
    with pytest.raises(CatalogPathError):
        load_nifti(cat, str(base / "outside.nii.gz"))
    with pytest.raises(CatalogPathError):
        export_dataset(cat, base / "export", format="msd")
    copied = list((base / "export").rglob("*case_0001*")) if (base / "export").exists() else []
    assert copied == []  # the outside file was not copied into the export
