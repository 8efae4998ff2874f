"""Preview images of a CT volume: axial, coronal and sagittal slices in radiological display, as PNG.

Volumes are in RAS axis order (as every volume the factory writes). Matplotlib is imported only when a PNG
is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.errors import ImageError, LabelMapError

__all__ = ["preview_center_vox", "radiological_slices", "save_preview_png"]


def preview_center_vox(label_map: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Return the voxel the preview slices go through: a tumour's centre when the map has one, else the middle.

    The tumour voxel nearest the centroid of all tumour voxels is used, so the three slices cut the lesion.
    """
    if label_map is not None:
        tumor = np.isin(np.asarray(label_map), labels.TUMOR_IDS)
        if tumor.any():
            idx = np.argwhere(tumor)
            nearest = idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]
            return tuple(int(v) for v in nearest)  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


# Radiological display: axial seen from the feet, anterior up and the patient's right on the viewer's left;
# coronal seen from the front, head up, right on the left; sagittal head up, anterior on the left.
# Each view: (title, axis held fixed, horizontal array axis, vertical array axis, edge letters (left, right,
# bottom, top)) for arrays in RAS axis order; the horizontal axis is always shown decreasing (R, then A, first).
_VIEWS = (
    ("axial", 2, 0, 1, ("R", "L", "P", "A")),
    ("coronal", 1, 0, 2, ("R", "L", "I", "S")),
    ("sagittal", 0, 1, 2, ("A", "P", "I", "S")),
)


def radiological_slices(volume: np.ndarray, center_vox: Sequence[int]) -> dict[str, np.ndarray]:
    """Return the axial, coronal and sagittal slices through a voxel as displayed by a radiologist.

    Args:
        volume: ``(X, Y, Z)`` in RAS axis order.
        center_vox: the voxel ``(i, j, k)`` the slices go through.

    Returns:
        view name -> 2D array whose row 0 is the bottom of the displayed image (``imshow(origin="lower")``)
        and column 0 its left edge: the patient's right (axial, coronal) or anterior (sagittal).
    """
    out = {}
    for title, fixed, h_axis, v_axis, _ in _VIEWS:
        sl = np.take(np.asarray(volume), int(center_vox[fixed]), axis=fixed)  # (h, v): the two other axes
        out[title] = (sl.T if h_axis < v_axis else sl)[:, ::-1]
    return out


def _edge_letters(ax, letters: Sequence[str]) -> None:
    """Write the orientation letters (left, right, bottom, top) on the edges of a view."""
    for (x, y, ha, va), letter in zip(((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                      (0.5, 0.02, "center", "bottom"), (0.5, 0.98, "center", "top")),
                                     letters, strict=True):
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=9, weight="bold")


def save_preview_png(
    image_hu: np.ndarray,
    label_map: np.ndarray | None,
    path_or_buffer: str | os.PathLike | BinaryIO,
    *,
    center_vox: Sequence[int] | None = None,
    window_hu: tuple[float, float] = (-1000.0, 1000.0),
    alpha: float = 0.35,
    dpi: int = 80,
) -> None:
    """Save axial, coronal and sagittal slices as PNG in radiological display, then again under the labels.

    The arrays are in RAS axis order (as every volume the factory writes: +x the patient's right). The
    slices are shown as a radiologist reads them, with orientation letters on their edges: the patient's
    right on the viewer's left in axial and coronal views, anterior on the left in the sagittal view.

    Args:
        image_hu: HU ``(X, Y, Z)``.
        label_map: IDs ``(X, Y, Z)`` or None; background 0 and body 200 are not coloured.
        path_or_buffer: file path or writable binary buffer.
        center_vox: the voxel ``(i, j, k)`` the three slices go through; default
            :func:`preview_center_vox` (a tumour's centre when the label map has one, else the middle).
        window_hu: grey-level window (low, high).
        alpha: overlay opacity.
        dpi: output resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.asarray(image_hu)
    if img.ndim != 3:
        raise ImageError(f"save_preview_png expects a 3D image (X, Y, Z), but got shape={img.shape}.")
    lab = None if label_map is None else np.asarray(label_map)
    if lab is not None and lab.shape != img.shape:
        raise LabelMapError(
            f"save_preview_png expects a label map of the image shape {img.shape}, but got shape={lab.shape}."
        )
    center = tuple(int(c) for c in center_vox) if center_vox is not None else preview_center_vox(lab, img.shape)
    if len(center) != 3 or not all(0 <= c < n for c, n in zip(center, img.shape, strict=True)):
        raise ImageError(
            f"save_preview_png expects center_vox inside the volume {img.shape}, but got center_vox={center_vox!r}."
        )
    rows = 1 if lab is None else 2  # with a label map: the image alone, then the image under the labels
    fig = Figure(figsize=(9, 3.2 * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    images = radiological_slices(img, center)
    overlays = radiological_slices(lab, center) if lab is not None else {}
    for row in range(rows):
        for k, (title, fixed, _, _, letters) in enumerate(_VIEWS):
            ax = fig.add_subplot(rows, 3, 3 * row + k + 1)
            ax.imshow(images[title], cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower")
            if row == 1:
                sl = overlays[title]
                overlay = np.ma.masked_where((sl == 0) | (sl == labels.BODY_ID), sl % 20)
                ax.imshow(overlay, cmap="tab20", vmin=0, vmax=19, alpha=alpha, origin="lower",
                          interpolation="nearest")
            _edge_letters(ax, letters)
            ax.set_title(f"{title} ({'ijk'[fixed]}={center[fixed]}){', labels' if row == 1 else ''}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png")
