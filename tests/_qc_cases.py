"""Cases for the QC tests: phantom label maps painted into CT by the intensity model, and reorientation helpers.

``phantom_case`` is cached, so the orientation, tumour and agreement tests share the volumes they draw.
``pv_case`` is a phantom CT drawn at half the spacing and block-averaged onto the coarse grid: the partial
volume a real scanner's coarse reconstruction has (thin ribs and cord mixed with their neighbours).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, TumorSpec, generate_phantom


@lru_cache(maxsize=32)
def phantom_case(regions, size=(64, 64, 64), spacing=(6.0, 6.0, 6.0), seed=0, tumor=None):
    """Return ``(image_hu, label_map, affine, placed_tumours)``; ``tumor`` is ``(label, (low, high))`` or None."""
    spec = TumorSpec(tumor[0], tumor[1]) if tumor else None
    case = generate_phantom(PhantomConfig(regions=regions, output_size_vox=size, spacing_mm=spacing, tumor=spec),
                            seed=seed)
    image = synthesize_ct(case.label_map, spacing, seed=seed)
    image.setflags(write=False)
    case.label_map.setflags(write=False)
    return image, case.label_map, case.affine, tuple(case.tumors)


@lru_cache(maxsize=4)
def pv_case(regions, size=(64, 64, 64), spacing=(6.0, 6.0, 6.0), seed=0):
    """Like :func:`phantom_case` (no tumour), with the image drawn at half the spacing and block-averaged."""
    fine_size = tuple(2 * n for n in size)
    fine = generate_phantom(PhantomConfig(regions=regions, output_size_vox=fine_size,
                                          spacing_mm=tuple(s / 2 for s in spacing)), seed=seed)
    fine_hu = synthesize_ct(fine.label_map, tuple(s / 2 for s in spacing), seed=seed)
    image = fine_hu.reshape(size[0], 2, size[1], 2, size[2], 2).mean(axis=(1, 3, 5)).astype(np.float32)
    coarse = generate_phantom(PhantomConfig(regions=regions, output_size_vox=size, spacing_mm=spacing), seed=seed)
    return image, coarse.label_map, coarse.affine


def to_lps(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the same volume stored LPS (first two array axes reversed) with the affine that keeps every
    voxel at its world position."""
    out = volume[::-1, ::-1, :].copy()
    a = np.array(affine, dtype=np.float64)
    for axis in (0, 1):
        a[:3, 3] += a[:3, axis] * (volume.shape[axis] - 1)
        a[:3, axis] *= -1.0
    return out, a


def world_x(label_map: np.ndarray, affine: np.ndarray, ids) -> float:
    """World x (mm, RAS+) of the centroid of the voxels carrying any of ``ids``."""
    idx = np.argwhere(np.isin(label_map, list(ids))).mean(axis=0)
    return float(affine[0, :3] @ idx + affine[0, 3])
