"""Tests of the procedural phantom (maisi_core.anatomy.phantom, maisi_core.anatomy.body) and the CT intensity model."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from maisi_core.anatomy import labels
from maisi_core.errors import ConfigError, GeometryError, LabelMapError, LabelNameError, TumorPlacementError
from maisi_core.anatomy.intensity import IntensityParams, organ_medians, synthesize_ct, tissue_hu_medians
from maisi_core.anatomy.phantom import PhantomConfig, TumorSpec, generate_phantom

LUNG_LEFT, LUNG_RIGHT = (28, 29), (30, 31, 32)
QC_GROUPS = {
    "liver": (1,), "spleen": (3,), "pancreas": (4,), "kidney": (5, 14), "lung": labels.LUNG_IDS,
    "bone": tuple(range(33, 57)) + tuple(range(63, 98)) + (120, 122, 127), "brain": (22,),
}


def _qc_ranges() -> dict[str, tuple[float, float]]:
    """MAISI's QC rule (MAISI.md section 6): [min(sigma_6_low, p0.5), max(sigma_6_high, p99.5)], bone <= 1000."""
    text = resources.files("maisi_core").joinpath("data/image_median_statistics_ct.json").read_text()
    out = {}
    for name, s in json.loads(text).items():
        lo = min(s["sigma_6_low"], s["percentile_0_5"])
        hi = 1000.0 if name == "bone" else max(s["sigma_6_high"], s["percentile_99_5"])
        out[name] = (lo, hi)
    return out


@pytest.fixture(scope="module")
def trunk_case():
    return generate_phantom(PhantomConfig(regions=("chest", "abdomen")), seed=7)


def test_generate_phantom_same_seed_is_identical():
    config = PhantomConfig(regions="abdomen", output_size_vox=(48, 40, 32), spacing_mm=(7.0, 7.0, 8.0),
                           tumor=TumorSpec("hepatic tumor", (15.0, 25.0)))
    a, b = generate_phantom(config, seed=3), generate_phantom(config, seed=3)
    assert np.array_equal(a.label_map, b.label_map)
    assert np.array_equal(a.affine, b.affine)
    assert a.tumors == b.tumors


def test_generate_phantom_different_seeds_differ():
    config = PhantomConfig(regions="abdomen", output_size_vox=(48, 48, 32), spacing_mm=(7.0, 7.0, 8.0))
    a, b = generate_phantom(config, seed=1), generate_phantom(config, seed=2)
    changed = np.mean(a.label_map != b.label_map)
    assert changed > 0.02
    liver_a, liver_b = (np.count_nonzero(c.label_map == 1) for c in (a, b))
    assert liver_a != liver_b


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        ("head_neck", {22, 120, 57, 50, 51, 52, 53, 54, 55, 56, 121}),
        ("chest", set(labels.LUNG_IDS) | {115, 6, 57, 122, 121, 63, 64, 65, 66, 67, 68, 75, 76, 77, 78, 79, 80}
         | set(range(40, 48))),
        ("abdomen", {1, 3, 4, 5, 14, 12, 62, 6, 34, 35, 36, 37}),
        ("lower", {15, 93, 94, 95, 96, 97, 127, 33, 62}),
    ],
)
def test_generate_phantom_region_holds_its_organs(region, expected):
    case = generate_phantom(PhantomConfig(regions=region, output_size_vox=(80, 80, 80), spacing_mm=(5.0,) * 3), seed=11)
    present = set(np.unique(case.label_map).tolist())
    assert expected <= present, sorted(expected - present)
    assert labels.BODY_ID in present
    assert region in labels.regions_in_label_map(case.label_map)


def _world_x(case, ids) -> float | None:
    """World x (mm, RAS+: larger is further to the patient's right) of the centroid of some labels."""
    idx = np.argwhere(np.isin(case.label_map, ids))
    if idx.size == 0:
        return None
    return float((case.affine[:3, :3] @ idx.mean(axis=0) + case.affine[:3, 3])[0])


# (name, right-side IDs, left-side IDs): RAS+ puts the patient's right at larger world x.
LATERAL_PAIRS = [
    ("liver vs spleen", (1,), (3,)),
    ("lungs", LUNG_RIGHT, LUNG_LEFT),
    ("kidneys", (5,), (14,)),
    ("ribs", tuple(range(75, 87)), tuple(range(63, 75))),
    ("femurs", (94,), (93,)),
    ("hips", (96,), (95,)),
]
REGION_COMBINATIONS = [
    ("head_neck",), ("chest",), ("abdomen",), ("lower",), ("head_neck", "chest"), ("chest", "abdomen"),
    ("abdomen", "lower"), ("chest", "abdomen", "lower"), ("head_neck", "lower"),
]


