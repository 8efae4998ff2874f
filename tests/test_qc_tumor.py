"""Tumour QC: a requested tumour is visible against its host organ and of the requested size."""

from __future__ import annotations

import numpy as np
import pytest

from _specs import tiny_spec
from catalog.root import DatasetRoot
from maisi_core.evaluation import qc
from maisi_core.errors import QCConfigError
from maisi_core.engine.geometry import affine_from_spacing
from maisi_core.evaluation.qc_tumor import TUMOR_CONTRAST_RULES, check_tumor, measure_tumor
from tests._qc_cases import phantom_case

SPACING = 2.0
AFFINE = affine_from_spacing((SPACING,) * 3, (40, 40, 40))


def _host_with_tumor(host: int, host_hu: float, tumor: int, tumor_hu: float, diameter_mm: float = 16.0):
    """A 40³ block at 2 mm: body, a host cube (IDs ``host``) and a sphere of ``tumor`` at its centre; noise-free HU."""
    lab = np.full((40, 40, 40), 200, dtype=np.uint8)
    lab[4:36, 4:36, 4:36] = host
    grid = (np.indices(lab.shape) - 19.5) * SPACING
    sphere = (grid ** 2).sum(axis=0) <= (diameter_mm / 2) ** 2
    lab[sphere] = tumor
    image = np.where(lab == 200, 40.0, host_hu).astype(np.float32)
    image[sphere] = tumor_hu
    return image, lab


def test_contrast_rules_cover_every_tumour_label():
    assert sorted(TUMOR_CONTRAST_RULES) == [23, 24, 26, 27, 128]
    assert (TUMOR_CONTRAST_RULES[23].sign, TUMOR_CONTRAST_RULES[23].min_contrast_hu) == (1, 300.0)
    assert TUMOR_CONTRAST_RULES[128].sign == 0


def test_lung_tumour_at_lung_hu_fails_as_invisible():
    image, lab = _host_with_tumor(28, -830.0, 23, -830.0)
    failures, m = check_tumor(image, lab, 23, affine=AFFINE)
    assert [f.message for f in failures] == [
        "tumor_contrast: lung tumor median -830 HU vs host -830 HU, contrast +0 HU, needs >= +300 HU "
        "(invisible tumour?)"]
    assert failures[0].check == "tumor_contrast" and failures[0].expected == (300.0, np.inf)
    assert m.contrast_hu == 0.0


def test_lung_tumour_at_soft_tissue_hu_passes_and_is_recorded():
    image, lab = _host_with_tumor(28, -830.0, 23, 20.0)
    result = qc.check_case(image, lab, affine=AFFINE, expected_tumors={23: (10.0, 20.0)})
    assert result.passed, result.summary()
    assert result.tumor_contrast_hu == {"lung tumor": 850.0}
    assert result.tumor_diameter_mm["lung tumor"] == pytest.approx(16.0, abs=1.0)


@pytest.mark.parametrize("tumor,host,host_hu,tumor_hu,passes", [
    (26, 1, 60.0, 35.0, True),    # hypodense hepatic metastasis
    (26, 1, 60.0, 55.0, False),   # isodense: invisible
    (26, 1, 60.0, 120.0, False),  # hyperdense in a portal-venous liver: not the published sign
    (24, 4, 100.0, 60.0, True),   # hypoattenuating pancreatic adenocarcinoma
    (24, 4, 100.0, 95.0, False),  # isoattenuating
    (128, 40, 250.0, 40.0, True),  # lytic
    (128, 40, 250.0, 700.0, True),  # blastic
    (128, 40, 250.0, 300.0, False),
    (27, 62, -20.0, 40.0, True),  # colon primary: soft tissue
    (27, 62, -20.0, -900.0, False),  # gas: not a tumour
])
def test_contrast_rule_per_tumour_type(tumor, host, host_hu, tumor_hu, passes):
    image, lab = _host_with_tumor(host, host_hu, tumor, tumor_hu)
    failures, _ = check_tumor(image, lab, tumor, affine=AFFINE)
    assert (failures == []) == passes, [f.message for f in failures]
    assert all(f.check == "tumor_contrast" for f in failures)


