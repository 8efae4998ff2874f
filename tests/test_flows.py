"""The generate-dataset flow under one session-wide Prefect test harness; task logic through plain calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _specs import UNREACHABLE_QC, tiny_spec
from catalog.root import DatasetRoot
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from factory.case import SleepGenerator, get_generator, run_case
from flows.generate import commit_records, find_committed, generate_cases, run_generate
from factory.plan import plan_dataset

torch.set_num_threads(1)


def _spec(root, **changes):
    """The tinyset spec: two chest cases of 2 steps, one commit per case; ``changes`` as in ``tiny_spec``."""
    return tiny_spec(root, **{"name": "tinyset", "seed": 11, "cohort": "chest", "count": 2, "steps": 2,
                              "runtime": "{batch_size: 1}", **changes})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.nii.gz"))}


# -- plain functions and task.fn() ---------------------------------------------------------------------

def test_run_case_passes_and_writes_files(tmp_path):
    plan = plan_dataset(_spec(tmp_path))
    request = plan.cases[0]
    record = run_case(request, get_generator("maisi", "preset:tiny", "cpu"), root=DatasetRoot.of(tmp_path),
                      code_version="test")
    assert (record.status, record.qc_pass, record.attempt, record.seed) == ("passed", True, 0, request.seed)
    assert record.image_uri == f"images/{request.sample_id}.nii.gz"
    assert (tmp_path / record.image_uri).is_file() and (tmp_path / record.label_uri).is_file()
    assert record.mask_source == "phantom" and record.model_name == "tiny"
    assert {"mask", "generate", "qc", "write", "case_total"} <= set(record.timings_s)


def test_run_case_records_the_placed_tumour_diameter(tmp_path):
    spec = _spec(tmp_path, pathology="{type: lung_tumor, size_mm: [20, 40]}")
    request = plan_dataset(spec).cases[0]
    record = run_case(request, SleepGenerator(0.0), root=DatasetRoot.of(tmp_path))
    assert record.status == "passed" and record.tumor_label == 23
    assert 20.0 <= record.tumor_size_mm <= 40.0 and record.tumor_size_mm != 40.0  # the drawn size, not the max


def test_run_case_orphan_files_kept_or_replaced(tmp_path):
    request = plan_dataset(_spec(tmp_path)).cases[0]
    gen = get_generator("maisi", "preset:tiny", "cpu")
    first = run_case(request, gen, root=DatasetRoot.of(tmp_path))
    image = tmp_path / first.image_uri
    mtime = image.stat().st_mtime_ns
    again = run_case(request, gen, root=DatasetRoot.of(tmp_path))  # identical bytes: kept
    assert again.image_sha256 == first.image_sha256 and image.stat().st_mtime_ns == mtime
    image.write_bytes(b"partial garbage")
    third = run_case(request, gen, root=DatasetRoot.of(tmp_path))  # different bytes: replaced
    assert third.image_sha256 == first.image_sha256
    import hashlib

    assert hashlib.sha256(image.read_bytes()).hexdigest() == first.image_sha256


def test_run_case_qc_failure_records_reason_and_writes_nothing(tmp_path):
    spec = _spec(tmp_path, qc=UNREACHABLE_QC)
    request = plan_dataset(spec).cases[0]
    record = run_case(request, SleepGenerator(0.0), root=DatasetRoot.of(tmp_path))
    assert (record.status, record.qc_pass, record.attempt) == ("failed", False, 1)
    assert record.image_uri is None and record.image_sha256 is None
    assert record.failure_reason.startswith("attempt 0: qc: lung: median ")
    assert " | attempt 1: qc: lung: median " in record.failure_reason
    assert record.qc_failures and record.qc_failures[0].startswith("lung: median")
    assert not list(tmp_path.rglob("*.nii.gz"))


def test_run_case_mask_failure_retries_then_fails(tmp_path):
    from maisi_core.errors import TumorPlacementError

    spec = _spec(tmp_path, pathology="{type: lung_tumor, size_mm: [5, 9]}")
    request = plan_dataset(spec).cases[0]

    def no_mask(req, seed):
        raise TumorPlacementError(f"place_tumor expects its host in view, but got seed={seed}.")

    record = run_case(request, SleepGenerator(0.0), root=DatasetRoot.of(tmp_path), make_mask_fn=no_mask)
    assert record.status == "failed" and record.failure_reason.count("mask: place_tumor expects") == 3


def test_get_generator_rejects_unknown():
    from factory.errors import ModelRefError

    with pytest.raises(ModelRefError, match=r"^runtime\.generator expects one of \['maisi', 'sleep:SECONDS'\], "
                                            r"but got generator='sleep:x'\. The stub takes seconds as a non-negative number"):
        get_generator("sleep:x", "preset:tiny")


def test_tasks_fn_generate_and_commit(tmp_path):
    plan = plan_dataset(_spec(tmp_path))
    (record,) = generate_cases.fn([plan.cases[1]], root=DatasetRoot.of(tmp_path), generator="sleep:0",
                                  device="cpu", decode_preset=None, code_version="t")
    assert record.status == "passed" and record.model_name == "sleep:0"
    assert commit_records.fn([record], root=DatasetRoot.of(tmp_path), metadata={"x": 1}) == 0
    assert find_committed.fn(DatasetRoot.of(tmp_path), plan.spec_id) == {record.sample_id}


# -- the flow ------------------------------------------------------------------------------------------

def test_flow_generates_commits_and_reruns_without_duplicates(prefect_backend, tmp_path):
    spec = _spec(tmp_path / "ds")
    summary = run_generate(spec)
    assert (summary["generated"], summary["skipped"], summary["n_passed"], summary["n_failed"]) == (2, 0, 2, 0)
    cat = open_catalog(tmp_path / "ds")
    rows = cat.read_table().to_pylist()
    plan = plan_dataset(spec)
    assert sorted(r["sample_id"] for r in rows) == sorted(c.sample_id for c in plan.cases)
    assert {r["seed"] for r in rows} == {c.seed for c in plan.cases}
    assert all(r["spec_id"] == plan.spec_id and r["code_version"] for r in rows)
    assert cat.version == 1  # batch_size 1: two commits
    report = verify_catalog(cat)
    assert report.ok and report.orphans == () and report.files_checked == 4
    datasets = cat.read_table("datasets").to_pylist()
    assert len(datasets) == 1 and datasets[0]["n_passed"] == 2 and datasets[0]["model_digest"]
    assert "random weights" in datasets[0]["model_card"]  # preset:tiny: the card says so
    assert summary["card_uri"] and Path(summary["card_uri"]).is_file()
    files = _files(tmp_path / "ds")

    again = run_generate(spec)
    assert (again["generated"], again["skipped"]) == (0, 2)
    assert cat.read_table().num_rows == 2 and cat.version == 1
    assert cat.read_table("datasets").num_rows == 1
    assert _files(tmp_path / "ds") == files


@pytest.fixture
def validate_calls(monkeypatch):
    """Count the flow's calls of ``factory.validate.validate_dataset`` (the dataset metrics, about 10 s at 64 cases)."""
    from factory import validate

    calls: list[str | None] = []
    real = validate.validate_dataset

    def counting(cat, **kwargs):
        calls.append(kwargs.get("spec_id"))
        return real(cat, **kwargs)

    monkeypatch.setattr(validate, "validate_dataset", counting)
    return calls


