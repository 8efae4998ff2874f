"""Preview images of a CT volume: axial, coronal and sagittal slices in radiological display, as PNG.

Volumes are in RAS axis order (as every volume the factory writes: +x the patient's right). Each view carries
its orientation letters; the image can be shown under several CT windows (:data:`CT_WINDOWS`) and under the
label overlay. Matplotlib is imported only when a PNG is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.errors import ImageError, LabelMapError

__all__ = ["CT_WINDOWS", "FULL_RANGE_HU", "display_position", "edge_letters", "preview_center_vox",
           "radiological_slices", "save_preview_png", "window_bounds_hu"]

# Standard CT display windows as (width, level) in HU, the values radiology references and viewers quote
# (Radiopaedia "Windowing (CT)"; OHIF's soft-tissue and lung presets): soft tissue W400/L40, lung W1500/L-600,
# bone W1800/L400 (viewers' bone presets range over W1500-2500, L300-500).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
}
FULL_RANGE_HU = (-1000.0, 1000.0)  # the plain view: air black, dense bone white


def window_bounds_hu(width_hu: float, level_hu: float) -> tuple[float, float]:
    """Return the (low, high) HU a window of ``width_hu`` centred on ``level_hu`` maps to black and white."""
    if not width_hu > 0:
        raise ImageError(f"window_bounds_hu expects a positive window width, but got width_hu={width_hu}.")
    return level_hu - width_hu / 2.0, level_hu + width_hu / 2.0


def preview_center_vox(label_map: np.ndarray | None, shape: Sequence[int], *,
                       tumor_label: int | None = None) -> tuple[int, int, int]:
    """Return the voxel the preview slices go through: a tumour's centre when the map has one, else the middle.

    The tumour voxel nearest the centroid of all tumour voxels is used, so the three slices cut the lesion.

    Args:
        label_map: IDs ``(X, Y, Z)`` or None.
        shape: the volume's shape (the middle is used without a tumour).
        tumor_label: the tumour ID to look for; default any of :data:`maisi_core.anatomy.labels.TUMOR_IDS`.
    """
    if label_map is not None:
        ids = labels.TUMOR_IDS if tumor_label is None else (int(tumor_label),)
        tumor = np.isin(np.asarray(label_map), ids)
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


def edge_letters(view: str) -> tuple[str, str, str, str]:
    """Return the orientation letters on the (left, right, bottom, top) edges of a view in radiological display."""
    for title, _, _, _, letters in _VIEWS:
        if title == view:
            return letters
    raise ImageError(f"edge_letters expects view in {[v[0] for v in _VIEWS]}, but got view={view!r}.")


def display_position(view: str, voxel: Sequence[int], shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(column, row)`` of a voxel in the 2D array :func:`radiological_slices` gives for ``view``."""
    for title, _, h_axis, v_axis, _ in _VIEWS:
        if title == view:
            return int(shape[h_axis]) - 1 - int(voxel[h_axis]), int(voxel[v_axis])
    raise ImageError(f"display_position expects view in {[v[0] for v in _VIEWS]}, but got view={view!r}.")


def _edge_letters(ax, letters: Sequence[str]) -> None:
    """Write the orientation letters (left, right, bottom, top) on the edges of a view, outlined to read on white."""
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for (x, y, ha, va), letter in zip(((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                      (0.5, 0.02, "center", "bottom"), (0.5, 0.98, "center", "top")),
                                     letters, strict=True):
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=9, weight="bold",
                path_effects=outline)


def _check_preview_inputs(img: np.ndarray, lab: np.ndarray | None, windows: Sequence[str],
                          spacing_mm: Sequence[float] | None) -> None:
    if img.ndim != 3:
        raise ImageError(f"save_preview_png expects a 3D image (X, Y, Z), but got shape={img.shape}.")
    if lab is not None and lab.shape != img.shape:
        raise LabelMapError(
            f"save_preview_png expects a label map of the image shape {img.shape}, but got shape={lab.shape}."
        )
    unknown = [w for w in windows if w not in CT_WINDOWS]
    if unknown:
        raise ImageError(f"save_preview_png expects windows from {list(CT_WINDOWS)}, but got windows={list(windows)}.")
    if spacing_mm is not None and (len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm)):
        raise ImageError(f"save_preview_png expects three positive spacings in mm, but got spacing_mm={spacing_mm!r}.")


