"""Left/right QC of one case: the label map agrees with the structure names, the image agrees with the labels.

World coordinates are RAS+ as NIfTI defines them: ``+x`` is the patient's **right**, so every "right"
structure must lie at a greater world ``x`` than its "left" twin, the liver at a greater ``x`` than the
spleen, and the heart at a smaller ``x`` than the midline. Positions are centroids mapped through the
affine, so a label map stored in any axis order or handedness (LPS, flipped axes) is judged alike.

Two checks:

* :func:`check_label_orientation` (label map only): every lateral pair of :func:`lateral_pairs` that is
  present, and the heart against the midline (spine, spinal cord, sternum and trachea; the labelled body
  without them), must agree with its names. One disagreeing pair fails the case; the message names the
  pair that disagrees most.
* :func:`check_image_orientation` (image against labels): the image is correlated with an HU map
  predicted from the labels (air, lung, fat/muscle, soft tissue, bone; :data:`EXPECTED_HU`), once as
  labelled and once mirrored left/right (best over small shifts of the mirror plane). An image whose
  content is mirrored with respect to its label map correlates better with the mirrored prediction.
  A symmetric case (e.g. pelvis only) correlates alike both ways and passes: it cannot be told.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from maisi_core.anatomy.labels import BACKGROUND_ID, BODY_ID, LUNG_IDS, RIB_IDS, VERTEBRA_IDS, label_dict
from maisi_core.evaluation.qc_types import QCFailure, voxel_sizes_mm

__all__ = [
    "EXPECTED_HU", "IMAGE_MIRROR_MARGIN", "LateralPair", "check_image_orientation", "check_label_orientation",
    "expected_hu_map", "lateral_pairs", "mirror_correlations",
]

LEFT_LUNG_IDS = (28, 29)
RIGHT_LUNG_IDS = (30, 31, 32)
MIDLINE_IDS = VERTEBRA_IDS + (121, 122, 57)  # vertebrae, spinal cord, sternum, trachea
LEFT_OF_MIDLINE = {"heart": (115,)}
# Margin by which the mirrored prediction must out-correlate the labelled one before the image is called
# mirrored. Measured on intensity-model CT of phantoms (chest, abdomen, pelvis, head/neck; 32-64 voxels at
# 4-8 mm; 60 cases): r(mirrored) - r(labelled) is -0.56 ... -0.16 for correct cases and +0.34 ... +0.88 for
# mirrored images; an exactly symmetric case scores 0 both ways.
IMAGE_MIRROR_MARGIN = 0.03
MIRROR_SHIFT_MM = 30.0  # the mirror plane is searched within this distance of the volume centre
MAX_GRID = 64  # the image test works on a strided view with at most this many voxels per axis
MAX_CENTROID_GRID = 128
# Predicted HU per tissue class for the image test (DATA.md's medians of real chest CT, rounded).
EXPECTED_HU = {"air": -1000.0, "lung": -850.0, "body": -50.0, "soft": 40.0, "gut": 0.0, "bone": 500.0}
_GUT_IDS = (11, 12, 13, 19, 62)  # hold gas or contrast: predicted near water


@dataclass(frozen=True)
class LateralPair:
    """A structure on the patient's right and its mirror twin on the left.

    Attributes:
        right_name, left_name: names used in messages.
        right_ids, left_ids: the MAISI label IDs pooled on each side.
    """

    right_name: str
    right_ids: tuple[int, ...]
    left_name: str
    left_ids: tuple[int, ...]


@lru_cache(maxsize=1)
def lateral_pairs() -> tuple[LateralPair, ...]:
    """Return the lateral pairs judged: liver/spleen, right/left lung and ribs, and every ``right X``/``left X``.

    Lung lobes and ribs are pooled per side; every other ``right ...`` name of the label dictionary with a
    ``left ...`` twin is a pair of its own (kidneys 5/14, adrenals 8/9, iliac arteries 59/58 and veins
    61/60, humeri, scapulae, claviculae, femurs 94/93, hips 96/95, glutei, autochthons, iliopsoas,
    brachiocephalic veins, common carotids, subclavian arteries, kidney cysts).
    """
    ids = label_dict()
    pairs = [
        LateralPair("liver", (1,), "spleen", (3,)),
        LateralPair("right lung", RIGHT_LUNG_IDS, "left lung", LEFT_LUNG_IDS),
        LateralPair("right ribs", tuple(r for r in RIB_IDS if r >= 75),
                    "left ribs", tuple(r for r in RIB_IDS if r < 75)),
    ]
    pooled = set(LUNG_IDS) | set(RIB_IDS)
    for name, rid in sorted(ids.items(), key=lambda kv: kv[1]):
        twin = "left " + name[len("right "):]
        if name.startswith("right ") and twin in ids and rid not in pooled:
            pairs.append(LateralPair(name, (rid,), twin, (ids[twin],)))
    return tuple(pairs)


def _strides(shape, limit: int) -> tuple[int, int, int]:
    return tuple(max(1, -(-int(n) // limit)) for n in shape)  # type: ignore[return-value]


def label_centroids_vox(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (counts (256,), centroids (256, 3) in voxel indices) of every label ID 0-255.

    Volumes larger than 128 voxels along an axis are sampled with a stride (the centroid keeps
    full-resolution index units). Labels absent have count 0 and a NaN centroid.
    """
    steps = _strides(label_map.shape, MAX_CENTROID_GRID)
    lab = np.asarray(label_map)[::steps[0], ::steps[1], ::steps[2]].astype(np.int64, copy=False)
    lab = np.clip(lab, 0, 255)
    counts = np.bincount(lab.ravel(), minlength=256).astype(np.float64)
    centroids = np.full((256, 3), np.nan)
    present = counts > 0
    for axis, n in enumerate(lab.shape):
        key = lab * n + np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
        hist = np.bincount(key.ravel(), minlength=256 * n).reshape(256, n)
        centroids[present, axis] = (hist[present] @ np.arange(n)) / counts[present] * steps[axis]
    return counts, centroids


