"""A CT intensity model: turn a MAISI label map into a plausible HU volume.

Each tissue gets a mean HU around a reference median (measured on real CT, see the project's
DATA.md, and inside MAISI's QC ranges), jittered per case. Inside each tissue a correlated texture
(low-pass filtered noise) is added; the body envelope (200) is a smooth mixture of fat and muscle
with a subcutaneous fat layer; bones have a dense cortex around cancellous bone. The volume is then
blurred (partial volume, sigma in mm) and gets white CT noise. Every random draw comes from the
seed, so the same label map and seed give the same voxels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from maisi_core.anatomy import labels
from maisi_core.errors import ConfigError, LabelMapError
from maisi_core.modality import AIR_HU, CT_HU_RANGE

logger = logging.getLogger(__name__)

HU_CLIP = CT_HU_RANGE

# (median HU, per-case jitter of the mean (sd), texture amplitude (sd)) per tissue.
_SOFT = (40.0, 8.0, 10.0)
_VESSEL = (40.0, 6.0, 8.0)
_MUSCLE = (45.0, 6.0, 10.0)
_TISSUES: dict[tuple[int, ...], tuple[float, float, float]] = {
    labels.LUNG_IDS: (-830.0, 25.0, 45.0),
    (57, 132): (-950.0, 15.0, 20.0),  # trachea, airway
    (1,): (60.0, 8.0, 10.0),  # liver
    (3,): (50.0, 8.0, 10.0),  # spleen
    (4,): (40.0, 8.0, 12.0),  # pancreas
    labels.KIDNEY_IDS: (30.0, 8.0, 12.0),
    (6, 7, 17, 58, 59, 60, 61, 108, 109, 110, 111, 112, 113, 115, 119, 123, 124, 125): _VESSEL,
    (25,): (55.0, 6.0, 8.0),  # hepatic vessel
    (8, 9, 13, 118): (32.0, 6.0, 10.0),  # adrenals, duodenum, prostate
    (10, 15, 116, 117): (10.0, 5.0, 6.0),  # gallbladder, bladder, kidney cysts
    (11,): (35.0, 6.0, 10.0),  # esophagus
    (12, 19): (25.0, 8.0, 20.0),  # stomach, small bowel
    (62,): (-20.0, 10.0, 60.0),  # colon: stool and gas
    (22,): (35.0, 4.0, 6.0),  # brain
    (121,): (30.0, 5.0, 6.0),  # spinal cord
    (126,): (90.0, 10.0, 10.0),  # thyroid
    (114,): (120.0, 20.0, 20.0),  # costal cartilage
    tuple(range(98, 108)): _MUSCLE,
    (23,): (25.0, 10.0, 15.0),  # lung tumour
    # pancreatic adenocarcinoma: hypoattenuating, 40.5 +- 23 HU below the pancreas in portal-venous CT
    # (Kim 2008, PMID 17961951); the QC's tumour check asks for at least 15 HU
    (24,): (0.0, 6.0, 12.0),  # pancreatic tumour
    (26,): (25.0, 6.0, 12.0),  # hepatic tumour (metastasis, hypodense to liver: ~35 HU below it)
    (27,): (40.0, 8.0, 12.0),  # colon cancer primaries
    (128,): (150.0, 30.0, 40.0),  # bone lesion
}
BONE_LABELS: tuple[int, ...] = tuple(sorted(set(labels.BONE_IDS)))


@dataclass(frozen=True)
class IntensityParams:
    """Knobs of :func:`synthesize_ct`; ranges are drawn per case.

    Attributes:
        noise_sigma_hu: range of the white CT noise sd.
        blur_sigma_mm: range of the partial-volume Gaussian sd.
        texture_sigma_mm: correlation length of the tissue texture.
        mean_jitter_scale: factor on each tissue's per-case mean jitter (0 turns it off).
        fat_hu: mean HU of fat; muscle_hu: of muscle (the body envelope mixes the two).
        subcutaneous_fat_mm: range of the subcutaneous fat thickness.
        cortex_hu, cancellous_hu: mean HU of cortical and cancellous bone.
        cortex_mm: cortical thickness (at least one voxel).
    """

    noise_sigma_hu: tuple[float, float] = (10.0, 20.0)
    blur_sigma_mm: tuple[float, float] = (0.6, 1.2)
    texture_sigma_mm: float = 3.0
    mean_jitter_scale: float = 1.0
    fat_hu: float = -95.0
    muscle_hu: float = 40.0
    subcutaneous_fat_mm: tuple[float, float] = (6.0, 20.0)
    cortex_hu: float = 700.0
    cancellous_hu: float = 250.0
    cortex_mm: float = 2.0

    def __post_init__(self) -> None:
        for name in ("noise_sigma_hu", "blur_sigma_mm", "subcutaneous_fat_mm"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ConfigError(
                    f"IntensityParams expects a range (low, high) with 0 <= low <= high, "
                    f"but got {name}={getattr(self, name)!r}."
                )
        if self.texture_sigma_mm <= 0 or self.cortex_mm <= 0 or self.mean_jitter_scale < 0:
            raise ConfigError(
                "IntensityParams expects texture_sigma_mm > 0, cortex_mm > 0 and mean_jitter_scale >= 0, "
                f"but got texture_sigma_mm={self.texture_sigma_mm}, cortex_mm={self.cortex_mm}, "
                f"mean_jitter_scale={self.mean_jitter_scale}."
            )


@lru_cache(maxsize=1)
def _tissue_table() -> dict[int, tuple[float, float, float]]:
    table = {i: _SOFT for i in labels.known_ids() if i not in (labels.BACKGROUND_ID, labels.BODY_ID)}
    for ids, values in _TISSUES.items():
        for i in ids:
            table[i] = values
    return table


def tissue_hu_medians(params: IntensityParams | None = None) -> dict[int, float]:
    """Return the expected median HU per label ID that :func:`synthesize_ct` draws around.

    Background (0) is air. Bones report the midpoint of cortex and cancellous HU: their median
    depends on how much of the bone is cortex (thin bones read near the cortex, thick ones near
    the cancellous value). The body envelope (200) is a fat/muscle mixture and has no entry.
    """
    params = params or IntensityParams()
    out = {labels.BACKGROUND_ID: AIR_HU}
    out.update({i: v[0] for i, v in sorted(_tissue_table().items())})
    for i in BONE_LABELS:
        out[i] = 0.5 * (params.cortex_hu + params.cancellous_hu)
    return out


def synthesize_ct(
    label_map: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    seed: int,
    params: IntensityParams | None = None,
) -> np.ndarray:
    """Return a CT volume in HU for a label map.

    Args:
        label_map: MAISI IDs ``(X, Y, Z)``; 0 is air outside the body, 200 the body envelope.
        spacing_mm: voxel size ``(x, y, z)`` in mm.
        seed: seed of the case's random draws.
        params: intensity knobs; defaults to :class:`IntensityParams`.

    Returns:
        float32 HU ``(X, Y, Z)`` clipped to [-1024, 3071].

    Raises:
        LabelMapError: the map is not 3D or holds IDs outside 0-255.
    """
    params = params or IntensityParams()
    lab = np.asarray(label_map)
    if lab.ndim != 3 or lab.size == 0:
        raise LabelMapError(f"synthesize_ct expects a 3D label map (X, Y, Z), but got shape={lab.shape}.")
    if lab.min() < 0 or lab.max() > labels.MAX_LABEL_ID:
        raise LabelMapError(
            f"synthesize_ct expects label IDs in 0..{labels.MAX_LABEL_ID}, but got "
            f"range=({int(lab.min())}, {int(lab.max())}). Remap the labels to MAISI IDs first."
        )
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ConfigError(f"synthesize_ct expects three positive spacings in mm, but got spacing_mm={spacing_mm!r}.")
    lab = lab.astype(np.uint8)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1A7E])

    mean_lut, tex_lut = _draw_luts(rng, params)
    texture = _smooth_noise(rng, lab.shape, params.texture_sigma_mm / spacing)
    hu = mean_lut[lab] + tex_lut[lab] * texture
    del texture

    body = lab == labels.BODY_ID
    if body.any():
        hu[body] = _body_mixture(rng, lab, spacing, params)[body]
    bone = np.isin(lab, BONE_LABELS)
    if bone.any():
        hu = _paint_bone(rng, hu, bone, spacing, params)

    blur = rng.uniform(*params.blur_sigma_mm) / spacing
    hu = ndimage.gaussian_filter(hu, sigma=blur, mode="nearest", truncate=3.0)
    hu += rng.standard_normal(lab.shape, dtype=np.float32) * np.float32(rng.uniform(*params.noise_sigma_hu))
    np.clip(hu, *HU_CLIP, out=hu)
    return hu.astype(np.float32, copy=False)


def _draw_luts(rng: np.random.Generator, params: IntensityParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-case mean and texture amplitude per label, as 256-entry lookup tables."""
    mean = np.full(256, 40.0, dtype=np.float32)
    tex = np.full(256, 10.0, dtype=np.float32)
    mean[labels.BACKGROUND_ID], tex[labels.BACKGROUND_ID] = AIR_HU, 5.0
    table = _tissue_table()
    jitter = rng.standard_normal(256)
    for i in range(256):
        if i in table:
            median, sd, texture = table[i]
            mean[i] = median + params.mean_jitter_scale * sd * float(np.clip(jitter[i], -2.5, 2.5))
            tex[i] = texture
    return mean, tex


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: np.ndarray) -> np.ndarray:
    """Unit-variance Gaussian noise low-pass filtered with a Gaussian of ``sigma_vox``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma_vox, truncate=3.0)
    sd = float(field.std())
    return field / np.float32(sd if sd > 0 else 1.0)


def _body_mixture(rng: np.random.Generator, lab: np.ndarray, spacing: np.ndarray,
                  params: IntensityParams) -> np.ndarray:
    """HU of the body envelope: a subcutaneous fat layer plus smooth fat/muscle islands inside."""
    thickness = rng.uniform(*params.subcutaneous_fat_mm)
    inside = ndimage.gaussian_filter((lab != 0).astype(np.float32), sigma=thickness / spacing, truncate=2.5)
    islands = _smooth_noise(rng, lab.shape, np.full(3, 8.0) / spacing)
    visceral = rng.uniform(-0.5, 1.0)
    w_fat = 1.0 / (1.0 + np.exp(-(0.75 - inside) * 25.0)) + 1.0 / (1.0 + np.exp(-(islands - visceral) * 3.0))
    fat = params.fat_hu + params.mean_jitter_scale * 8.0 * float(rng.standard_normal())
    muscle = params.muscle_hu + params.mean_jitter_scale * 6.0 * float(rng.standard_normal())
    w_fat = np.clip(w_fat, 0.0, 1.0)
    return (w_fat * fat + (1.0 - w_fat) * muscle).astype(np.float32)


def _paint_bone(rng: np.random.Generator, hu: np.ndarray, bone: np.ndarray, spacing: np.ndarray,
                params: IntensityParams) -> np.ndarray:
    """Cortex (on the outer ``cortex_mm`` of each bone) and cancellous bone inside."""
    steps = max(1, int(round(params.cortex_mm / float(spacing.min()))))
    core = ndimage.binary_erosion(bone, iterations=steps, border_value=0)
    jit = params.mean_jitter_scale * rng.standard_normal(2)
    hu[bone] = params.cortex_hu + 60.0 * jit[0] + 60.0 * _standard(rng, int(bone.sum()))
    hu[core] = params.cancellous_hu + 30.0 * jit[1] + 40.0 * _standard(rng, int(core.sum()))
    return hu


def _standard(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n, dtype=np.float32)


def organ_medians(ct_hu: np.ndarray, label_map: np.ndarray, ids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Return the median HU inside each named group of label IDs (NaN when the group is absent)."""
    out = {}
    for name, group in ids.items():
        mask = np.isin(label_map, list(group))
        out[name] = float(np.median(ct_hu[mask])) if mask.any() else float("nan")
    return out