def _panels(window_hu: tuple[float, float], windows: Sequence[str], with_labels: bool) -> list[tuple[str, tuple]]:
    """The rows of the figure: (row title, (low, high) HU), the label overlay last (title ``labels``)."""
    rows = [(f"plain {window_hu[0]:.0f}…{window_hu[1]:.0f} HU", window_hu)]
    for name in windows:
        width, level = CT_WINDOWS[name]
        rows.append((f"{name.replace('_', ' ')} W{width:.0f} L{level:.0f}", window_bounds_hu(width, level)))
    if with_labels:
        rows.append(("labels", window_hu))
    return rows


def save_preview_png(
    image_hu: np.ndarray,
    label_map: np.ndarray | None,
    path_or_buffer: str | os.PathLike | BinaryIO,
    *,
    center_vox: Sequence[int] | None = None,
    window_hu: tuple[float, float] = FULL_RANGE_HU,
    windows: Sequence[str] = (),
    spacing_mm: Sequence[float] | None = None,
    mark_center: bool = False,
    alpha: float = 0.35,
    dpi: int = 80,
) -> None:
    """Save axial, coronal and sagittal slices as PNG in radiological display: one row per window, then labels.

    The arrays are in RAS axis order (as every volume the factory writes: +x the patient's right). The
    slices are shown as a radiologist reads them, with orientation letters on their edges: the patient's
    right on the viewer's left in axial and coronal views, anterior on the left in the sagittal view.
    Rows: the image under ``window_hu``, then under each named window, then under the label overlay.

    Args:
        image_hu: HU ``(X, Y, Z)``.
        label_map: IDs ``(X, Y, Z)`` or None; background 0 and body 200 are not coloured.
        path_or_buffer: file path or writable binary buffer.
        center_vox: the voxel ``(i, j, k)`` the three slices go through; default
            :func:`preview_center_vox` (a tumour's centre when the label map has one, else the middle).
        window_hu: grey-level window (low, high) of the plain row and the overlay row.
        windows: names from :data:`CT_WINDOWS`, one more row each.
        spacing_mm: voxel spacing ``(x, y, z)``: pixels are drawn with the right aspect; default square.
        mark_center: circle the centre voxel in each view (e.g. the tumour the slices go through).
        alpha: overlay opacity.
        dpi: output resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.asarray(image_hu)
    lab = None if label_map is None else np.asarray(label_map)
    _check_preview_inputs(img, lab, windows, spacing_mm)
    center = tuple(int(c) for c in center_vox) if center_vox is not None else preview_center_vox(lab, img.shape)
    if len(center) != 3 or not all(0 <= c < n for c, n in zip(center, img.shape, strict=True)):
        raise ImageError(
            f"save_preview_png expects center_vox inside the volume {img.shape}, but got center_vox={center_vox!r}."
        )
    panels = _panels(window_hu, windows, lab is not None)
    spacing = tuple(float(s) for s in spacing_mm) if spacing_mm is not None else (1.0, 1.0, 1.0)
    fig = Figure(figsize=(9, 3.0 * len(panels)), dpi=dpi)
    FigureCanvasAgg(fig)
    images = radiological_slices(img, center)
    overlays = radiological_slices(lab, center) if lab is not None else {}
    for row, (row_title, (low, high)) in enumerate(panels):
        for k, (title, fixed, h_axis, v_axis, letters) in enumerate(_VIEWS):
            ax = fig.add_subplot(len(panels), 3, 3 * row + k + 1)
            ax.imshow(images[title], cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest",
                      aspect=spacing[v_axis] / spacing[h_axis])
            if row_title == "labels":
                sl = overlays[title]
                overlay = np.ma.masked_where((sl == 0) | (sl == labels.BODY_ID), sl % 20)
                ax.imshow(overlay, cmap="tab20", vmin=0, vmax=19, alpha=alpha, origin="lower",
                          interpolation="nearest", aspect=spacing[v_axis] / spacing[h_axis])
            if mark_center:
                col, r = display_position(title, center, img.shape)
                limits = ax.get_xlim(), ax.get_ylim()
                ax.scatter([col], [r], s=260, facecolors="none", edgecolors="#ff3b3b", linewidths=1.2)
                ax.set_xlim(limits[0])
                ax.set_ylim(limits[1])
            _edge_letters(ax, letters)
            ax.set_title(f"{title} ({'ijk'[fixed]}={center[fixed]}), {row_title}", fontsize=8)
            ax.axis("off")
    # fixed margins (room for one line of title per row): tight_layout measures every text and costs more
    # than drawing the figure
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - 0.1 / len(panels), wspace=0.04,
                        hspace=0.12)
    fig.savefig(path_or_buffer, format="png")
