"""Tumour QC of one case: a requested tumour must be visible against its host organ and of the requested size.

Contrast
--------
``contrast = median(tumour) - median(ring)``, where the ring is the host organ's tissue within
``ring_mm = max(RING_MM, 1.5 x the largest voxel size)`` of the tumour (the tumour itself excluded; the
ring grows to 2x and 3x that when it holds fewer than ``MIN_RING_VOXELS`` voxels). A tumour passes when
``sign * contrast >= min_contrast_hu`` (sign +1: brighter than the host, -1: darker, 0: either way, on
``|contrast|``) and, where a type gives one, its median lies in ``tumor_hu``.

============== ====== ====== ================ =====================================================================
type (ID)      sign   min Δ  tumour median    where the numbers come from
============== ====== ====== ================ =====================================================================
lung (23)      +1     300    --               Solid nodules and lung cancers are soft tissue, about -100...+200 HU
                                              (Choi et al., J Thorac Dis 2019, soft-tissue ROI range for solitary
                                              nodules), in lung at about -830 HU. The two real chest CTs of the
                                              pyradiomics-bhklab sdist (DATA.md) have lesions at -64 and +8 HU in
                                              lung at -830 / -800 HU: contrast +766 / +808 HU. 300 HU leaves room for
                                              partial volume at 6 mm; pure ground-glass nodules (about -750...-300
                                              HU) would need a lower bound (MSD lung tumours are solid NSCLC).
hepatic (26)   -1     15     --               Most liver metastases are hypovascular and hypoattenuating to the
                                              enhanced parenchyma in the portal-venous phase (Kulinna & Schima,
                                              "Imaging features of hepatic metastases: CT and MR", Medical
                                              Radiology; radiologykey "Hepatic metastases and lymphoma"). 15 HU is
                                              the conspicuity floor also used for the pancreas below.
pancreatic(24) -1     15     --               Prokesch et al., Radiology 2002 (PMID 12202711): 89 % of ductal
                                              adenocarcinomas are hypoattenuating, tumour-pancreas contrast 74.8 ±
                                              35.6 HU (pancreatic phase); the isoattenuating 11 % show 9.3 ± 11.3 HU
                                              and are "not visible". Kim et al. 2008 (PMID 17961951): 60.2 ± 24.6 HU
                                              (pancreatic phase), 40.5 ± 23.0 HU (portal-venous phase).
colon (27)     0      0      -100...+200      The colon label holds gas, stool and fluid, so the host gives no
                                              reference: the contrast is recorded, not judged; the primary must be
                                              soft tissue (the -100...+200 HU range of Choi et al.).
bone (128)     0      100    --               Lytic metastases have soft-tissue density, >= -30 HU (Radiopaedia,
                                              "Lytic bone metastases"); untreated blastic metastases 654 ± 176 HU
                                              (Ulano et al., AJR 2016;207:362) against cancellous bone of about
                                              150-300 HU and cortex of 700+ HU: either sign, 100 HU at least.
============== ====== ====== ================ =====================================================================

Size
----
The labelled tumour's equivalent-sphere diameter ``d_eq = (6 V / pi)^(1/3)`` (spacing-aware) and its
largest extent along a voxel axis are compared with the requested ``[low, high]`` diameter:
``max(d_eq, extent) >= low * (1 - SIZE_REL_TOL) - h`` and ``d_eq <= high * (1 + SIZE_REL_TOL) + h``, with ``h``
the largest voxel size. ``SIZE_REL_TOL`` covers the phantom's +-12 % surface ripple; ``h`` covers
voxelisation (a 10 mm tumour at 6 mm is 1-7 voxels, and one voxel is kept when the sphere misses every
voxel centre). The extent keeps a tumour clipped to a thin host (a rib, a vertebra) from failing the lower
bound: it still spans its diameter along the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from maisi_core.anatomy.labels import TUMOR_HOSTS, label_name
from maisi_core.evaluation.qc_types import QCFailure, voxel_sizes_mm

__all__ = ["RING_MM", "SIZE_REL_TOL", "TUMOR_CONTRAST_RULES", "TumorContrastRule", "TumorMeasurement",
           "check_tumor", "measure_tumor"]

RING_MM = 5.0
MIN_RING_VOXELS = 3
SIZE_REL_TOL = 0.25


@dataclass(frozen=True)
class TumorContrastRule:
    """What makes a tumour of one type visible (see the module docstring for the sources).

    Attributes:
        sign: +1 tumour brighter than the host, -1 darker, 0 either.
        min_contrast_hu: the least ``sign * contrast`` (``|contrast|`` when sign is 0).
        tumor_hu: an optional (low, high) range for the tumour's own median HU.
    """

    sign: int
    min_contrast_hu: float
    tumor_hu: tuple[float, float] | None = None


TUMOR_CONTRAST_RULES: dict[int, TumorContrastRule] = {
    23: TumorContrastRule(+1, 300.0),
    26: TumorContrastRule(-1, 15.0),
    24: TumorContrastRule(-1, 15.0),
    27: TumorContrastRule(0, 0.0, (-100.0, 200.0)),
    128: TumorContrastRule(0, 100.0),
}


@dataclass(frozen=True)
class TumorMeasurement:
    """What :func:`measure_tumor` found.

    Attributes:
        n_voxels: labelled tumour voxels.
        median_hu: median HU of the tumour (NaN without an image).
        ring_median_hu: median HU of the host ring (NaN when the ring is empty).
        ring_voxels: voxels in the ring.
        diameter_mm: equivalent-sphere diameter.
        extent_mm: largest extent along a voxel axis (voxel count times voxel size).
    """

    n_voxels: int
    median_hu: float
    ring_median_hu: float
    ring_voxels: int
    diameter_mm: float
    extent_mm: float

    @property
    def contrast_hu(self) -> float:
        """``median_hu - ring_median_hu`` (NaN when either is unknown)."""
        return self.median_hu - self.ring_median_hu


def measure_tumor(image_hu: np.ndarray | None, label_map: np.ndarray, tumor_id: int,
                  affine: np.ndarray | None = None) -> TumorMeasurement | None:
    """Measure one tumour label: its median, its host ring's median, its size; None when it is absent.

    Args:
        image_hu: HU ``(X, Y, Z)``; None measures the size only (the medians are NaN).
        label_map: MAISI IDs ``(X, Y, Z)``.
        tumor_id: one of ``TUMOR_HOSTS``.
        affine: voxel-to-world ``(4, 4)``; None means 1 mm voxels.
    """
    lab = np.asarray(label_map)
    sizes = voxel_sizes_mm(affine, who="measure_tumor")
    tumor = lab == tumor_id
    n = int(np.count_nonzero(tumor))
    if n == 0:
        return None
    idx = np.argwhere(tumor)
    extent = float(np.max((idx.max(axis=0) - idx.min(axis=0) + 1) * sizes))
    diameter = float((6.0 * n * float(np.prod(sizes)) / np.pi) ** (1.0 / 3.0))
    if image_hu is None:
        return TumorMeasurement(n, float("nan"), float("nan"), 0, diameter, extent)
    img = np.asarray(image_hu, dtype=np.float64)
    median = float(np.nanmedian(img[tumor]))
    ring_values = _ring_values(img, lab, tumor, idx, TUMOR_HOSTS[int(tumor_id)], sizes)
    ring_median = float(np.nanmedian(ring_values)) if ring_values.size else float("nan")
    return TumorMeasurement(n, median, ring_median, int(ring_values.size), diameter, extent)


def _ring_values(img, lab, tumor, idx, hosts, sizes) -> np.ndarray:
    base = max(RING_MM, 1.5 * float(sizes.max()))
    values = np.empty(0)
    for factor in (1.0, 2.0, 3.0):
        ring_mm = base * factor
        pad = np.ceil(ring_mm / sizes).astype(int) + 1
        lo = np.maximum(idx.min(axis=0) - pad, 0)
        hi = np.minimum(idx.max(axis=0) + pad + 1, lab.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dist = ndimage.distance_transform_edt(~tumor[box], sampling=sizes)
        ring = (dist <= ring_mm) & ~tumor[box] & np.isin(lab[box], hosts)
        values = img[box][ring]
        if values.size >= MIN_RING_VOXELS:
            break
    return values


def check_tumor(
    image_hu: np.ndarray | None, label_map: np.ndarray, tumor_id: int, *, affine: np.ndarray | None = None,
    diameter_range_mm: tuple[float, float] | None = None,
) -> tuple[list[QCFailure], TumorMeasurement | None]:
    """Judge one requested tumour: present, visible against its host, of the requested size.

    Args:
        image_hu: HU ``(X, Y, Z)``; None skips the contrast rule (e.g. for images that are not CT-like).
        label_map: MAISI IDs ``(X, Y, Z)``.
        tumor_id: one of ``TUMOR_HOSTS``.
        affine: voxel-to-world ``(4, 4)``; None means 1 mm voxels.
        diameter_range_mm: the requested (low, high) diameter; None skips the size check.

    Returns:
        The failures (``tumor``, ``tumor_contrast``, ``tumor_size``) and the measurement (None when absent).
    """
    name = label_name(tumor_id)
    m = measure_tumor(image_hu, label_map, tumor_id, affine)
    if m is None:
        return [QCFailure("tumor", name, None, None, f"{name}: expected tumour label {tumor_id} is absent")], None
    failures = []
    if image_hu is not None:
        failures += _contrast_failures(name, TUMOR_CONTRAST_RULES[int(tumor_id)], m)
    if diameter_range_mm is not None:
        failures += _size_failures(name, diameter_range_mm, m, voxel_sizes_mm(affine, who="check_tumor"))
    return failures, m


def _contrast_failures(name: str, rule: TumorContrastRule, m: TumorMeasurement) -> list[QCFailure]:
    out = []
    if rule.tumor_hu is not None and not rule.tumor_hu[0] <= m.median_hu <= rule.tumor_hu[1]:
        lo, hi = rule.tumor_hu
        out.append(QCFailure("tumor_contrast", name, m.median_hu, rule.tumor_hu,
                             f"tumor_contrast: {name} median {m.median_hu:+.0f} HU outside [{lo:+.0f}, {hi:+.0f}] HU"))
    if rule.min_contrast_hu <= 0:
        return out
    if not np.isfinite(m.ring_median_hu):
        out.append(QCFailure("tumor_contrast", name, None, None,
                             f"tumor_contrast: {name} has no host tissue around it (empty ring)"))
        return out
    c = m.contrast_hu
    score = abs(c) if rule.sign == 0 else rule.sign * c
    if score < rule.min_contrast_hu:
        want = {1: f">= +{rule.min_contrast_hu:.0f}", -1: f"<= -{rule.min_contrast_hu:.0f}",
                0: f"|contrast| >= {rule.min_contrast_hu:.0f}"}[rule.sign]
        bounds = (rule.min_contrast_hu, np.inf) if rule.sign >= 0 else (-np.inf, -rule.min_contrast_hu)
        out.append(QCFailure("tumor_contrast", name, c, bounds,
                             f"tumor_contrast: {name} median {m.median_hu:+.0f} HU vs host {m.ring_median_hu:+.0f} HU, "
                             f"contrast {c:+.0f} HU, needs {want} HU (invisible tumour?)"))
    return out


def _size_failures(name: str, range_mm, m: TumorMeasurement, sizes: np.ndarray) -> list[QCFailure]:
    lo, hi = (float(v) for v in range_mm)
    h = float(sizes.max())
    low = lo * (1.0 - SIZE_REL_TOL) - h
    high = hi * (1.0 + SIZE_REL_TOL) + h
    if max(m.diameter_mm, m.extent_mm) >= low and m.diameter_mm <= high:
        return []
    return [QCFailure("tumor_size", name, m.diameter_mm, (low, high),
                      f"tumor_size: {name} diameter {m.diameter_mm:.1f} mm (extent {m.extent_mm:.0f} mm) outside "
                      f"[{low:.1f}, {high:.1f}] mm allowed for the requested [{lo:g}, {hi:g}] mm")]