def test_flow_rerun_with_nothing_new_reuses_the_recorded_metrics(prefect_backend, tmp_path, validate_calls):
    spec = _spec(tmp_path / "ds", runtime='{batch_size: 1, generator: "sleep:0"}')
    first = run_generate(spec)
    assert validate_calls == [plan_dataset(spec).spec_id] and first["metrics"]["metric_n_generated"] == 2

    again = run_generate(spec)
    assert (again["generated"], again["skipped"], again["datasets_version"]) == (0, 2, None)
    assert len(validate_calls) == 1  # nothing committed since the dataset row: its metrics are reused
    assert again["metrics"] == first["metrics"]
    assert open_catalog(tmp_path / "ds").read_table("datasets").num_rows == 1
    assert {"wall", "plan", "generate", "validate"} <= set(first["timings_s"])  # where the flow's time went


def test_flow_run_settings_drop_the_heartbeat_only_for_the_ephemeral_api():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.runtime import flow_run_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with temporary_settings(restore_defaults={PREFECT_API_URL}), flow_run_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), flow_run_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 60
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 60


def test_flow_resume_after_the_last_commit_still_validates_and_records(prefect_backend, tmp_path, validate_calls):
    """A run that crashed after committing every case but before its dataset row: the re-run completes it."""
    spec = _spec(tmp_path / "ds", runtime='{batch_size: 1, generator: "sleep:0"}')
    root = str(tmp_path / "ds")
    records = generate_cases.fn(plan_dataset(spec).cases, root=DatasetRoot.of(root), generator="sleep:0",
                                device="cpu", decode_preset=None, code_version="t")
    commit_records.fn(records, root=DatasetRoot.of(root), metadata={})
    summary = run_generate(spec)
    assert (summary["generated"], summary["skipped"], summary["n_passed"]) == (0, 2, 2)
    assert len(validate_calls) == 1 and summary["metrics"]["metric_n_generated"] == 2
    assert summary["datasets_version"] == 0


