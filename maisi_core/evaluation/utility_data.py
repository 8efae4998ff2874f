"""Labelled CT cases for the downstream-utility test: loading folders, fingerprints and grid changes.

A :class:`LabeledCase` keeps a case on its own grid (as stored, HU and MAISI IDs). The segmenters work on
one shared grid instead: :func:`to_work_grid` reorients a case to RAS and resamples it to the utility
spacing (image trilinear with anti-aliasing, labels nearest); :func:`from_work_grid` brings a predicted
label map back onto the case's own grid, so scores are computed where the truth lives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from maisi_core import io
from maisi_core.anatomy import labels
from maisi_core.anatomy.mask_remap import remap_labels, totalsegmentator_mapping
from maisi_core.anatomy.mask_types import LABEL_MAPPINGS
from maisi_core.errors import MaskSourceError, TrainingDataError, TrainingDataNotFoundError, did_you_mean

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FOLDER_LAYOUTS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels"))
SPLITS = ("Tr", "Ts")
CHANNEL_SUFFIX = "_0000"  # nnU-Net's channel suffix on image files; CT has one channel


@dataclass(frozen=True, eq=False)
class LabeledCase:
    """One CT image with its label map, on the grid it was stored on.

    Attributes:
        case_id: unique name of the case (the file stem without the channel suffix).
        image: ``(X, Y, Z)`` float32 HU.
        label: ``(X, Y, Z)`` integer MAISI IDs.
        affine: ``(4, 4)`` RAS voxel-to-world matrix in mm.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        image, label = np.asarray(self.image), np.asarray(self.label)
        if image.ndim != 3 or image.shape != label.shape:
            raise TrainingDataError(
                f"LabeledCase expects a 3D image and label of the same shape, but got image.shape={image.shape}, "
                f"label.shape={label.shape} for case_id={self.case_id!r}."
            )
        if not np.issubdtype(label.dtype, np.integer):
            raise TrainingDataError(
                f"LabeledCase expects integer MAISI IDs in label, but got dtype={label.dtype} for "
                f"case_id={self.case_id!r}. Resample label maps with nearest-neighbour interpolation only."
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise TrainingDataError(
                f"LabeledCase expects a finite, invertible (4, 4) affine, but got affine={affine.tolist()} for "
                f"case_id={self.case_id!r}."
            )
        object.__setattr__(self, "image", image.astype(np.float32, copy=False))
        object.__setattr__(self, "affine", affine)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- fingerprint


def fingerprint(cases: Sequence[LabeledCase]) -> str:
    """Return a sha256 hex digest over case ids, affines, image and label voxels (order-independent).

    It identifies the data (the same cases give the same digest) without keeping any of it.
    """
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case_id):
        digest.update(case.case_id.encode() + b"\0")
        digest.update(repr(tuple(case.image.shape)).encode())
        digest.update(np.ascontiguousarray(case.affine, dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(case.image, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(case.label, dtype="<i4").tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- folders


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def _pick_layout(root: Path, split: str | None) -> tuple[Path, Path]:
    who = "load_labeled_folder"
    if split is not None and split not in SPLITS:
        raise TrainingDataError(f"{who} expects split in {list(SPLITS)} or None, but got split={split!r}."
                                f"{did_you_mean(split, SPLITS)}")
    found = [(root / i, root / lab) for i, lab in FOLDER_LAYOUTS if (root / i).is_dir() and (root / lab).is_dir()]
    if split is not None:
        found = [pair for pair in found if pair[0].name.endswith(split)]
    if not found:
        raise TrainingDataError(
            f"{who} expects imagesTr/ + labelsTr/, imagesTs/ + labelsTs/ or images/ + labels/ folders, but got "
            f"none in folder={str(root)!r}" + (f" for split={split!r}" if split else "") + "."
        )
    if len(found) > 1:
        raise TrainingDataError(
            f"{who} expects one image/label layout, but got {[p[0].name for p in found]} in folder={str(root)!r}. "
            "Pass split='Tr' or split='Ts'."
        )
    return found[0]


def find_labeled_pairs(folder: str | os.PathLike, *, split: str | None = None) -> list[tuple[str, Path, Path]]:
    """Return ``(case_id, image_path, label_path)`` for every case of a folder, sorted by case_id.

    Raises:
        TrainingDataNotFoundError: the folder does not exist.
        TrainingDataError: no layout, no pairs, unmatched names or multi-channel images.
    """
    root = Path(folder)
    who = "load_labeled_folder"
    if not root.is_dir():
        raise TrainingDataNotFoundError(
            f"{who} expects an existing folder of labelled cases, but got folder={str(root)!r}, which does not exist."
        )
    image_dir, label_dir = _pick_layout(root, split)
    images = {_stem(p).removesuffix(CHANNEL_SUFFIX): p for p in _nifti_files(image_dir)}
    labels_ = {_stem(p): p for p in _nifti_files(label_dir)}
    unmatched = sorted(set(images) ^ set(labels_))
    channels = [images[k].name for k in unmatched if k in images and _is_channel(k) and k[:-5] in labels_]
    if channels:
        raise TrainingDataError(
            f"{who} expects single-channel CT images ({CHANNEL_SUFFIX} or no suffix), but got "
            f"files={channels[:3]} in {str(image_dir)!r}. Keep one CT channel per case."
        )
    if unmatched:
        raise TrainingDataError(
            f"{who} expects every image to have a label of the same case name, but got unmatched={unmatched[:5]} "
            f"in folder={str(root)!r}. Rename or remove them."
        )
    if not images:
        raise TrainingDataError(f"{who} expects at least one image/label pair, but got none in folder={str(root)!r}.")
    return [(k, images[k], labels_[k]) for k in sorted(images)]


def _is_channel(stem: str) -> bool:
    """Whether a stem ends in an nnU-Net channel suffix ``_XXXX``."""
    return len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit()


def _dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingDataError(
            f"load_labeled_folder expects dataset.json to be valid JSON, but got an error ({exc}) in {str(path)!r}."
        ) from None


def resolve_label_mapping(label_mapping: str | Mapping[int, int | str], meta: Mapping) -> dict[int, int | str]:
    """Return source ID -> MAISI ID (or name) for a folder.

    ``"maisi"`` keeps MAISI IDs, unless the folder's ``dataset.json`` carries ``maisi_label_ids``
    (ctfactory's nnU-Net export: consecutive IDs -> MAISI IDs), which is then used. ``"totalsegmentator"``
    uses the ``labels`` of ``dataset.json`` as class names when present, else the standard v2 ``total`` map.
    A dict is used as given.
    """
    if isinstance(label_mapping, Mapping):
        return {int(k): v for k, v in label_mapping.items()}
    if label_mapping == "maisi":
        if "maisi_label_ids" in meta:
            return {int(k): int(v) for k, v in meta["maisi_label_ids"].items()}
        return {i: i for i in labels.known_ids()}
    if label_mapping == "totalsegmentator":
        names = {int(v): str(k) for k, v in meta.get("labels", {}).items() if int(v) != 0}
        return dict(totalsegmentator_mapping(names or None))
    raise MaskSourceError(
        f"load_labeled_folder expects label_mapping to be a dict or one of {list(LABEL_MAPPINGS)}, but got "
        f"label_mapping={label_mapping!r}.{did_you_mean(label_mapping, LABEL_MAPPINGS)}"
    )


def load_labeled_folder(
    path: str | os.PathLike,
    *,
    label_mapping: str | Mapping[int, int | str] = "maisi",
    unmapped: str = "error",
    split: str | None = None,
) -> list[LabeledCase]:
    """Load an nnU-Net-style folder of CT images and label maps, labels in MAISI IDs, sorted by case_id.

    Layouts: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` (or ``imagesTs``/``labelsTs``),
    or ``images/`` + ``labels/`` with the same names (``_0000`` optional). Cases stay on their own grid.

    Args:
        path: the folder.
        label_mapping: ``"maisi"`` (IDs are MAISI IDs, or ctfactory's ``maisi_label_ids`` in
            ``dataset.json``), ``"totalsegmentator"``, or a dict source ID -> MAISI ID or name.
        unmapped: what to do with label IDs the mapping lacks: ``"error"``, ``"background"`` or ``"body"``.
        split: ``"Tr"`` or ``"Ts"`` when a folder holds both.

    Raises:
        TrainingDataNotFoundError: no such folder.
        TrainingDataError: bad layout, unmatched pairs, or an image and label that disagree in shape or affine.
        UnmappedLabelError: label IDs the mapping lacks and ``unmapped="error"``.
    """
    root = Path(path)
    pairs = find_labeled_pairs(root, split=split)
    mapping = resolve_label_mapping(label_mapping, _dataset_json(root))
    cases = []
    for case_id, image_path, label_path in pairs:
        image, label = io.load_image(image_path), io.load_label(label_path)
        if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-3):
            raise TrainingDataError(
                f"load_labeled_folder expects an image and label on the same grid, but got image.shape={image.shape}, "
                f"label.shape={label.shape} (affines equal: {np.allclose(image.affine, label.affine, atol=1e-3)}) "
                f"for case_id={case_id!r}. Resample the label onto the image first."
            )
        remapped = remap_labels(label.array, mapping, unmapped=unmapped, who="load_labeled_folder")
        cases.append(LabeledCase(case_id, np.asarray(image.array, dtype=np.float32), remapped, image.affine))
    logger.info("loaded %d labelled cases from %s", len(cases), root)
    return cases


# ----------------------------------------------------------------------------------------- grids


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt("RAS"))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest source index of each output voxel when ``n_in`` voxels span the same extent as ``n_out``."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.floor(pos + 0.5), 0, n_in - 1).astype(np.int64)


def work_shape(case: LabeledCase, spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """The case's RAS shape on the utility grid: its extent divided by ``spacing_mm`` (at least one voxel)."""
    transform = _ras_transform(case.affine)
    shape = np.asarray(case.label.shape)[transform[:, 0].astype(int).argsort()]
    spacing = np.asarray(case.spacing_mm)[transform[:, 0].astype(int).argsort()]
    return tuple(max(1, int(round(n * s / float(t)))) for n, s, t in zip(shape, spacing, spacing_mm))  # type: ignore


def to_work_grid(case: LabeledCase, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return the case's image (HU, float32) and label map reoriented to RAS and resampled to ``spacing_mm``.

    Both are ``(X', Y', Z')`` with the shape of :func:`work_shape`; the image is smoothed before it is
    shrunk (Gaussian, sigma = (factor - 1) / 2 voxels) so fine grids do not alias.
    """
    transform = _ras_transform(case.affine)
    image = np.asarray(nib.orientations.apply_orientation(case.image, transform), dtype=np.float32)
    label = np.asarray(nib.orientations.apply_orientation(case.label, transform))
    out = work_shape(case, spacing_mm)
    factors = np.asarray(image.shape) / np.asarray(out)
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if np.any(sigma > 0):
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)
    if tuple(image.shape) != out:
        image = ndimage.zoom(image, np.asarray(out) / np.asarray(image.shape), order=1, mode="nearest",
                             grid_mode=True).astype(np.float32)
    index = [_nearest_index(n, m) for n, m in zip(label.shape, out)]
    return np.ascontiguousarray(image), np.ascontiguousarray(label[np.ix_(*index)])


def from_work_grid(work_label: np.ndarray, case: LabeledCase) -> np.ndarray:
    """Bring a label map on the case's utility grid (see :func:`to_work_grid`) back to the case's own grid (nearest)."""
    transform = _ras_transform(case.affine)
    ras_shape = np.asarray(case.label.shape)[transform[:, 0].astype(int).argsort()]
    index = [_nearest_index(m, n) for m, n in zip(work_label.shape, ras_shape)]
    ras = np.asarray(work_label)[np.ix_(*index)]
    inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                              nib.orientations.io_orientation(case.affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, inverse))
