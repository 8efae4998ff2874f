"""Shared helpers for the catalog tests: synthetic records and small NIfTI cases (no tests here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from catalog.schema import SampleRecord

SPEC_ID = "spec-abc123"


def make_record(index: int, **overrides) -> SampleRecord:
    """Return a passing SampleRecord for case ``index`` with fake URIs and digests."""
    values = dict(
        sample_id=f"case_{index:04d}", dataset="demo", dataset_version="1", spec_id=SPEC_ID,
        cohort="train" if index % 3 else "test", case_index=index, seed=1000 + index, attempt=0,
        model_name="maisi-tiny", model_digest="sha256:feed", code_version="0.1.0+g123",
        body_region="abdomen" if index % 2 == 0 else "chest",
        pathology="hepatic_tumor" if index % 4 == 0 else "none",
        tumor_label=26 if index % 4 == 0 else None, tumor_size_mm=12.5 if index % 4 == 0 else None,
        output_size=(32, 32, 32), spacing_mm=(1.5, 1.5, 2.0), mask_source="phantom",
        mask_id=f"phantom-{index}", image_uri=f"images/case_{index:04d}.nii.gz",
        label_uri=f"labels/case_{index:04d}.nii.gz", image_sha256="a" * 64, label_sha256="b" * 64,
        image_bytes=100, label_bytes=50, status="passed", qc_pass=True,
        organ_median={"liver": 60.0 + index, "spleen": 45.0}, timings_s={"generate": 1.5},
        device="cpu",
    )
    values.update(overrides)
    return SampleRecord(**values)


def make_failed_record(index: int, **overrides) -> SampleRecord:
    """Return a failed SampleRecord (no files) for case ``index``."""
    values = dict(
        image_uri=None, label_uri=None, image_sha256=None, label_sha256=None, image_bytes=None,
        label_bytes=None, status="failed", qc_pass=False,
        qc_failures=("liver: median 250.0 HU outside [-21.6, 162.0]",), failure_reason="qc",
    )
    values.update(overrides)
    return make_record(index, **values)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_case(root: Path, index: int, *, label_ids=(1, 26, 200), **overrides) -> SampleRecord:
    """Write a tiny 8x8x8 image/label NIfTI pair under ``root`` and return its passing record."""
    rng = np.random.default_rng(index)
    image = rng.normal(40.0, 30.0, size=(8, 8, 8)).astype(np.float32)
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[1:7, 1:7, 1:7] = label_ids[-1]
    for k, lid in enumerate(label_ids[:-1]):
        label[2 + k:4 + k, 2:5, 2:5] = lid
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    name = f"case_{index:04d}"
    paths = {}
    for kind, data in (("images", image), ("labels", label)):
        path = root / kind / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        paths[kind] = path
    values = dict(
        image_uri=f"images/{name}.nii.gz", label_uri=f"labels/{name}.nii.gz",
        image_sha256=_sha(paths["images"]), label_sha256=_sha(paths["labels"]),
        image_bytes=paths["images"].stat().st_size, label_bytes=paths["labels"].stat().st_size,
        output_size=(8, 8, 8),
    )
    values.update(overrides)
    return make_record(index, **values)