def test_flow_qc_failure_recorded_not_published(prefect_backend, tmp_path):
    spec = _spec(tmp_path / "ds", count=1, qc=UNREACHABLE_QC)
    summary = run_generate(spec)
    assert (summary["n_passed"], summary["n_failed"]) == (0, 1)
    row = open_catalog(tmp_path / "ds").read_table().to_pylist()[0]
    assert (row["status"], row["qc_pass"], row["image_uri"], row["attempt"]) == ("failed", False, None, 1)
    assert "lung: median" in row["failure_reason"]
    assert not list((tmp_path / "ds").rglob("*.nii.gz"))
    assert run_generate(spec)["skipped"] == 1  # failed rows count as done


def test_flow_on_s3(prefect_backend, tmp_path):
    import fsspec
    from s3_server import local_s3_server

    with local_s3_server(bucket="ctf") as s3:
        spec = _spec("s3://ctf/tinyset")
        summary = run_generate(spec, storage_options=s3.delta_options)
        assert (summary["n_passed"], summary["n_failed"]) == (2, 0)
        cat = open_catalog("s3://ctf/tinyset", storage_options=s3.delta_options)
        report = verify_catalog(cat)
        assert report.ok and report.files_checked == 4 and report.orphans == ()
        fs = fsspec.filesystem("s3", **s3.fsspec_options)
        assert len(fs.ls("ctf/tinyset/images")) == 2 and fs.exists("ctf/tinyset/dataset_card.html")
        local = tmp_path / "local"
        run_generate(spec, output_root=str(local))
        for row in cat.read_table().to_pylist():  # same voxels and bytes on S3 as on local disk
            assert fs.cat_file(f"ctf/tinyset/{row['image_uri']}") == (local / row["image_uri"]).read_bytes()


@pytest.mark.slow  # starts two worker processes (about 18 s on 2 cores)
def test_flow_dask_local_cluster_matches_sequential(prefect_backend, tmp_path):
    """About 15 s on 2 cores (two worker processes import torch and MONAI)."""
    spec = _spec(tmp_path / "seq")
    run_generate(spec)
    dask_spec = spec.with_runtime(dask_local_workers=2)
    summary = run_generate(dask_spec, output_root=str(tmp_path / "dask"))
    assert summary["n_passed"] == 2
    seq, par = open_catalog(tmp_path / "seq").read_table(), open_catalog(tmp_path / "dask").read_table()
    key = lambda t: sorted((r["sample_id"], r["image_sha256"], r["label_sha256"]) for r in t.to_pylist())  # noqa: E731
    assert key(seq) == key(par)
    assert _files(tmp_path / "seq") == _files(tmp_path / "dask")
