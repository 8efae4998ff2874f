"""Left/right QC: label maps judged in world x (RAS+, +x = patient's right), images against their labels."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_core.evaluation import qc
from maisi_core.engine.geometry import affine_from_spacing
from maisi_core.evaluation.qc_orientation import (
    IMAGE_MIRROR_MARGIN, check_image_orientation, check_label_orientation, lateral_pairs, mirror_correlations,
)
from tests._qc_cases import phantom_case, to_lps, world_x

AFFINE_4MM = affine_from_spacing((4.0, 4.0, 4.0), (32, 32, 32))


def _box(lab, lo, hi, value):
    lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value


def _synthetic_map() -> np.ndarray:
    """A 32³ map in RAS+ array order (axis 0 towards the patient's right) with lateral pairs and a heart."""
    lab = np.zeros((32, 32, 32), dtype=np.uint8)
    _box(lab, (2, 4, 0), (30, 28, 32), 200)
    _box(lab, (18, 8, 4), (28, 20, 14), 1)    # liver: patient's right = high x
    _box(lab, (5, 14, 6), (10, 20, 12), 3)    # spleen: left
    _box(lab, (20, 18, 0), (24, 22, 6), 5)    # right kidney
    _box(lab, (8, 18, 0), (12, 22, 6), 14)    # left kidney
    _box(lab, (18, 8, 18), (28, 22, 30), 30)  # right lung upper lobe
    _box(lab, (4, 8, 18), (14, 22, 30), 28)   # left lung upper lobe
    _box(lab, (12, 6, 18), (16, 12, 26), 115)  # heart: left of the spine
    _box(lab, (15, 22, 0), (17, 25, 32), 40)  # vertebra T10 on the midline
    return lab


def test_lateral_pairs_hold_the_named_twins_and_pool_lungs_and_ribs():
    pairs = {(p.right_name, p.left_name): (p.right_ids, p.left_ids) for p in lateral_pairs()}
    assert pairs[("liver", "spleen")] == ((1,), (3,))
    assert pairs[("right lung", "left lung")] == ((30, 31, 32), (28, 29))
    assert pairs[("right ribs", "left ribs")] == (tuple(range(75, 87)), tuple(range(63, 75)))
    for right, left in [(5, 14), (8, 9), (59, 58), (61, 60), (88, 87), (90, 89), (92, 91), (94, 93), (96, 95),
                        (99, 98), (105, 104), (107, 106), (111, 110), (113, 112), (124, 123), (117, 116)]:
        assert ((right,), (left,)) in pairs.values(), (right, left)
    assert not any("lobe" in name or "rib " in name for pair in pairs for name in pair)


def test_check_label_orientation_passes_a_correct_synthetic_map():
    assert check_label_orientation(_synthetic_map(), AFFINE_4MM) == []


def test_check_label_orientation_fails_a_mirrored_map_with_one_line():
    failures = check_label_orientation(_synthetic_map()[::-1], AFFINE_4MM)
    assert [f.check for f in failures] == ["orientation"]
    assert failures[0].message == ("orientation: liver centroid x=-28 mm is left of spleen x=+34 mm "
                                   "(mirrored label map? 4 of 4 lateral pairs disagree)")
    assert failures[0].organ == "liver" and failures[0].value == pytest.approx(-62.0, abs=1.0)


def test_check_label_orientation_names_a_heart_right_of_the_midline():
    lab = _synthetic_map()
    lab[lab == 115] = 200
    _box(lab, (17, 6, 18), (21, 12, 26), 115)
    failures = check_label_orientation(lab, AFFINE_4MM)
    assert [f.message for f in failures] == [
        "orientation: heart centroid x=+12 mm is right of the midline x=+0 mm (mirrored label map? 1 of 4 lateral "
        "pairs disagree)"]


def test_check_label_orientation_judges_world_x_so_an_lps_map_passes():
    lab = _synthetic_map()
    lps, lps_affine = to_lps(lab, AFFINE_4MM)
    assert world_x(lps, lps_affine, [1]) == pytest.approx(world_x(lab, AFFINE_4MM, [1]))
    assert check_label_orientation(lps, lps_affine) == []
    # the LPS array read with the RAS affine is mirrored in the world
    assert [f.check for f in check_label_orientation(lps, AFFINE_4MM)] == ["orientation"]
    # so is the RAS array read with an x-flipped affine
    flipped = AFFINE_4MM.copy()
    flipped[0, 0] *= -1
    assert check_label_orientation(lab, flipped)[0].message.startswith("orientation: liver centroid x=-152 mm")


def test_phantom_puts_the_patients_right_at_greater_world_x():
    """Depends on the phantom's RAS+ convention (liver on the patient's right)."""
    _, lab, affine, _ = phantom_case(("chest", "abdomen"))
    assert world_x(lab, affine, [1]) > world_x(lab, affine, [3])
    assert world_x(lab, affine, [5]) > world_x(lab, affine, [14])
    assert world_x(lab, affine, [30, 31, 32]) > world_x(lab, affine, [28, 29])
    assert world_x(lab, affine, [115]) < world_x(lab, affine, range(33, 57))


@pytest.mark.parametrize("regions,size,spacing", [
    (("chest", "abdomen"), (64, 64, 64), (6.0, 6.0, 6.0)),
    ("lower", (48, 48, 32), (8.0, 8.0, 8.0)),
    ("head_neck", (32, 32, 32), (8.0, 8.0, 8.0)),
])
def test_check_case_passes_correct_phantom_cases_and_their_lps_copies(regions, size, spacing):
    """Depends on the phantom's RAS+ convention."""
    image, lab, affine, _ = phantom_case(regions, size, spacing)
    result = qc.check_case(image, lab, affine=affine, label_affine=affine)
    assert result.passed, result.summary()
    lps_image, lps_affine = to_lps(image, affine)
    lps_lab, _ = to_lps(lab, affine)
    result = qc.check_case(lps_image, lps_lab, affine=lps_affine, label_affine=lps_affine)
    assert result.passed, result.summary()
    r_labelled, r_mirrored = mirror_correlations(lps_image, lps_lab, lps_affine)
    assert r_labelled > r_mirrored + 0.1


def test_check_case_fails_a_mirrored_label_map():
    """Image and labels mirrored together: consistent with each other, wrong against the names."""
    image, lab, affine, _ = phantom_case(("chest", "abdomen"))
    result = qc.check_case(image[::-1].copy(), lab[::-1].copy(), affine=affine)
    assert [f.check for f in result.failures] == ["orientation"]
    assert result.failures[0].message == ("orientation: right ribs centroid x=-93 mm is left of left ribs x=+96 mm "
                                          "(mirrored label map? 5 of 5 lateral pairs disagree)")


def test_check_case_fails_a_mirrored_image_with_one_line():
    image, lab, affine, _ = phantom_case(("chest", "abdomen"))
    mirrored = image[::-1].copy()
    r_labelled, r_mirrored = mirror_correlations(mirrored, lab, affine)
    failures = [f for f in qc.check_case(mirrored, lab, affine=affine).failures if f.check == "orientation"]
    assert [f.message for f in failures] == [
        f"orientation: image matches the left/right-mirrored labels better (r={r_mirrored:.2f}) than the labels "
        f"(r={r_labelled:.2f}) (mirrored image?)"]
    assert r_mirrored - r_labelled > 0.2


def test_check_image_orientation_cannot_tell_and_passes_a_symmetric_case():
    lab = np.zeros((32, 32, 16), dtype=np.uint8)
    _box(lab, (4, 4, 0), (28, 28, 16), 200)
    _box(lab, (6, 10, 0), (12, 20, 16), 93)   # left femur
    _box(lab, (20, 10, 0), (26, 20, 16), 94)  # right femur
    image = np.where(lab == 0, -1000.0, np.where(lab == 200, -50.0, 600.0)).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 10, image.shape).astype(np.float32)
    affine = affine_from_spacing((4.0, 4.0, 4.0), lab.shape)
    assert check_image_orientation(image, lab, affine) == []
    assert check_image_orientation(image[::-1].copy(), lab, affine) == []
    r_labelled, r_mirrored = mirror_correlations(image[::-1].copy(), lab, affine)
    assert abs(r_mirrored - r_labelled) <= IMAGE_MIRROR_MARGIN


def test_check_case_orientation_switch_turns_both_halves_off():
    image, lab, affine, _ = phantom_case(("chest", "abdomen"))
    result = qc.check_case(image[::-1].copy(), lab[::-1].copy(), affine=affine, orientation_check=False)
    assert result.passed, result.summary()
    labels_only = qc.check_case(image[::-1].copy(), lab, affine=affine, image_checks=False)
    assert labels_only.passed, labels_only.summary()
