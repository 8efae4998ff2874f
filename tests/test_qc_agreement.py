"""Label-image agreement: labelled structures show their tissue's HU, with partial volume at coarse spacing."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_core.evaluation import qc
from maisi_core.evaluation.qc_agreement import MIN_FRACTION, check_label_agreement, label_agreement_fractions
from tests._qc_cases import phantom_case, pv_case

CASES = [
    ("chest", (64, 64, 64), (6.0, 6.0, 6.0)),
    ("abdomen", (48, 48, 32), (8.0, 8.0, 8.0)),
    (("chest", "abdomen"), (64, 64, 48), (4.0, 4.0, 4.0)),
    ("lower", (64, 64, 64), (6.0, 6.0, 6.0)),
]


@pytest.mark.parametrize("regions,size,spacing", CASES)
def test_correct_phantom_ct_passes_and_reports_fractions(regions, size, spacing):
    image, lab, _, _ = phantom_case(regions, size, spacing)
    failures, fractions = check_label_agreement(image, lab)
    assert failures == [], [f.message for f in failures]
    assert all(MIN_FRACTION <= v <= 1.0 for v in fractions.values()), fractions
    assert "vertebrae" in fractions
    assert not any(k.startswith(("vertebrae ", "left rib", "right rib")) for k in fractions)


@pytest.mark.parametrize("regions", ["chest", ("chest", "abdomen")])
def test_partial_volume_at_6mm_passes(regions):
    """A CT drawn at 3 mm and block-averaged to 6 mm: ribs and cord are 1-2 voxels, mixed with lung and bone."""
    image, lab, _ = pv_case(regions)
    failures, fractions = check_label_agreement(image, lab)
    assert failures == [], [f.message for f in failures]
    assert fractions["ribs"] > 0.9 and fractions["lung"] > 0.95 and fractions["spinal cord"] >= MIN_FRACTION


def test_spinal_cord_at_bone_hu_fails_with_one_line():
    image, lab, _, _ = phantom_case("chest")
    bad = image.copy()
    bad[lab == 121] = 404.0
    n = int((lab == 121).sum())
    failures, fractions = check_label_agreement(bad, lab)
    assert [f.message for f in failures] == [
        f"label_agreement: spinal cord median +404 HU, 0% of {n} voxels in the soft range [-300, +300] HU"]
    assert failures[0].check == "label_agreement" and failures[0].organ == "spinal cord"
    assert fractions["spinal cord"] == 0.0


def test_spinal_cord_at_bone_hu_fails_also_under_partial_volume():
    image, lab, _ = pv_case("chest")
    bad = image.copy()
    bad[lab == 121] = 404.0 + np.random.default_rng(0).normal(0, 20, int((lab == 121).sum()))
    assert [f.organ for f in check_label_agreement(bad, lab)[0]] == ["spinal cord"]


def test_left_ribs_at_lung_hu_fail_one_line_each():
    image, lab, _, _ = phantom_case("chest")
    ribs = [r for r in range(63, 68) if (lab == r).sum() >= 4]
    assert ribs, "the chest phantom holds left ribs 1-5"
    bad = image.copy()
    rng = np.random.default_rng(1)
    for r in ribs:
        mask = lab == r
        bad[mask] = rng.uniform(-790.0, -540.0) + rng.normal(0.0, 20.0, int(mask.sum()))
    failures, fractions = check_label_agreement(bad, lab)
    assert [f.organ for f in failures] == [f"left rib {r - 62}" for r in ribs]
    assert all(" HU, 0% of " in f.message and f.message.endswith("voxels in the bone range [-300, +3071] HU")
               for f in failures), [f.message for f in failures]
    assert fractions["ribs"] < 0.9


def test_lung_filled_with_soft_tissue_fails_on_interior_voxels():
    image, lab, _, _ = phantom_case("chest")
    bad = image.copy()
    bad[lab == 28] = 40.0
    failures, _ = check_label_agreement(bad, lab)
    assert [f.organ for f in failures] == ["left lung upper lobe"]
    assert failures[0].message.startswith("label_agreement: left lung upper lobe median +40 HU, 0% of ")
    assert "interior voxels in the air range [-1024, -400] HU" in failures[0].message


def test_check_case_wires_agreement_and_its_switch():
    image, lab, affine, _ = phantom_case("chest")
    bad = image.copy()
    bad[lab == 121] = 404.0
    result = qc.check_case(bad, lab, affine=affine)
    assert [f.check for f in result.failures] == ["label_agreement"]
    assert result.label_agreement == label_agreement_fractions(bad, lab)
    off = qc.check_case(bad, lab, affine=affine, agreement_check=False)
    assert off.passed and off.label_agreement == {}
    assert qc.check_case(bad, lab, affine=affine, image_checks=False).passed


def test_unjudged_labels_and_tiny_structures_are_left_alone():
    lab = np.full((16, 16, 16), 200, dtype=np.uint8)
    lab[2:8, 2:8, 2:8] = 62  # colon: gas or stool, no signature
    lab[10, 10, 10:12] = 121  # two voxels of cord: reported, not judged
    image = np.full(lab.shape, 900.0, dtype=np.float32)
    failures, fractions = check_label_agreement(image, lab)
    assert failures == [] and fractions == {"spinal cord": 0.0}