def test_colon_tumour_outside_soft_tissue_names_the_range():
    image, lab = _host_with_tumor(62, -20.0, 27, -900.0)
    failures, _ = check_tumor(image, lab, 27, affine=AFFINE)
    assert [f.message for f in failures] == [
        "tumor_contrast: colon cancer primaries median -900 HU outside [-100, +200] HU"]


def test_ring_ignores_other_organs_and_reports_an_empty_ring():
    image, lab = _host_with_tumor(28, -830.0, 23, 20.0)
    lab[(lab != 23) & (lab != 0)] = 200  # the tumour floats in body tissue: no lung around it
    failures, m = check_tumor(image, lab, 23, affine=AFFINE)
    assert m.ring_voxels == 0 and np.isnan(m.ring_median_hu)
    assert [f.message for f in failures] == ["tumor_contrast: lung tumor has no host tissue around it (empty ring)"]


def test_wrong_size_tumours_fail_with_the_allowed_range():
    image, lab = _host_with_tumor(28, -830.0, 23, 20.0, diameter_mm=16.0)
    too_small, m = check_tumor(image, lab, 23, affine=AFFINE, diameter_range_mm=(30.0, 40.0))
    assert [f.message for f in too_small] == [
        f"tumor_size: lung tumor diameter {m.diameter_mm:.1f} mm (extent 16 mm) outside [20.5, 52.0] mm allowed "
        "for the requested [30, 40] mm"]
    assert too_small[0].check == "tumor_size" and too_small[0].expected == pytest.approx((20.5, 52.0))
    too_big, _ = check_tumor(image, lab, 23, affine=AFFINE, diameter_range_mm=(4.0, 8.0))
    assert [f.check for f in too_big] == ["tumor_size"] and "allowed for the requested [4, 8] mm" in too_big[0].message
    assert check_tumor(image, lab, 23, affine=AFFINE, diameter_range_mm=(12.0, 20.0))[0] == []


@pytest.mark.parametrize("tumor,regions", [(23, "chest"), (26, "abdomen"), (24, "abdomen"), (27, "abdomen"),
                                           (128, ("chest", "abdomen"))])
@pytest.mark.parametrize("size_mm", [(5.0, 10.0), (20.0, 40.0)])
def test_phantom_tumours_at_6mm_pass_the_size_check(tumor, regions, size_mm):
    for seed in range(2):
        _, lab, affine, placed = phantom_case(regions, seed=seed, tumor=(tumor, size_mm))
        assert placed and placed[0].label == tumor
        failures, m = check_tumor(None, lab, tumor, affine=affine, diameter_range_mm=size_mm)
        assert failures == [], (seed, [f.message for f in failures], placed[0].diameter_mm)


def test_phantom_lung_tumour_through_check_case_passes_and_fails_at_lung_hu():
    image, lab, affine, _ = phantom_case("chest", tumor=(23, (15.0, 30.0)))
    result = qc.check_case(image, lab, affine=affine, expected_tumors={23: (15.0, 30.0)})
    assert result.passed, result.summary()
    assert result.tumor_contrast_hu["lung tumor"] > 600
    flat = image.copy()
    flat[lab == 23] = -830.0
    result = qc.check_case(flat, lab, affine=affine, expected_tumors={23: (15.0, 30.0)})
    assert [f.check for f in result.failures] == ["tumor_contrast"]
    wrong = qc.check_case(image, lab, affine=affine, expected_tumors={23: (60.0, 80.0)})
    assert [f.check for f in wrong.failures] == ["tumor_size"]


def test_check_case_tumor_switch_keeps_only_the_presence_check():
    image, lab = _host_with_tumor(28, -830.0, 23, -830.0)
    result = qc.check_case(image, lab, affine=AFFINE, expected_tumors={23: (30.0, 40.0)}, tumor_check=False,
                           agreement_check=False)
    assert result.passed and result.tumor_contrast_hu == {} and result.tumor_diameter_mm == {}
    absent = qc.check_case(image, np.where(lab == 23, 28, lab).astype(np.uint8), affine=AFFINE,
                           expected_tumors={23: None}, tumor_check=False)
    assert [f.message for f in absent.failures] == ["lung tumor: expected tumour label 23 is absent"]
    size_only = qc.check_case(image, lab, affine=AFFINE, expected_tumors={23: (10.0, 20.0)}, image_checks=False)
    assert size_only.passed and size_only.tumor_contrast_hu == {} and "lung tumor" in size_only.tumor_diameter_mm