def _world_x(affine: np.ndarray, centroid_vox: np.ndarray) -> float:
    return float(affine[0, :3] @ centroid_vox + affine[0, 3])


def _pooled_x(counts, centroids, affine, ids) -> float | None:
    ids = [i for i in ids if counts[i] > 0]
    if not ids:
        return None
    w = counts[ids]
    return _world_x(affine, (centroids[ids] * w[:, None]).sum(axis=0) / w.sum())


def _midline_x(counts, centroids, affine) -> float | None:
    x = _pooled_x(counts, centroids, affine, MIDLINE_IDS)
    if x is None:
        x = _pooled_x(counts, centroids, affine, [i for i in range(1, 256) if i not in (115,)])
    return x


def check_label_orientation(label_map: np.ndarray, affine: np.ndarray | None) -> list[QCFailure]:
    """Fail when lateral structures sit on the side opposite their names (world ``x``, RAS+).

    Args:
        label_map: MAISI IDs ``(X, Y, Z)``.
        affine: voxel-to-world ``(4, 4)`` matrix; None means the identity (axis 0 towards the patient's right).

    Returns:
        At most one ``orientation`` failure, for the pair that disagrees most, e.g.
        ``"orientation: liver centroid x=-65 mm is left of spleen x=+98 mm (mirrored label map? 9 of 9
        lateral pairs disagree)"``.
    """
    a = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    counts, centroids = label_centroids_vox(label_map)
    judged = []  # (x_right - x_left, right_name, x_right, left_name, x_left)
    for pair in lateral_pairs():
        xr = _pooled_x(counts, centroids, a, pair.right_ids)
        xl = _pooled_x(counts, centroids, a, pair.left_ids)
        if xr is not None and xl is not None:
            judged.append((xr - xl, pair.right_name, xr, pair.left_name, xl))
    mid = _midline_x(counts, centroids, a)
    for name, ids in LEFT_OF_MIDLINE.items():
        x = _pooled_x(counts, centroids, a, ids)
        if x is not None and mid is not None:
            judged.append((mid - x, "midline", mid, name, x))
    wrong = [j for j in judged if j[0] < 0]
    if not wrong:
        return []
    worst = min(wrong)
    diff, right_name, xr, left_name, xl = worst
    subject = f"{left_name} centroid x={xl:+.0f} mm is right of the midline x={xr:+.0f} mm" if right_name == "midline" \
        else f"{right_name} centroid x={xr:+.0f} mm is left of {left_name} x={xl:+.0f} mm"
    return [QCFailure("orientation", right_name if right_name != "midline" else left_name, float(diff), (0.0, np.inf),
                      f"orientation: {subject} (mirrored label map? {len(wrong)} of {len(judged)} lateral "
                      f"pairs disagree)")]


