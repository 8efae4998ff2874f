"""Per-case QC: MAISI organ HU ranges, sanity checks, overrides and tumour presence."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_core.evaluation import qc
from maisi_core.errors import ImageError, LabelMapError, QCConfigError
from maisi_core.io import affine_from_spacing
from maisi_core.anatomy.labels import BONE_IDS
from tests._volumes import make_phantom


@pytest.fixture(scope="module")
def case():
    return make_phantom(32, seed=1)


def test_reference_hu_ranges_match_the_maisi_table():
    expected = {
        "liver": (-21.6, 162.0), "spleen": (-43.1, 184.1), "pancreas": (-56.6, 149.5),
        "kidney": (-130.6, 267.3), "lung": (-1088.6, -367.0), "bone": (71.4, 1000.0), "brain": (-951.0, 369.5),
    }
    ranges = qc.reference_hu_ranges()
    assert set(ranges) == set(expected)
    for organ, (low, high) in expected.items():
        assert ranges[organ] == pytest.approx((low, high), abs=0.05), organ
    assert qc.ORGAN_LABEL_IDS["bone"] == BONE_IDS and qc.ORGAN_LABEL_IDS["kidney"] == (5, 14)
    assert qc.ORGAN_LABEL_IDS["lung"] == (28, 29, 30, 31, 32)


def test_check_case_passes_a_plausible_phantom_and_records_absent_organs(case):
    image, label = case
    result = qc.check_case(image, label)
    assert result.passed and result.failures == () and result.summary() == "pass"
    assert set(result.organ_hu_median) == {"liver", "spleen", "kidney", "lung", "bone"}
    assert result.absent_organs == ("pancreas", "brain")
    assert result.organ_hu_median["lung"] == pytest.approx(-800, abs=80)


def test_check_case_fails_a_shifted_liver_and_names_it(case):
    image, label = make_phantom(32, seed=1, hu_shift={1: 250.0})
    assert [f.check for f in qc.check_case(image, label).failures] == ["organ_hu", "label_agreement"]
    result = qc.check_case(image, label, agreement_check=False)
    assert not result.passed
    assert [f.organ for f in result.failures] == ["liver"]
    failure = result.failures[0]
    assert failure.check == "organ_hu" and failure.expected == pytest.approx((-21.6, 162.0), abs=0.05)
    assert failure.message == f"liver: median {failure.value:.1f} HU outside [-21.6, 162.0]"
    assert 250 < failure.value < 360


def test_check_case_fails_bone_above_the_forced_1000_hu_cap(case):
    image, label = case
    image = image.copy()
    image[label == 33] = 1200.0
    result = qc.check_case(image, label)
    assert [f.organ for f in result.failures] == ["bone"]
    assert result.failures[0].message == "bone: median 1200.0 HU outside [71.4, 1000.0]"


def test_check_case_reports_nan_and_out_of_range_hu(case):
    image, label = case
    image = image.copy()
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = 5000.0
    result = qc.check_case(image, label)
    assert [f.check for f in result.failures] == ["hu_finite", "hu_range"]
    assert result.failures[0].message == "image: 1 NaN/inf voxels"
    assert result.failures[1].message.startswith("image: HU range [") and "exceeds [-1024, 3071]" in result.failures[1].message


def test_check_case_reports_shape_affine_and_body_problems(case):
    image, label = case
    result = qc.check_case(image, label[:, :, :30])
    assert [f.check for f in result.failures] == ["shape"]
    assert result.failures[0].message == "shape: image (32, 32, 32) != label (32, 32, 30)"
    result = qc.check_case(image, label, affine=affine_from_spacing((1, 1, 1)),
                           label_affine=affine_from_spacing((1, 1, 1.5)))
    assert [f.check for f in result.failures] == ["affine"] and "differ by up to 0.5 mm" in result.summary()
    no_body = np.where(label == 200, 0, label).astype(np.uint8)
    assert [f.message for f in qc.check_case(image, no_body).failures] == ["label: body label 200 is absent"]
    assert qc.check_case(image, no_body, require_body=False).passed


def test_check_case_thresholds_override_one_organ(case):
    image, label = case
    result = qc.check_case(image, label, thresholds={"liver": (150.0, 200.0)})
    assert [f.organ for f in result.failures] == ["liver"]
    assert result.hu_ranges["liver"] == (150.0, 200.0)
    assert result.hu_ranges["spleen"] == qc.reference_hu_ranges()["spleen"]


def test_check_case_rejects_unknown_organ_and_bad_range(case):
    image, label = case
    with pytest.raises(QCConfigError, match=r"check_case expects threshold organs from \['bone', 'brain', "
                                            r"'kidney', 'liver', 'lung', 'pancreas', 'spleen'\], but got "
                                            r"organ='livr'. Did you mean 'liver'\?"):
        qc.check_case(image, label, thresholds={"livr": (0, 100)})
    with pytest.raises(QCConfigError, match=r"check_case expects thresholds as finite \(low, high\) HU with "
                                            r"low < high, but got lung=\(0, -100\)"):
        qc.check_case(image, label, thresholds={"lung": (0, -100)})


def test_check_case_requires_expected_tumours(case):
    image, label = case
    result = qc.check_case(image, label, expected_tumor_ids=[23])
    assert [(f.check, f.organ) for f in result.failures] == [("tumor", "lung tumor")]
    assert result.failures[0].message == "lung tumor: expected tumour label 23 is absent"
    with_tumor, visible = label.copy(), image.copy()
    with_tumor[16, 16, 24] = 23
    visible[16, 16, 24] = 20.0  # a solid nodule; at lung HU it would fail the contrast check (test_qc_tumor)
    assert qc.check_case(visible, with_tumor, expected_tumor_ids=[23]).passed
    with pytest.raises(QCConfigError, match=r"check_case expects tumour label IDs from \[23, 24, 26, 27, 128\], "
                                            r"but got expected_tumor_ids=\[1\]"):
        qc.check_case(image, label, expected_tumor_ids=[1])


def test_check_case_rejects_non_volume_inputs(case):
    image, label = case
    with pytest.raises(ImageError, match=r"check_case expects a real-valued 3D image \(X, Y, Z\) in HU, but got "
                                         r"shape=\(32, 32\)"):
        qc.check_case(image[0], label)
    with pytest.raises(LabelMapError, match=r"check_case expects an integer 3D label map \(X, Y, Z\), but got "
                                            r"shape=\(32, 32, 32\), dtype=float32"):
        qc.check_case(image, label.astype(np.float32))
