"""Label–image agreement of one case: labelled structures must show the HU of their tissue class.

Each structure with a physical HU signature belongs to a class; a structure passes when at least
``MIN_FRACTION`` of its voxels lie in the class's range. Partial volume is handled per structure:

* a structure with at least ``MIN_CORE_VOXELS`` *interior* voxels (all six face neighbours carry the same
  label) is judged on those, against the class's ``interior`` range;
* a thin one (ribs, spinal cord, airway at 4-6 mm, 1-2 voxels across) is judged on all its voxels
  against the wider ``thin`` range, which admits a voxel that is up to about half its neighbour
  (e.g. a rib voxel half lung: 0.5 x 300 + 0.5 x (-830) = -265 HU).

======== ================================================ ================ =============== ======================
class    labels                                           interior HU      thin HU         source
======== ================================================ ================ =============== ======================
air      lung lobes 28-32, trachea 57, airway 132         -1024 ... -400   -1024 ... -150  lung 5th-95th
                                                                                           percentile -940...-551 /
                                                                                           -906...-528 (DATA.md)
bone     vertebrae, ribs, 87-97, skull, sternum           50 ... 3071      -300 ... 3071   cortex 700+, cancellous
                                                                                           150-300 (>= 110 unless
                                                                                           osteoporotic, Pickhardt
                                                                                           et al. 2013); real chest
                                                                                           CT bone 309...901 (DATA.md)
soft     organs, glands, muscles, brain, spinal cord      -100 ... 250     -300 ... 300    soft tissue -20...104
                                                                                           (DATA.md); enhanced
                                                                                           kidney cortex <= 267
                                                                                           (MAISI QC range)
vessel   aorta, veins, heart, hepatic vessel, ...         -100 ... 600     -400 ... 600    blood 40 unenhanced, up
                                                                                           to about 500 in arterial
                                                                                           CTA
======== ================================================ ================ =============== ======================

Not judged: body (200, a fat/muscle mixture), the gut (esophagus, stomach, duodenum, small bowel, colon:
gas, fluid or oral contrast), bladder and gallbladder (excreted contrast), costal cartilage (calcifies
with age) and tumours (judged by :mod:`maisi_core.evaluation.qc_tumor`). MAISI has no fat label, so the fat class
(-190...-30 HU) has no structure to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from maisi_core.anatomy.labels import BONE_IDS, LUNG_IDS, RIB_IDS, VERTEBRA_IDS, known_ids, label_name
from maisi_core.evaluation.qc_types import QCFailure

__all__ = ["AGREEMENT_CLASSES", "MIN_CORE_VOXELS", "MIN_FRACTION", "MIN_VOXELS", "AgreementClass",
           "check_label_agreement", "label_agreement_fractions"]

MIN_FRACTION = 0.5
MIN_CORE_VOXELS = 8
MIN_VOXELS = 4  # structures with fewer voxels are reported but not judged


@dataclass(frozen=True)
class AgreementClass:
    """A tissue class and its plausible HU (see the module docstring for the sources).

    Attributes:
        name: ``air``, ``bone``, ``soft`` or ``vessel``.
        ids: the label IDs of the class.
        interior_hu: (low, high) for interior voxels.
        thin_hu: (low, high) for structures without an interior (partial volume).
    """

    name: str
    ids: tuple[int, ...]
    interior_hu: tuple[float, float]
    thin_hu: tuple[float, float]


_VESSEL_IDS = (6, 7, 17, 25, 58, 59, 60, 61, 108, 109, 110, 111, 112, 113, 115, 119, 123, 124, 125)
_NOT_JUDGED = {0, 200, 11, 12, 13, 19, 62, 10, 15, 114, 23, 24, 26, 27, 128}
AGREEMENT_CLASSES: tuple[AgreementClass, ...] = (
    AgreementClass("air", LUNG_IDS + (57, 132), (-1024.0, -400.0), (-1024.0, -150.0)),
    AgreementClass("bone", BONE_IDS, (50.0, 3071.0), (-300.0, 3071.0)),
    AgreementClass("vessel", _VESSEL_IDS, (-100.0, 600.0), (-400.0, 600.0)),
    AgreementClass("soft", (), (-100.0, 250.0), (-300.0, 300.0)),  # every other judged label
)
# Structures pooled under one key in the reported fractions (each member is still judged alone).
REPORT_GROUPS = {"lung": LUNG_IDS, "ribs": RIB_IDS, "vertebrae": VERTEBRA_IDS}


@lru_cache(maxsize=1)
def _class_of() -> dict[int, AgreementClass]:
    out = {}
    for label in sorted(known_ids() - _NOT_JUDGED):
        out[label] = next((c for c in AGREEMENT_CLASSES if label in c.ids), AGREEMENT_CLASSES[-1])
    return out


def _interior(lab: np.ndarray) -> np.ndarray:
    """Voxels whose six face neighbours carry the same label (the volume's border is not interior)."""
    inner = np.zeros(lab.shape, dtype=bool)
    core = (slice(1, -1),) * 3
    same = np.ones(tuple(max(n - 2, 0) for n in lab.shape), dtype=bool)
    centre = lab[core]
    for axis in range(3):
        for step in (-1, 1):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(1 + step, lab.shape[axis] - 1 + step)
            same &= lab[tuple(sl)] == centre
    inner[core] = same
    return inner


def _counts(lab, img, lo_lut, hi_lut, where) -> tuple[np.ndarray, np.ndarray]:
    ids = lab[where]
    values = img[where]
    ok = (values >= lo_lut[ids]) & (values <= hi_lut[ids])
    return np.bincount(ids, minlength=256), np.bincount(ids, weights=ok, minlength=256)


@dataclass(frozen=True)
class _Tally:
    n: np.ndarray  # voxels judged per label
    ok: np.ndarray  # of which in range
    interior: np.ndarray  # bool per label: judged on interior voxels


def _tally(image_hu: np.ndarray, label_map: np.ndarray) -> _Tally:
    lab = np.clip(np.asarray(label_map).astype(np.int64, copy=False), 0, 255)
    img = np.nan_to_num(np.asarray(image_hu, dtype=np.float32), nan=np.inf)
    classes = _class_of()
    lut = {k: np.full(256, np.nan) for k in ("ilo", "ihi", "tlo", "thi")}
    for label, cls in classes.items():
        lut["ilo"][label], lut["ihi"][label] = cls.interior_hu
        lut["tlo"][label], lut["thi"][label] = cls.thin_hu
    judged = np.zeros(256, dtype=bool)
    judged[list(classes)] = True
    inner = _interior(lab) & judged[lab]
    n_in, ok_in = _counts(lab, img, lut["ilo"], lut["ihi"], inner)
    n_all, ok_all = _counts(lab, img, lut["tlo"], lut["thi"], judged[lab])
    use_inner = n_in >= MIN_CORE_VOXELS
    return _Tally(np.where(use_inner, n_in, n_all), np.where(use_inner, ok_in, ok_all), use_inner)


def label_agreement_fractions(image_hu: np.ndarray, label_map: np.ndarray) -> dict[str, float]:
    """Return structure -> fraction of its judged voxels in its class's HU range, for structures present.

    Lung lobes, ribs and vertebrae are pooled as ``lung``, ``ribs`` and ``vertebrae``; every other
    structure is keyed by its MAISI name.
    """
    return _fractions(_tally(image_hu, label_map))


def _fractions(t: _Tally) -> dict[str, float]:
    out: dict[str, float] = {}
    pooled = {i for ids in REPORT_GROUPS.values() for i in ids}
    for group, ids in REPORT_GROUPS.items():
        n = t.n[list(ids)].sum()
        if n:
            out[group] = round(float(t.ok[list(ids)].sum() / n), 4)
    for label in _class_of():
        if label not in pooled and t.n[label]:
            out[label_name(label)] = round(float(t.ok[label] / t.n[label]), 4)
    return out


def check_label_agreement(image_hu: np.ndarray, label_map: np.ndarray) -> tuple[list[QCFailure], dict[str, float]]:
    """Fail each structure of at least ``MIN_VOXELS`` voxels with under ``MIN_FRACTION`` of them in range.

    Returns:
        The ``label_agreement`` failures, e.g. ``"label_agreement: spinal cord median +404 HU, 3% of 40
        voxels in the soft range [-300, +300] HU"``, and the fractions of :func:`label_agreement_fractions`.
    """
    t = _tally(image_hu, label_map)
    failures = []
    lab = np.asarray(label_map)
    for label, cls in _class_of().items():
        n = int(t.n[label])
        if n < MIN_VOXELS or t.ok[label] >= MIN_FRACTION * n:
            continue
        frac = float(t.ok[label] / n)
        lo, hi = cls.interior_hu if t.interior[label] else cls.thin_hu
        median = float(np.nanmedian(np.asarray(image_hu)[lab == label]))
        name = label_name(label)
        where = "interior " if t.interior[label] else ""
        failures.append(QCFailure("label_agreement", name, frac, (lo, hi),
                                  f"label_agreement: {name} median {median:+.0f} HU, {frac:.0%} of {n} {where}voxels "
                                  f"in the {cls.name} range [{lo:+.0f}, {hi:+.0f}] HU"))
    return failures, _fractions(t)