@pytest.mark.parametrize("regions", REGION_COMBINATIONS, ids=lambda r: "+".join(r))
def test_generate_phantom_left_right_follow_ras(regions):
    """NIfTI's RAS+: +x is the patient's right, so right-sided organs lie at larger world x."""
    import nibabel as nib

    case = generate_phantom(PhantomConfig(regions=regions, output_size_vox=(64, 64, 64), spacing_mm=(6.0,) * 3),
                            seed=5)
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    checked = 0
    for name, right, left in LATERAL_PAIRS:
        xr, xl = _world_x(case, right), _world_x(case, left)
        if xr is None or xl is None:
            continue
        checked += 1
        assert xr > xl + 20.0, f"{name}: right x={xr:.0f} mm, left x={xl:.0f} mm"
    body_x = _world_x(case, [labels.BODY_ID] + list(range(1, 133)))
    heart_x = _world_x(case, [115])
    if heart_x is not None:
        assert heart_x < body_x, f"heart x={heart_x:.0f} mm is not left of the body's midline x={body_x:.0f} mm"
    liver_x = _world_x(case, [1])
    if liver_x is not None:
        assert liver_x > body_x + 30.0
    assert checked >= 1 or regions == ("head_neck",)


def test_generate_phantom_axes_are_anterior_and_superior(trunk_case):
    lab = trunk_case.label_map
    assert np.all(np.diag(trunk_case.affine)[:3] > 0)
    assert np.count_nonzero(trunk_case.affine[:3, :3] - np.diag(np.diag(trunk_case.affine)[:3])) == 0
    # +y anterior: heart in front of the spine; +z superior: lungs above the liver.
    spine = np.argwhere(np.isin(lab, range(38, 50)))
    heart = np.argwhere(lab == 115)
    assert heart[:, 1].mean() > spine[:, 1].mean()
    assert np.argwhere(np.isin(lab, labels.LUNG_IDS))[:, 2].mean() > np.argwhere(lab == 1)[:, 2].mean()


def test_generate_phantom_body_slices_are_wider_than_deep(trunk_case):
    body = trunk_case.label_map != 0
    k = body.shape[2] // 2
    xs, ys = np.nonzero(body[:, :, k])
    assert (xs.max() - xs.min()) > 1.2 * (ys.max() - ys.min())


def test_generate_phantom_sizes_are_in_mm():
    coarse = generate_phantom(PhantomConfig("abdomen", (64, 64, 48), (4.0, 4.0, 4.0)), seed=5)
    fine = generate_phantom(PhantomConfig("abdomen", (128, 128, 96), (2.0, 2.0, 2.0)), seed=5)
    for ids in ((1,), (3,), (5,), labels.VERTEBRA_IDS):
        v_coarse = np.isin(coarse.label_map, ids).sum() * 64.0
        v_fine = np.isin(fine.label_map, ids).sum() * 8.0
        assert v_coarse == pytest.approx(v_fine, rel=0.15), ids


@pytest.mark.parametrize(
    ("tumor", "region"),
    [("lung tumor", "chest"), ("hepatic tumor", "abdomen"), ("pancreatic tumor", "abdomen"),
     ("colon cancer primaries", "abdomen"), (128, "abdomen")],
)
def test_generate_phantom_tumor_lies_inside_its_host(tumor, region):
    spec = TumorSpec(tumor, (12.0, 24.0))
    size, spacing = (96, 96, 64), (3.0, 3.0, 3.0)
    plain = generate_phantom(PhantomConfig(region, size, spacing), seed=21)
    case = generate_phantom(PhantomConfig(region, size, spacing, tumor=spec), seed=21)
    (placed,) = case.tumors
    hosts = labels.TUMOR_HOSTS[spec.label_id]
    tumor_mask = case.label_map == spec.label_id
    assert tumor_mask.any()
    assert np.all(np.isin(plain.label_map[tumor_mask], hosts))
    assert np.array_equal(case.label_map[~tumor_mask], plain.label_map[~tumor_mask])
    assert 12.0 <= placed.diameter_mm <= 24.0
    assert tumor_mask[placed.center_vox]
    extent_mm = (np.ptp(np.argwhere(tumor_mask), axis=0) + 1) * np.asarray(spacing)
    assert extent_mm.max() <= placed.diameter_mm * 1.3 + 3.0
    assert placed.volume_mm3 == pytest.approx(tumor_mask.sum() * 27.0)
    center_mm = case.affine[:3, :3] @ np.asarray(placed.center_vox) + case.affine[:3, 3]
    assert placed.center_mm == pytest.approx(tuple(center_mm))


def test_generate_phantom_passes_the_label_map_check(trunk_case):
    labels.check_label_map(trunk_case.label_map, expected_shape=(64, 64, 64))
    assert trunk_case.label_map.dtype == np.uint8