@lru_cache(maxsize=1)
def _expected_lut() -> np.ndarray:
    from maisi_core.anatomy.labels import BONE_IDS

    lut = np.full(256, EXPECTED_HU["soft"], dtype=np.float32)
    lut[BACKGROUND_ID] = EXPECTED_HU["air"]
    lut[BODY_ID] = EXPECTED_HU["body"]
    lut[list(LUNG_IDS) + [57, 132]] = EXPECTED_HU["lung"]
    lut[list(_GUT_IDS)] = EXPECTED_HU["gut"]
    lut[list(BONE_IDS)] = EXPECTED_HU["bone"]
    return lut


def expected_hu_map(label_map: np.ndarray) -> np.ndarray:
    """Return the coarse HU the labels predict (float32, same shape): air, lung, body, soft tissue, gut, bone."""
    return _expected_lut()[np.clip(np.asarray(label_map).astype(np.int64, copy=False), 0, 255)]


def _lateral_axis(affine: np.ndarray) -> int:
    return int(np.argmax(np.abs(affine[0, :3])))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def mirror_correlations(image_hu: np.ndarray, label_map: np.ndarray, affine: np.ndarray | None) -> tuple[float, float]:
    """Return (r_labelled, r_mirrored): Pearson correlations of the image with the label-predicted HU map.

    ``r_mirrored`` is the best over mirror planes within ``MIRROR_SHIFT_MM`` of the volume centre, along
    the array axis closest to world ``x``. Both use the voxels inside the body (label != 0), the image
    clipped to [-1000, 1000] HU, on a strided grid of at most ``MAX_GRID`` voxels per axis.
    """
    a = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    steps = _strides(image_hu.shape, MAX_GRID)
    view = (slice(None, None, steps[0]), slice(None, None, steps[1]), slice(None, None, steps[2]))
    lab = np.asarray(label_map)[view]
    img = np.clip(np.nan_to_num(np.asarray(image_hu, dtype=np.float32)[view], nan=0.0), -1000.0, 1000.0)
    pred = expected_hu_map(lab)
    roi = lab != BACKGROUND_ID
    if roi.sum() < 8:
        return 0.0, 0.0
    values = img[roi]
    r_labelled = _corr(values, pred[roi])
    axis = _lateral_axis(a)
    size = voxel_sizes_mm(a, who="mirror_correlations")[axis] * steps[axis]
    reach = max(1, int(round(MIRROR_SHIFT_MM / size)))
    flipped = np.flip(pred, axis=axis)
    r_mirrored = max(_corr(values, np.roll(flipped, s, axis=axis)[roi]) for s in range(-reach, reach + 1))
    return r_labelled, r_mirrored


def check_image_orientation(image_hu: np.ndarray, label_map: np.ndarray, affine: np.ndarray | None) -> list[QCFailure]:
    """Fail when the image correlates better with the mirrored label prediction than with the labels.

    Returns:
        At most one ``orientation`` failure, e.g. ``"orientation: image matches the left/right-mirrored
        labels better (r=0.81) than the labels (r=0.52) (mirrored image?)"``.
    """
    r_labelled, r_mirrored = mirror_correlations(image_hu, label_map, affine)
    if r_mirrored - r_labelled <= IMAGE_MIRROR_MARGIN:
        return []
    return [QCFailure("orientation", None, r_mirrored - r_labelled, (-np.inf, IMAGE_MIRROR_MARGIN),
                      f"orientation: image matches the left/right-mirrored labels better (r={r_mirrored:.2f}) "
                      f"than the labels (r={r_labelled:.2f}) (mirrored image?)")]
