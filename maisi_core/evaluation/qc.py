"""Per-case quality control of a generated CT: organ median HU, HU sanity, geometry, body and tumour labels.

The organ check follows MAISI's ``quality_check.py``: the median HU inside each organ must lie in
``[min(sigma_6_low, percentile_0_5), max(sigma_6_high, percentile_99_5)]`` of the shipped statistics
(``maisi_core/data/image_median_statistics_ct.json``), with bone's upper bound forced to 1000 HU. An organ
absent from the label map passes, as upstream, and is listed in ``QCResult.absent_organs``.

Three further checks live in their own modules and run from :func:`check_case` (each can be switched off):
left/right orientation (:mod:`maisi_core.evaluation.qc_orientation`), visibility and size of requested tumours
(:mod:`maisi_core.evaluation.qc_tumor`) and label-image agreement (:mod:`maisi_core.evaluation.qc_agreement`).

This module only judges one case; re-trying with new seeds belongs to the flows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from maisi_core.errors import ImageError, LabelMapError, QCConfigError, did_you_mean
from maisi_core.anatomy.labels import BODY_ID, BONE_IDS, KIDNEY_IDS, LUNG_IDS, TUMOR_IDS, label_name
from maisi_core.evaluation.qc_agreement import check_label_agreement
from maisi_core.evaluation.qc_orientation import check_image_orientation, check_label_orientation
from maisi_core.evaluation.qc_tumor import check_tumor
from maisi_core.modality import CT_HU_RANGE
from maisi_core.evaluation.qc_types import QCFailure

__all__ = [
    "BONE_UPPER_HU", "HU_SANITY_RANGE", "ORGAN_LABEL_IDS", "QCFailure", "QCResult", "check_case",
    "organ_hu_medians", "reference_hu_ranges",
]

# Organ -> MAISI label IDs whose voxels form the organ mask (upstream lists lung as 28-31 with 31 twice;
# we use all five lobes).
ORGAN_LABEL_IDS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": KIDNEY_IDS,
    "lung": LUNG_IDS,
    "bone": BONE_IDS,
    "brain": (22,),
}
BONE_UPPER_HU = 1000.0
HU_SANITY_RANGE = CT_HU_RANGE  # values a stored CT can hold
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class QCResult:
    """The verdict on one case.

    Attributes:
        passed: True when no check failed.
        failures: the failed checks, in the order they ran.
        organ_hu_median: organ -> median HU, for every checked organ present in the label map.
        absent_organs: checked organs with no voxel in the label map (they pass).
        hu_ranges: organ -> (low, high) HU range that was applied.
        tumor_contrast_hu: tumour name -> median(tumour) - median(host ring), for checked tumours present.
        tumor_diameter_mm: tumour name -> equivalent-sphere diameter of its labelled voxels.
        label_agreement: structure -> fraction of its voxels in its tissue class's HU range
            (:func:`maisi_core.evaluation.qc_agreement.label_agreement_fractions`); empty when that check is off.
    """

    passed: bool
    failures: tuple[QCFailure, ...]
    organ_hu_median: dict[str, float] = field(default_factory=dict)
    absent_organs: tuple[str, ...] = ()
    hu_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    tumor_contrast_hu: dict[str, float] = field(default_factory=dict)
    tumor_diameter_mm: dict[str, float] = field(default_factory=dict)
    label_agreement: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """Return ``"pass"`` or the failure messages joined by ``"; "``."""
        return "pass" if self.passed else "; ".join(f.message for f in self.failures)


@lru_cache(maxsize=1)
def _organ_statistics() -> dict[str, dict[str, float]]:
    text = resources.files("maisi_core").joinpath("data/image_median_statistics_ct.json").read_text()
    return json.loads(text)


def reference_hu_ranges() -> dict[str, tuple[float, float]]:
    """Return organ -> (low, high) median-HU range from MAISI's statistics (bone capped at 1000 HU).

    ``low = min(sigma_6_low, percentile_0_5)``, ``high = max(sigma_6_high, percentile_99_5)``.
    A new dict is returned on each call.
    """
    ranges = {}
    for organ, stats in _organ_statistics().items():
        low = min(stats["sigma_6_low"], stats["percentile_0_5"])
        high = max(stats["sigma_6_high"], stats["percentile_99_5"])
        if organ == "bone":
            high = BONE_UPPER_HU
        ranges[organ] = (float(low), float(high))
    return ranges


def _resolve_ranges(thresholds: Mapping[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
    ranges = reference_hu_ranges()
    for organ, bounds in (thresholds or {}).items():
        if organ not in ORGAN_LABEL_IDS:
            raise QCConfigError(
                f"check_case expects threshold organs from {sorted(ORGAN_LABEL_IDS)}, but got "
                f"organ={organ!r}.{did_you_mean(organ, ORGAN_LABEL_IDS)}"
            )
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            low, high = math.nan, math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise QCConfigError(
                f"check_case expects thresholds as finite (low, high) HU with low < high, but got "
                f"{organ}={bounds!r}."
            )
        ranges[organ] = (low, high)
    return ranges


def _check_tumors(
    expected_tumor_ids: Iterable[int], expected_tumors: Mapping[int, tuple[float, float] | None] | None,
) -> dict[int, tuple[float, float] | None]:
    """Merge the two ways of naming tumours into tumour ID -> requested diameter range (or None)."""
    tumors: dict[int, tuple[float, float] | None] = {int(t): None for t in expected_tumor_ids}
    unknown = [t for t in tumors if t not in TUMOR_IDS]
    if unknown:
        raise QCConfigError(
            f"check_case expects tumour label IDs from {list(TUMOR_IDS)}, but got expected_tumor_ids={unknown}."
        )
    for tumor, bounds in (expected_tumors or {}).items():
        if int(tumor) not in TUMOR_IDS:
            raise QCConfigError(
                f"check_case expects tumour label IDs from {list(TUMOR_IDS)}, but got expected_tumors key={tumor!r}."
            )
        if bounds is not None:
            try:
                low, high = (float(b) for b in bounds)
            except (TypeError, ValueError):
                low, high = math.nan, math.nan
            if not (math.isfinite(low) and 0 < low <= high):
                raise QCConfigError(
                    f"check_case expects tumour diameter ranges (low, high) in mm with 0 < low <= high, but got "
                    f"expected_tumors[{tumor}]={bounds!r}."
                )
            bounds = (low, high)
        tumors[int(tumor)] = bounds
    return tumors


def organ_hu_medians(image_hu: np.ndarray, label_map: np.ndarray) -> dict[str, float]:
    """Return organ -> median HU over the organ's voxels, for the organs of ``ORGAN_LABEL_IDS`` present.

    Non-finite voxels are ignored. Both arrays are ``(X, Y, Z)`` of the same shape.
    """
    img = np.asarray(image_hu).ravel()
    lab = np.asarray(label_map).ravel().astype(np.int64, copy=False)
    max_id = max(int(lab.max(initial=0)), max(max(v) for v in ORGAN_LABEL_IDS.values()))
    lut = np.full(max_id + 1, -1, dtype=np.int8)
    names = list(ORGAN_LABEL_IDS)
    for k, organ in enumerate(names):
        lut[list(ORGAN_LABEL_IDS[organ])] = k
    organ_of_voxel = lut[np.clip(lab, 0, max_id)]
    medians = {}
    for k, organ in enumerate(names):
        values = img[organ_of_voxel == k]
        values = values[np.isfinite(values)]
        if values.size:
            medians[organ] = float(np.median(values))
    return medians


def _check_inputs(image_hu, label_map) -> tuple[np.ndarray, np.ndarray]:
    img, lab = np.asarray(image_hu), np.asarray(label_map)
    if img.ndim != 3 or not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise ImageError(
            f"check_case expects a real-valued 3D image (X, Y, Z) in HU, but got shape={img.shape}, "
            f"dtype={img.dtype}."
        )
    if lab.ndim != 3 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise LabelMapError(
            f"check_case expects an integer 3D label map (X, Y, Z), but got shape={lab.shape}, dtype={lab.dtype}. "
            "Load label maps with maisi_core.io.load_label."
        )
    return img, lab


def _sanity_failures(img, lab, affine, label_affine, require_body) -> list[QCFailure]:
    out = []
    finite = np.isfinite(img)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad:
        out.append(QCFailure("hu_finite", None, float(n_bad), None, f"image: {n_bad} NaN/inf voxels"))
    if finite.any():
        lo, hi = float(img[finite].min()), float(img[finite].max())
        if lo < HU_SANITY_RANGE[0] or hi > HU_SANITY_RANGE[1]:
            value = lo if lo < HU_SANITY_RANGE[0] else hi
            out.append(QCFailure("hu_range", None, value, HU_SANITY_RANGE,
                                 f"image: HU range [{lo:.1f}, {hi:.1f}] exceeds "
                                 f"[{HU_SANITY_RANGE[0]:.0f}, {HU_SANITY_RANGE[1]:.0f}]"))
    if img.shape != lab.shape:
        out.append(QCFailure("shape", None, None, None, f"shape: image {img.shape} != label {lab.shape}"))
    if affine is not None and label_affine is not None:
        diff = float(np.max(np.abs(np.asarray(affine, float) - np.asarray(label_affine, float))))
        if not diff <= AFFINE_ATOL_MM:
            out.append(QCFailure("affine", None, diff, (0.0, AFFINE_ATOL_MM),
                                 f"affine: image and label affines differ by up to {diff:.4g} mm"))
    if require_body and not np.any(lab == BODY_ID):
        out.append(QCFailure("body_label", None, None, None, f"label: body label {BODY_ID} is absent"))
    return out


def check_written_geometry(
    image: tuple[Sequence[int], np.ndarray],
    label: tuple[Sequence[int], np.ndarray],
    *,
    shape: Sequence[int],
    affine: np.ndarray,
    spacing_mm: Sequence[float],
) -> list[QCFailure]:
    """Compare the geometry of the files a case wrote with the geometry it meant to write.

    ``image`` and ``label`` are ``(shape, affine)`` as read back from the written headers
    (:func:`maisi_core.io.check_nifti_header`). Checked: both have ``shape``; their affines agree with
    each other and with ``affine`` (the mask's world placement) within :data:`AFFINE_ATOL_MM`; their voxel
    sizes are ``spacing_mm``. The in-memory checks of :func:`check_case` cannot see a writer that drops,
    flips or rounds the affine; this one reads what landed.

    Returns:
        The failures (``written_shape``, ``written_affine``, ``written_spacing``); empty when all agree.
    """
    out: list[QCFailure] = []
    want = np.asarray(affine, float)
    for name, (got_shape, got_affine) in (("image", image), ("label", label)):
        if tuple(int(n) for n in got_shape) != tuple(int(n) for n in shape):
            out.append(QCFailure("written_shape", None, None, None,
                                 f"written {name}: shape {tuple(got_shape)} != {tuple(shape)}"))
        diff = float(np.max(np.abs(np.asarray(got_affine, float) - want)))
        if not diff <= AFFINE_ATOL_MM:
            out.append(QCFailure("written_affine", None, diff, (0.0, AFFINE_ATOL_MM),
                                 f"written {name}: affine differs from the mask's by up to {diff:.4g} mm"))
        sizes = np.linalg.norm(np.asarray(got_affine, float)[:3, :3], axis=0)
        off = float(np.max(np.abs(sizes - np.asarray(spacing_mm, float))))
        if not off <= AFFINE_ATOL_MM:
            out.append(QCFailure("written_spacing", None, off, (0.0, AFFINE_ATOL_MM),
                                 f"written {name}: voxel size {[round(float(v), 4) for v in sizes]} mm != "
                                 f"spacing_mm {list(spacing_mm)}"))
    return out


def check_case(
    image_hu: np.ndarray,
    label_map: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    label_affine: np.ndarray | None = None,
    thresholds: Mapping[str, tuple[float, float]] | None = None,
    require_body: bool = True,
    expected_tumor_ids: Iterable[int] = (),
    expected_tumors: Mapping[int, tuple[float, float] | None] | None = None,
    orientation_check: bool = True,
    tumor_check: bool = True,
    agreement_check: bool = True,
    image_checks: bool = True,
) -> QCResult:
    """Check one generated case and return the verdict (never raises for a bad case, only for bad arguments).

    Args:
        image_hu: HU ``(X, Y, Z)``.
        label_map: MAISI label IDs ``(X, Y, Z)``.
        affine: image affine ``(4, 4)``; compared with ``label_affine`` when both are given, and used
            (else ``label_affine``, else the identity) for world positions and voxel sizes.
        label_affine: label-map affine ``(4, 4)``.
        thresholds: organ -> (low, high) HU overriding :func:`reference_hu_ranges` for that organ.
        require_body: fail when the body label 200 is absent.
        expected_tumor_ids: tumour labels (e.g. 23 lung tumour) that must be present in the label map.
        expected_tumors: tumour label -> requested (low, high) diameter in mm, or None for no size check;
            these must be present too.
        orientation_check: judge left/right (:mod:`maisi_core.evaluation.qc_orientation`).
        tumor_check: judge the expected tumours' contrast and size (:mod:`maisi_core.evaluation.qc_tumor`); when
            False only their presence is checked.
        agreement_check: judge label-image agreement (:mod:`maisi_core.evaluation.qc_agreement`).
        image_checks: False for images that are not CT-like (random weights, stub generators): skips the
            checks that read the image against the anatomy (image orientation, tumour contrast,
            agreement), keeping those of the label map alone (label orientation, tumour presence and size).

    Raises:
        ImageError: the image is not a real-valued 3D array.
        LabelMapError: the label map is not an integer 3D array.
        QCConfigError: unknown organ or invalid range in ``thresholds``; unknown tumour ID or bad diameter range.
    """
    ranges = _resolve_ranges(thresholds)
    tumors = _check_tumors(expected_tumor_ids, expected_tumors)
    img, lab = _check_inputs(image_hu, label_map)
    failures = _sanity_failures(img, lab, affine, label_affine, require_body)
    world = affine if affine is not None else label_affine
    same_grid = img.shape == lab.shape
    medians: dict[str, float] = {}
    if same_grid:
        medians = organ_hu_medians(img, lab)
        for organ, value in medians.items():
            low, high = ranges[organ]
            if not low <= value <= high:
                failures.append(QCFailure("organ_hu", organ, value, (low, high),
                                          f"{organ}: median {value:.1f} HU outside [{low:.1f}, {high:.1f}]"))
    contrast, diameter = {}, {}
    for tumor, bounds in tumors.items():
        read_image = tumor_check and image_checks and same_grid
        found, m = check_tumor(img if read_image else None, lab, tumor, affine=world,
                               diameter_range_mm=bounds if tumor_check else None)
        failures += found
        if m is not None and tumor_check:
            diameter[label_name(tumor)] = m.diameter_mm
            if math.isfinite(m.contrast_hu):
                contrast[label_name(tumor)] = m.contrast_hu
    if orientation_check:
        failures += check_label_orientation(lab, world)
        if image_checks and same_grid:
            failures += check_image_orientation(img, lab, world)
    agreement: dict[str, float] = {}
    if agreement_check and image_checks and same_grid:
        found, agreement = check_label_agreement(img, lab)
        failures += found
    absent = tuple(o for o in ORGAN_LABEL_IDS if o not in medians)
    return QCResult(passed=not failures, failures=tuple(failures), organ_hu_median=medians,
                    absent_organs=absent, hu_ranges=ranges, tumor_contrast_hu=contrast,
                    tumor_diameter_mm=diameter, label_agreement=agreement)
