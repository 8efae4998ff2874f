"""Intensity conventions of the modalities the engine writes: one home for each range.

The engine's names are modality-neutral (``PipelineConfig.intensity_range``, ``PipelineOutput.image``,
the catalog's ``organ_median``); a :class:`IntensityConvention` says what the numbers mean for each
modality. CT keeps its own names where only CT is meant (``CT_HU_RANGE``, the HU quality checks).

CT is stored as 12-bit Hounsfield units in int16 (DICOM's usual CT range): the writer clips to it, the QC
flags values outside it, the phantom intensity model clips to it. MR has no physical unit; MAISI maps its
MR output to [0, 1000] with background 0 and does not clip above.

Modality codes follow MAISI's ``configs/modality_mapping.json``: 0-7 are CT (0 unknown, 1 CT, 2 CT without
and 3 with contrast), 8 and above MR.
"""

from __future__ import annotations

from dataclasses import dataclass

CT_HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)  # stored CT values, HU (int16, 12-bit)
AIR_HU = -1000.0  # background and air, HU
MAX_CT_CODE = 7


@dataclass(frozen=True)
class IntensityConvention:
    """What the numbers of one modality's images mean, and how they are mapped and stored.

    Attributes:
        name: DICOM-style modality name (``"CT"``, ``"MR"``).
        unit: the intensity unit (``"HU"`` for CT, ``"a.u."`` for MR).
        output_range: the range the VAE's [0, 1] output maps to, linearly.
        background: the value written where the label map is 0 (outside the body).
        clip_above: whether decoder output above 1 is clipped (CT) or kept (MR).
        stored_range: the int16 range the image writer clips to.
    """

    name: str
    unit: str
    output_range: tuple[float, float]
    background: float
    clip_above: bool
    stored_range: tuple[float, float]


CT = IntensityConvention(name="CT", unit="HU", output_range=(-1000.0, 1000.0), background=AIR_HU,
                         clip_above=True, stored_range=CT_HU_RANGE)
MR = IntensityConvention(name="MR", unit="a.u.", output_range=(0.0, 1000.0), background=0.0,
                         clip_above=False, stored_range=(0.0, 32767.0))
CONVENTIONS: dict[str, IntensityConvention] = {c.name: c for c in (CT, MR)}


def is_ct_code(code: int) -> bool:
    """Return whether a modality code is a CT code (0-7) rather than an MR one (8 and above)."""
    return int(code) <= MAX_CT_CODE


def convention_for_code(code: int) -> IntensityConvention:
    """Return the intensity convention of a MAISI modality code (:data:`CT` for 0-7, :data:`MR` above)."""
    return CT if is_ct_code(code) else MR
