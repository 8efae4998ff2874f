"""Small synthetic CT volumes with MAISI label maps, for the io, qc and metrics tests.

Each phantom is an ellipsoid body (200) holding a liver (1), a spleen (3), two kidneys (5, 14), two lungs
(28, 31) and a spine (33), with HU near the MAISI reference medians plus Gaussian noise. Shape and HU jitter
with the seed, so a set of phantoms varies like a small cohort.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

# label ID -> (centre as a fraction of the shape, radii as a fraction of the shape, mean HU)
ORGANS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    28: ((0.33, 0.50, 0.72), (0.13, 0.20, 0.18), -840.0),   # left lung (upper lobe)
    31: ((0.67, 0.50, 0.72), (0.13, 0.20, 0.18), -850.0),   # right lung (upper lobe)
    1: ((0.64, 0.50, 0.38), (0.15, 0.16, 0.12), 80.0),      # liver
    3: ((0.34, 0.55, 0.40), (0.07, 0.07, 0.07), 100.0),     # spleen
    14: ((0.40, 0.62, 0.25), (0.05, 0.05, 0.08), 150.0),    # left kidney (low x = patient's left, RAS+)
    5: ((0.60, 0.62, 0.25), (0.05, 0.05, 0.08), 150.0),     # right kidney
    33: ((0.50, 0.74, 0.50), (0.05, 0.05, 0.45), 400.0),    # spine (vertebra C1 ID)
}
BODY_HU = -40.0
AIR_HU = -1000.0


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    acc = 0.0
    for g, c, r, s in zip(grid, centre, radii, shape, strict=True):
        acc = acc + ((g + 0.5 - c * s) / (r * s)) ** 2
    return acc <= 1.0


def make_phantom(
    size: int = 32,
    *,
    seed: int = 0,
    noise_hu: float = 20.0,
    hu_shift: Mapping[int, float] | None = None,
    jitter: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image_hu float32 (S, S, S), label_map uint8 (S, S, S))`` for one synthetic case.

    Args:
        size: edge length S in voxels.
        seed: controls shape jitter, per-organ HU jitter and noise.
        noise_hu: standard deviation of the additive noise.
        hu_shift: label ID -> HU added to that organ (to make a QC failure).
        jitter: relative jitter of organ centres and radii.
    """
    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    label = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, AIR_HU, dtype=np.float32)
    body = _ellipsoid(shape, (0.5, 0.5, 0.5), (0.46 + rng.uniform(-0.02, 0.02), 0.40, 0.49))
    label[body] = 200
    image[body] = BODY_HU
    for lid, (centre, radii, hu) in ORGANS.items():
        c = np.asarray(centre) + rng.uniform(-jitter, jitter, 3) * 0.3
        r = np.asarray(radii) * (1.0 + rng.uniform(-jitter, jitter, 3))
        mask = _ellipsoid(shape, c, r) & body
        label[mask] = lid
        image[mask] = hu + rng.normal(0.0, 8.0) + (hu_shift or {}).get(lid, 0.0)
    image = ndimage.gaussian_filter(image, 0.7)
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return np.clip(image, -1024.0, 3071.0).astype(np.float32), label


def make_set(n: int, size: int = 32, *, seed: int = 0, **kwargs) -> list[np.ndarray]:
    """Return ``n`` phantom images ``(S, S, S)`` with seeds ``seed, seed + 1, ...``."""
    return [make_phantom(size, seed=seed + i, **kwargs)[0] for i in range(n)]
