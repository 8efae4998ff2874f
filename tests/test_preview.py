"""Preview slices: CT windows, orientation letters in radiological display, tumour centres and markers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from maisi_core.errors import ImageError
from maisi_core.preview import (
    CT_WINDOWS,
    display_position,
    edge_letters,
    preview_center_vox,
    radiological_slices,
    save_preview_png,
    window_bounds_hu,
)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _render(image, label, **kwargs) -> bytes:
    buffer = io.BytesIO()
    save_preview_png(image, label, buffer, dpi=40, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 300.0, size=(12, 10, 8)).astype(np.float32)
    label = np.full(image.shape, 200, np.uint8)
    label[2:4, 6:8, 5:7] = 23  # lung tumour at low x: the patient's left
    label[8:11, 1:4, 1:3] = 26  # hepatic tumour
    return image, label


def test_window_bounds_hu_follow_width_and_level():
    assert window_bounds_hu(*CT_WINDOWS["soft_tissue"]) == (-160.0, 240.0)
    assert window_bounds_hu(*CT_WINDOWS["lung"]) == (-1350.0, 150.0)
    assert window_bounds_hu(*CT_WINDOWS["bone"]) == (-500.0, 1300.0)
    with pytest.raises(ImageError, match=r"window_bounds_hu expects a positive window width, but got width_hu=0"):
        window_bounds_hu(0.0, 40.0)


def test_edge_letters_name_the_patient_direction_the_array_runs_to():
    # RAS+: index growing along x, y, z runs to the patient's Right, Anterior, Superior.
    shape = (12, 10, 8)
    for view, fixed in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        h_axis, v_axis = [a for a in range(3) if a != fixed]
        vol = np.zeros(shape, np.int8)
        centre = [s // 2 for s in shape]
        far_h, far_v = list(centre), list(centre)
        far_h[h_axis], far_v[v_axis] = shape[h_axis] - 1, shape[v_axis] - 1
        vol[tuple(far_h)], vol[tuple(far_v)] = 1, 2
        shown = radiological_slices(vol, centre)[view]
        left, _, _, top = edge_letters(view)
        assert np.argwhere(shown == 1)[0][1] == 0 and left == "RAS"[h_axis]  # far end on the viewer's left
        assert np.argwhere(shown == 2)[0][0] == shown.shape[0] - 1 and top == "RAS"[v_axis]  # row max is the top
    assert edge_letters("axial")[:2] == ("R", "L") and edge_letters("coronal")[:2] == ("R", "L")
    with pytest.raises(ImageError, match=r"edge_letters expects view in \['axial', 'coronal', 'sagittal'\]"):
        edge_letters("oblique")


def test_display_position_is_where_radiological_slices_put_the_voxel(volume):
    image, _ = volume
    for voxel in ((2, 7, 5), (11, 0, 7), (0, 9, 0)):
        marked = np.zeros(image.shape, np.int8)
        marked[voxel] = 1
        for view, shown in radiological_slices(marked, voxel).items():
            col, row = display_position(view, voxel, image.shape)
            assert shown[row, col] == 1, (view, voxel)


def test_preview_center_vox_goes_through_the_requested_tumour(volume):
    _, label = volume
    assert preview_center_vox(label, label.shape, tumor_label=26) == (9, 2, 1)
    assert preview_center_vox(label, label.shape, tumor_label=23) == (2, 6, 5)
    assert preview_center_vox(label, label.shape, tumor_label=24) == (6, 5, 4)  # absent: the middle


def test_save_preview_png_adds_a_row_per_window_and_marks_the_centre(volume):
    image, label = volume
    plain = _render(image, label)
    windowed = _render(image, label, windows=("soft_tissue", "lung", "bone"))
    (w2, h2), (w5, h5) = _png_size(plain), _png_size(windowed)
    assert w5 == w2 and h5 > 2 * h2  # 2 rows (image, labels) against 5 (plain, three windows, labels)
    centre = (2, 6, 5)
    assert _render(image, label, center_vox=centre) != _render(image, label, center_vox=centre, mark_center=True)
    assert _render(image, label, spacing_mm=(1.0, 1.0, 3.0)) != plain  # anisotropic voxels change the aspect


def test_save_preview_png_rejects_bad_windows_and_spacing(volume):
    image, label = volume
    with pytest.raises(ImageError, match=r"save_preview_png expects windows from \['soft_tissue', 'lung', 'bone'\], "
                                         r"but got windows=\['brain'\]"):
        _render(image, label, windows=("brain",))
    with pytest.raises(ImageError, match=r"save_preview_png expects three positive spacings in mm, but got "
                                         r"spacing_mm=\(1.0, 0.0, 1.0\)"):
        _render(image, label, spacing_mm=(1.0, 0.0, 1.0))