def test_phantom_config_rejects_bad_values():
    with pytest.raises(LabelNameError, match=r"normalize_region expects one of .* but got region='chets'\. Did you mean 'chest'\?"):
        PhantomConfig(regions="chets")
    with pytest.raises(GeometryError, match=r"PhantomConfig expects output_size_vox as three positive integers, but got output_size_vox=\(64, 0, 64\)"):
        PhantomConfig(output_size_vox=(64, 0, 64))
    with pytest.raises(GeometryError, match=r"but got spacing_mm=\(1\.0, -1\.0, 1\.0\)"):
        PhantomConfig(spacing_mm=(1.0, -1.0, 1.0))
    with pytest.raises(ConfigError, match=r"TumorSpec expects a tumour label from \[23, 24, 26, 27, 128\] \(or its name\), but got label=1\."):
        TumorSpec(1)
    with pytest.raises(ConfigError, match=r"0 < low <= high, but got diameter_mm=\(30\.0, 10\.0\)"):
        TumorSpec(23, (30.0, 10.0))


def test_generate_phantom_tumor_without_host_raises():
    config = PhantomConfig("head_neck", (48, 48, 48), (6.0, 6.0, 6.0), tumor=TumorSpec("hepatic tumor"))
    with pytest.raises(TumorPlacementError, match=r"place_tumor expects the host organ of 'hepatic tumor' \(IDs \[1\]\) in the label map, but got tumor_id=26 with no host voxel\."):
        generate_phantom(config, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthesize_ct_organ_medians_fall_in_qc_ranges(seed):
    ranges = _qc_ranges()
    trunk = generate_phantom(PhantomConfig(("chest", "abdomen")), seed=seed)
    head = generate_phantom(PhantomConfig("head_neck", (48, 48, 48), (6.0, 6.0, 6.0)), seed=seed)
    medians = {}
    for case in (trunk, head):
        ct = synthesize_ct(case.label_map, case.spacing_mm, seed=seed)
        for name, value in organ_medians(ct, case.label_map, QC_GROUPS).items():
            if not np.isnan(value):
                medians[name] = value
    assert set(medians) == set(QC_GROUPS)
    for name, value in medians.items():
        lo, hi = ranges[name]
        assert lo <= value <= hi, (name, value)


def test_synthesize_ct_is_seeded_float32_with_air_outside(trunk_case):
    a = synthesize_ct(trunk_case.label_map, trunk_case.spacing_mm, seed=4)
    b = synthesize_ct(trunk_case.label_map, trunk_case.spacing_mm, seed=4)
    c = synthesize_ct(trunk_case.label_map, trunk_case.spacing_mm, seed=5)
    assert a.dtype == np.float32 and a.shape == trunk_case.label_map.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    outside = trunk_case.label_map == 0
    assert np.median(a[outside]) == pytest.approx(-1000.0, abs=25.0)
    assert -130.0 < np.median(a[trunk_case.label_map == labels.BODY_ID]) < 50.0
    assert a.min() >= -1024.0 and a.max() <= 3071.0


def test_synthesize_ct_follows_tissue_medians_without_jitter(trunk_case):
    params = IntensityParams(mean_jitter_scale=0.0, noise_sigma_hu=(10.0, 10.0))
    ct = synthesize_ct(trunk_case.label_map, trunk_case.spacing_mm, seed=0, params=params)
    expected = tissue_hu_medians(params)
    for label in (1, 3, 4, 5, 14, 28, 32, 115):
        got = float(np.median(ct[trunk_case.label_map == label]))
        assert got == pytest.approx(expected[label], abs=15.0), label


def test_tissue_hu_medians_lie_in_qc_ranges():
    ranges, medians = _qc_ranges(), tissue_hu_medians()
    for name, ids in QC_GROUPS.items():
        lo, hi = ranges[name]
        assert all(lo <= medians[i] <= hi for i in ids), name
    assert medians[0] == -1000.0 and labels.BODY_ID not in medians


def test_synthesize_ct_rejects_bad_label_maps():
    with pytest.raises(LabelMapError, match=r"synthesize_ct expects a 3D label map \(X, Y, Z\), but got shape=\(4, 4\)\."):
        synthesize_ct(np.zeros((4, 4), np.uint8), (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(LabelMapError, match=r"synthesize_ct expects label IDs in 0\.\.255, but got range=\(0, 300\)"):
        synthesize_ct(np.full((4, 4, 4), 300, np.int32) * (np.arange(4) > 0), (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ConfigError, match=r"IntensityParams expects a range \(low, high\) with 0 <= low <= high, but got noise_sigma_hu=\(20\.0, 10\.0\)\."):
        IntensityParams(noise_sigma_hu=(20.0, 10.0))
