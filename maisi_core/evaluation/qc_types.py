"""The record of one failed QC check, shared by :mod:`maisi_core.evaluation.qc` and the check modules it runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maisi_core.errors import AffineError

__all__ = ["QCFailure", "voxel_sizes_mm"]


@dataclass(frozen=True)
class QCFailure:
    """One failed check.

    Attributes:
        check: ``organ_hu``, ``hu_finite``, ``hu_range``, ``shape``, ``affine``, ``body_label``, ``tumor``,
            ``orientation``, ``tumor_contrast``, ``tumor_size``, ``label_agreement``, or ``written_shape``,
            ``written_affine``, ``written_spacing`` (the files as written, see ``check_written_geometry``).
        organ: the organ, structure or tumour the check is about; None for whole-image checks.
        value: the measured value (median HU, count of bad voxels, contrast, diameter, fraction ...) or None.
        expected: the allowed (low, high) range, or None.
        message: one human-readable line, e.g. ``"liver: median 250.0 HU outside [-21.6, 162.0]"``.
    """

    check: str
    organ: str | None
    value: float | None
    expected: tuple[float, float] | None
    message: str


def voxel_sizes_mm(affine: np.ndarray | None, *, who: str) -> np.ndarray:
    """Return the voxel size along each array axis, the column norms of the affine (1 mm without one).

    Raises:
        AffineError: the affine is not a finite (4, 4) matrix with non-zero columns.
    """
    if affine is None:
        return np.ones(3)
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise AffineError(f"{who} expects a finite (4, 4) affine, but got shape={a.shape}.")
    sizes = np.linalg.norm(a[:3, :3], axis=0)
    if not np.all(sizes > 0):
        raise AffineError(f"{who} expects an affine with non-zero voxel sizes, but got sizes={sizes.tolist()}.")
    return sizes
