from __future__ import annotations

import numpy as np
import pytest

from maisi_core import presets
from maisi_core.errors import GeometryError
from maisi_core.engine.geometry import affine_from_spacing, check_geometry, spacing_from_affine

OFFICIAL = presets.maisi_ct_rflow().geometry


def test_official_rules_accept_released_sizes():
    assert check_geometry(OFFICIAL, (512, 512, 128), (0.8, 0.8, 2.5)) == ((512, 512, 128), (0.8, 0.8, 2.5))
    check_geometry(OFFICIAL, (256, 256, 256), (1.5, 1.5, 1.5))


@pytest.mark.parametrize(
    ("size", "spacing", "message"),
    [
        ((512, 256, 128), (1.0, 1.0, 1.0), r"expects output_size x == y, but got output_size_vox=\[512, 256, 128\]"),
        ((320, 320, 128), (1.0, 1.0, 1.0), r"x and y in \[256, 384, 512\], but got output_size_vox=\[320, 320, 128\]"),
        ((256, 256, 100), (1.0, 1.0, 1.0), r"z in \[128, 256, 384, 512, 640, 768\], but got output_size_vox=\[256, 256, 100\]"),
        ((256, 256, 128), (1.0, 1.2, 1.0), r"expects spacing x == y, but got spacing_mm=\[1.0, 1.2, 1.0\]"),
        ((256, 256, 128), (3.5, 3.5, 1.0), r"x and y spacing in \[0.5, 3.0\] mm, but got spacing_mm=\[3.5, 3.5, 1.0\]"),
        ((256, 256, 128), (1.5, 1.5, 6.0), r"z spacing in \[0.5, 5.0\] mm, but got spacing_mm=\[1.5, 1.5, 6.0\]"),
        ((256, 256, 128), (0.8, 0.8, 2.0), r"field of view .* >= 256 mm, but got fov_mm=204.8"),
        ((256, 256), (1.0, 1.0, 1.0), r"expects output_size_vox as three numbers \(x, y, z\), but got output_size_vox=\(256, 256\)"),
        ((256, 256, 128), (1.0, -1.0, 1.0), r"expects positive spacings in mm, but got spacing_mm=\[1.0, -1.0, 1.0\]"),
    ],
)
def test_official_rules_reject_each_violation(size, spacing, message):
    with pytest.raises(GeometryError, match=message):
        check_geometry(OFFICIAL, size, spacing)


def test_tiny_rules_accept_small_volumes_but_need_multiples_of_16():
    rules = presets.tiny().geometry
    check_geometry(rules, (32, 32, 32), (4.0, 4.0, 4.0))
    with pytest.raises(GeometryError, match=r"divisible by 16 .* but got output_size_vox=\[32, 32, 40\]\. Next valid: \[32, 32, 48\]"):
        check_geometry(rules, (32, 32, 40), (4.0, 4.0, 4.0))


def test_affine_centres_volume_and_spacing_round_trips():
    aff = affine_from_spacing((0.8, 0.8, 2.5), (10, 10, 4))
    centre = aff @ np.array([4.5, 4.5, 1.5, 1.0])
    assert np.allclose(centre[:3], 0.0)
    assert spacing_from_affine(aff) == pytest.approx((0.8, 0.8, 2.5))
