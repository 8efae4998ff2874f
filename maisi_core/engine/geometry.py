"""Output size, spacing and field-of-view rules; affines; latent shapes.

The rules belong to the preset (:class:`maisi_core.engine.config.GeometryRules`): the official presets enforce
the released MAISI CT limits (x == y in {256, 384, 512}, z in {128, ..., 768}, xy spacing 0.5-3.0 mm,
z spacing 0.5-5.0 mm, field of view >= 256 mm); ``tiny()`` accepts small volumes such as 32³.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maisi_core.engine.config import GeometryRules, PipelineConfig
from maisi_core.errors import AffineError, GeometryError


def _triple(values: Sequence[float], name: str, who: str) -> tuple[float, float, float]:
    vals = tuple(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    if vals is None or len(vals) != 3:
        raise GeometryError(f"{who} expects {name} as three numbers (x, y, z), but got {name}={values!r}.")
    return vals  # type: ignore[return-value]


def check_geometry(
    rules: GeometryRules,
    output_size_vox: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    who: str = "check_geometry",
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Validate an output size and spacing against a preset's rules; return them normalised.

    Raises:
        GeometryError: naming the broken rule and the allowed values.
    """
    size = _triple(output_size_vox, "output_size_vox", who)
    spacing = _triple(spacing_mm, "spacing_mm", who)
    if any(int(s) != s or int(s) <= 0 for s in size):
        raise GeometryError(f"{who} expects positive integer sizes, but got output_size_vox={list(size)}.")
    size_i = tuple(int(s) for s in size)
    spacing_f = tuple(float(s) for s in spacing)
    if any(not np.isfinite(s) or s <= 0 for s in spacing_f):
        raise GeometryError(f"{who} expects positive spacings in mm, but got spacing_mm={list(spacing)}.")
    x, y, z = size_i
    if rules.require_square_xy and x != y:
        raise GeometryError(
            f"{who} expects output_size x == y, but got output_size_vox={list(size_i)}. "
            f"Use x = y in {list(rules.allowed_xy_sizes) or 'any'}."
        )
    if rules.allowed_xy_sizes and (x not in rules.allowed_xy_sizes or y not in rules.allowed_xy_sizes):
        raise GeometryError(
            f"{who} expects output_size x and y in {list(rules.allowed_xy_sizes)}, but got "
            f"output_size_vox={list(size_i)}."
        )
    if rules.allowed_z_sizes and z not in rules.allowed_z_sizes:
        raise GeometryError(
            f"{who} expects output_size z in {list(rules.allowed_z_sizes)}, but got output_size_vox={list(size_i)}."
        )
    m = rules.size_multiple_vox
    if m > 1 and any(s % m for s in size_i):
        raise GeometryError(
            f"{who} expects each output size divisible by {m} (VAE and UNet downsampling), but got "
            f"output_size_vox={list(size_i)}. Next valid: {[-(-s // m) * m for s in size_i]}."
        )
    sx, sy, sz = spacing_f
    if rules.require_equal_xy_spacing and not np.isclose(sx, sy):
        raise GeometryError(f"{who} expects spacing x == y, but got spacing_mm={list(spacing_f)}.")
    lo, hi = rules.spacing_xy_range_mm
    if not (lo <= sx <= hi and lo <= sy <= hi):
        raise GeometryError(
            f"{who} expects x and y spacing in [{lo}, {hi}] mm, but got spacing_mm={list(spacing_f)}."
        )
    lo, hi = rules.spacing_z_range_mm
    if not lo <= sz <= hi:
        raise GeometryError(f"{who} expects z spacing in [{lo}, {hi}] mm, but got spacing_mm={list(spacing_f)}.")
    fov = x * sx
    if fov < rules.min_fov_xy_mm:
        raise GeometryError(
            f"{who} expects a field of view output_size_x * spacing_x >= {rules.min_fov_xy_mm:g} mm, but got "
            f"fov_mm={fov:g} (output_size_vox={list(size_i)}, spacing_mm={list(spacing_f)}). "
            "Raise the spacing or the size; smaller fields of view give unusable images."
        )
    return size_i, spacing_f  # type: ignore[return-value]


def latent_shape(config: PipelineConfig, output_size_vox: Sequence[int]) -> tuple[int, int, int, int]:
    """Return the latent shape (C, X/f, Y/f, Z/f) of an image of ``output_size_vox``."""
    f = config.vae.downsample_factor
    return (config.vae.latent_channels, *(int(s) // f for s in output_size_vox))  # type: ignore[return-value]


def affine_from_spacing(
    spacing_mm: Sequence[float],
    output_size_vox: Sequence[int] | None = None,
    *,
    origin_mm: Sequence[float] | None = None,
) -> np.ndarray:
    """Return a diagonal RAS affine (4, 4) for a spacing (the one place affines are built from spacing).

    With ``origin_mm`` the first voxel sits there; otherwise, with ``output_size_vox``, the volume is
    centred on the world origin; with neither, the origin is 0.

    Raises:
        AffineError: spacings not three positive finite numbers, or an origin not three finite numbers.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise AffineError(
            f"affine_from_spacing expects three positive finite spacings in mm, but got spacing_mm={spacing_mm!r}."
        )
    affine = np.diag([*spacing, 1.0])
    if origin_mm is not None:
        origin = np.asarray(origin_mm, dtype=np.float64)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise AffineError(
                f"affine_from_spacing expects three finite origin coordinates in mm, but got origin_mm={origin_mm!r}."
            )
        affine[:3, 3] = origin
    elif output_size_vox is not None:
        affine[:3, 3] = -(np.asarray(output_size_vox, dtype=np.float64) - 1.0) / 2.0 * spacing
    return affine


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Return the voxel spacing (mm) as the column norms of an affine's 3×3 part."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"spacing_from_affine expects a 4x4 affine, but got shape={a.shape}.")
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]