def test_check_case_rejects_bad_tumour_requests():
    image, lab = _host_with_tumor(28, -830.0, 23, 20.0)
    with pytest.raises(QCConfigError, match=r"check_case expects tumour diameter ranges \(low, high\) in mm with "
                                            r"0 < low <= high, but got expected_tumors\[23\]=\(20, 10\)\."):
        qc.check_case(image, lab, expected_tumors={23: (20, 10)})
    with pytest.raises(QCConfigError, match=r"check_case expects tumour label IDs from \[23, 24, 26, 27, 128\], "
                                            r"but got expected_tumors key=1\."):
        qc.check_case(image, lab, expected_tumors={1: None})


def test_measure_tumor_returns_none_when_absent():
    image, lab = _host_with_tumor(28, -830.0, 23, 20.0)
    assert measure_tumor(image, np.where(lab == 23, 28, lab), 23, AFFINE) is None


# ---------------------------------------------------------------------------------- the flow's per-case QC

class _IntensityGenerator:
    """The intensity model's CT of the mask, optionally with the tumour painted at lung HU."""

    model_name, model_digest, device, precision = "intensity", "stub", "cpu", "fp32"

    def __init__(self, tumor_hu: float | None = None) -> None:
        self.tumor_hu = tumor_hu

    def generate(self, request, mask, *, seed):
        from factory.case import GeneratedVolume
        from maisi_core.anatomy.intensity import synthesize_ct

        image = synthesize_ct(mask.label_map, request.spacing_mm, seed=seed)
        if self.tumor_hu is not None:
            image[mask.label_map == 23] = self.tumor_hu
        return GeneratedVolume(image, mask.label_map, mask.affine, {})


def _request(tmp_path, extra=""):
    """One chest case with a 15-30 mm lung tumour; QC with one retry, and ``extra`` settings (", key: value")."""
    from factory.plan import plan_dataset

    spec = tiny_spec(tmp_path, name="tumours", seed=5, cohort="chest",
                     pathology="{type: lung_tumor, size_mm: [15, 30]}", size=(48, 48, 32), steps=2,
                     qc="{max_retries: 1" + extra + "}")
    return plan_dataset(spec).cases[0]


def test_flow_qc_options_pass_the_requested_range_for_placed_tumours(tmp_path):
    from types import SimpleNamespace

    from factory.case import qc_options

    request = _request(tmp_path, ", agreement_check: false")
    placed = qc_options(request, SimpleNamespace(tumors=[SimpleNamespace(label=23)]))
    assert placed["expected_tumors"] == {23: (15.0, 30.0)}
    assert (placed["orientation_check"], placed["tumor_check"], placed["agreement_check"]) == (True, True, False)
    assert qc_options(request, SimpleNamespace(tumors=[]))["expected_tumors"] == {23: None}


def test_flow_records_tumour_contrast_diameter_and_agreement(tmp_path):
    from factory.case import run_case

    record = run_case(_request(tmp_path), _IntensityGenerator(), root=DatasetRoot.of(tmp_path))
    assert record.status == "passed", record.failure_reason
    assert record.tumor_contrast_hu > 300 and 8.0 < record.tumor_diameter_mm < 40.0
    assert record.label_agreement["lung"] > 0.9
    row = record.to_row()
    assert row["label_agreement"] == dict(record.label_agreement)
    assert row["tumor_contrast_hu"] == record.tumor_contrast_hu


def test_flow_retries_and_fails_an_invisible_tumour(tmp_path):
    from factory.case import run_case

    record = run_case(_request(tmp_path), _IntensityGenerator(tumor_hu=-830.0), root=DatasetRoot.of(tmp_path))
    assert (record.status, record.attempt) == ("failed", 1)
    assert record.failure_reason.count("tumor_contrast: lung tumor median -830 HU vs host ") == 2
    assert any(m.startswith("tumor_contrast: lung tumor") for m in record.qc_failures)
    switched_off = run_case(_request(tmp_path, ", tumor_check: false"), _IntensityGenerator(tumor_hu=-830.0),
                            root=DatasetRoot.of(tmp_path / "off"))
    assert switched_off.status == "passed", switched_off.failure_reason
