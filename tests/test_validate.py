"""Dataset validation: metrics against the phantom or a folder reference, and `ctfactory validate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catalog.store import open_catalog
from flows.cli import main
from factory.errors import ValidationInputError
from factory.validate import compute_dataset_metrics, load_generated, validate_dataset
from maisi_core import io as mio
from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom
from tests._catalog_cases import make_record

SPACING = (10.0, 10.0, 10.0)


def _cases(n: int, *, shift_hu: float = 0.0) -> list[dict]:
    out = []
    for i in range(n):
        case = generate_phantom(PhantomConfig(regions=("chest", "abdomen"), output_size_vox=(32, 32, 32),
                                              spacing_mm=SPACING), seed=100 + i)
        image = synthesize_ct(case.label_map, SPACING, seed=5000 + i) + shift_hu
        out.append({"sample_id": f"s{i:03d}", "spacing_mm": SPACING, "image": image, "label": case.label_map,
                    "affine": case.affine})
    return out


def _write_catalog(root: Path, cases: list[dict]) -> None:
    records = []
    for i, case in enumerate(cases):
        img = mio.save_image(str(root / "images" / f"{case['sample_id']}.nii.gz"), case["image"], case["affine"])
        lab = mio.save_label(str(root / "labels" / f"{case['sample_id']}.nii.gz"), case["label"], case["affine"])
        records.append(make_record(i, sample_id=case["sample_id"], image_uri=f"images/{case['sample_id']}.nii.gz",
                                   label_uri=f"labels/{case['sample_id']}.nii.gz", image_sha256=img.sha256,
                                   label_sha256=lab.sha256, image_bytes=img.n_bytes, label_bytes=lab.n_bytes,
                                   spacing_mm=SPACING, output_size=(32, 32, 32)))
    cat = open_catalog(str(root))
    cat.append_samples(records, commit_metadata={"spec_id": "spec-abc123"})
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec_id": "spec-abc123", "n_samples": len(records)})


def test_phantom_like_cases_score_near_the_reference_baseline_and_shifted_ones_far():
    good = compute_dataset_metrics(_cases(6))
    shifted = compute_dataset_metrics(_cases(6, shift_hu=250.0))
    assert good["fd_radiomics"] < 10 * good["fd_radiomics_ref"]
    assert shifted["fd_radiomics"] > 10 * good["fd_radiomics"]
    assert set(good) >= {"fd_radiomics_axial", "fd_radiomics_coronal", "fd_radiomics_sagittal",
                         "diversity_radiomics_mean_pairwise", "memorisation_radiomics_fraction"}
    assert good["metric_n_generated"] == 6 and good["diversity_radiomics_near_duplicate_pairs"] == 0


def test_duplicated_cases_are_flagged():
    cases = _cases(4)
    metrics = compute_dataset_metrics(cases + [dict(cases[0], sample_id="dup")])
    assert metrics["diversity_radiomics_near_duplicate_pairs"] >= 1


def test_too_few_cases_is_a_clear_error():
    with pytest.raises(ValidationInputError, match=r"expects at least 2 passing cases, but got n_generated=1\."):
        compute_dataset_metrics(_cases(1))


def test_reference_folder_of_nifti_images(tmp_path):
    ref = _cases(4)
    for case in ref:
        mio.save_image(str(tmp_path / "ref" / f"{case['sample_id']}.nii.gz"), case["image"], case["affine"])
    metrics = compute_dataset_metrics(_cases(3, shift_hu=10.0), tmp_path / "ref")
    assert metrics["metric_n_reference"] == 4 and np.isfinite(metrics["fd_radiomics"])
    with pytest.raises(ValidationInputError, match=r"expects a reference folder with reference.json or NIfTI images"):
        compute_dataset_metrics(_cases(2), tmp_path / "empty")


def test_flow_hook_reads_relative_uris_and_cli_records_metrics(tmp_path, capsys):
    _write_catalog(tmp_path, _cases(3))
    cat = open_catalog(str(tmp_path))
    assert len(load_generated(cat)) == 3
    assert validate_dataset(cat)["metric_n_generated"] == 3
    assert main(["validate", str(tmp_path)]) == 0
    assert "fd_radiomics" in capsys.readouterr().out
    rows = open_catalog(str(tmp_path)).read_table("datasets").to_pylist()
    assert len(rows) == 2
    validated = [r for r in rows if r["fd_radiomics"] is not None]
    assert len(validated) == 1 and validated[0]["dataset"] == "demo"
    assert dict(validated[0]["metrics"])["fd_radiomics_ref"] == pytest.approx(validated[0]["fd_radiomics_ref"])


def test_cli_validate_without_dataset_row_is_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nothing")]) == 2
    assert "ctfactory validate:" in capsys.readouterr().err


def test_unknown_extractor_is_refused():
    with pytest.raises(ValidationInputError, match=r"expects extractor in \['radiomics', 'astra'\], but got extractor='inception'"):
        compute_dataset_metrics(_cases(2), extractor="inception")
