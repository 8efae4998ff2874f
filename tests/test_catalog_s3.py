"""The catalog on S3 (moto server in-process): append, query, time travel, verify and export."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest
from s3_server import local_s3_server
from _catalog_cases import make_record, write_case

from catalog.errors import CatalogNotFoundError
from catalog.export import export_msd
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from flows.cli import main


@pytest.fixture(scope="module")
def s3():
    with local_s3_server(bucket="bucket") as server:
        yield server


def test_s3_append_query_time_travel(s3):
    cat = open_catalog("s3://bucket/ds", storage_options=s3.delta_options)
    with pytest.raises(CatalogNotFoundError, match=r"expects a samples table at s3://bucket/ds/catalog/samples"):
        cat.read_table()
    assert cat.append_samples([make_record(i) for i in range(3)], commit_metadata={"spec_id": "s1"}) == 0
    assert cat.append_samples([make_record(3)], commit_metadata={"spec_id": "s1"}) == 1
    assert cat.append_samples([make_record(3)]) == 1  # idempotent
    assert cat.query({"body_region": "chest"}).num_rows == 2
    assert cat.query(as_of=0).num_rows == 3
    assert cat.sql("SELECT count(*) AS n FROM samples", as_of=1)["n"].to_pylist() == [4]
    assert [h["version"] for h in cat.history()] == [1, 0]
    fs = fsspec.filesystem("s3", **s3.fsspec_options)
    assert fs.ls("bucket/ds/catalog/samples/_delta_log")


def test_s3_verify_and_export_files(s3, tmp_path):
    local = tmp_path / "local"
    records = [write_case(local, i) for i in range(2)]
    fs = fsspec.filesystem("s3", **s3.fsspec_options)
    for rec in records:
        for uri in (rec.image_uri, rec.label_uri):
            fs.put_file(str(local / uri), f"bucket/files/{uri}")
    cat = open_catalog("s3://bucket/files", storage_options=s3.delta_options)
    cat.append_samples(records)
    report = verify_catalog(cat)
    assert report.ok and report.files_checked == 4 and report.orphans == ()
    result = export_msd(cat, tmp_path / "msd")
    assert result.num_cases == 2
    copied = tmp_path / "msd" / "imagesTr" / "case_0001.nii.gz"
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == records[1].image_sha256
    fs.pipe_file("bucket/files/images/case_0000.nii.gz", b"broken")
    assert [p.problem for p in verify_catalog(cat).problems] == ["size mismatch"]


def test_s3_cli_query_with_storage_options(s3, capsys):
    cat = open_catalog("s3://bucket/cli", storage_options=s3.delta_options)
    cat.append_samples([make_record(i) for i in range(3)])
    opts = [arg for k, v in s3.delta_options.items() for arg in ("--storage-option", f"{k}={v}")]
    assert main(["catalog", "query", "s3://bucket/cli", "--qc", "pass", "--format", "json", *opts]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["sample_id"] for r in rows) == ["case_0000", "case_0001", "case_0002"]
