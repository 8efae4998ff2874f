"""Training corpora for :mod:`maisi_core.training.pipeline`: (image, label map, spacing) cases on the model's grid.

Two sources:

* :func:`generate_phantom_corpus`: the procedural phantom (:mod:`maisi_core.anatomy.phantom`) painted by the
  intensity model (:mod:`maisi_core.anatomy.intensity`); seeded and unlimited. Cases cover single regions
  (chest, abdomen, lower, head/neck) and multi-region spans, some with a tumour.
* :func:`load_nifti_corpus`: a user's folder of NIfTI pairs, either ``imagesTr/X.nii.gz`` +
  ``labelsTr/X.nii.gz`` (nnU-Net / MSD layout; a ``_0000`` channel suffix on images is accepted) or
  ``X_image.nii.gz`` + ``X_label.nii.gz``. Each pair is resampled to the model's spacing (image
  trilinear, labels nearest) and centre-padded/cropped to the patch size.

Intensities are stored in the networks' [0, 1] scale: HU clipped to the preset's
``intensity_range_hu`` (default [-1000, 1000]) and mapped linearly, as MAISI's VAE transform does.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi_core import io
from maisi_core.modality import CT
from maisi_core.errors import TrainingDataError, TrainingDataNotFoundError, TumorPlacementError
from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, TumorSpec, generate_phantom

logger = logging.getLogger(__name__)

DEFAULT_INTENSITY_RANGE_HU = CT.output_range
# Region sets the phantom corpus draws from (single regions and spans), with their weights.
PHANTOM_REGION_SETS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("chest",), 0.15),
    (("abdomen",), 0.15),
    (("lower",), 0.1),
    (("head_neck",), 0.05),
    (("chest", "abdomen"), 0.3),
    (("abdomen", "lower"), 0.1),
    (("head_neck", "chest"), 0.05),
    (("chest", "abdomen", "lower"), 0.1),
)
# Tumours that fit each region (host organ usually in view).
REGION_TUMORS: dict[str, tuple[int, ...]] = {
    "chest": (23,), "abdomen": (26, 24), "lower": (27,), "head_neck": (),
}
IMAGE_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One training pair on the model's grid.

    Attributes:
        image: (X, Y, Z) float32 in [0, 1] (HU mapped from ``intensity_range_hu``).
        label_map: (X, Y, Z) uint8 MAISI IDs (0-255).
        spacing_mm: voxel size (x, y, z) in mm.
        name: where it came from (``phantom-<seed>`` or the file stem).
    """

    image: np.ndarray
    label_map: np.ndarray
    spacing_mm: tuple[float, float, float]
    name: str


def hu_to_unit(image_hu: np.ndarray, intensity_range_hu: Sequence[float] = DEFAULT_INTENSITY_RANGE_HU) -> np.ndarray:
    """Clip HU to ``intensity_range_hu`` and map it linearly to [0, 1] (float32, same shape)."""
    lo, hi = (float(v) for v in intensity_range_hu)
    return ((np.clip(np.asarray(image_hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class PhantomCorpusConfig:
    """What phantom corpus to draw.

    Attributes:
        num_cases: number of cases.
        output_size_vox: (X, Y, Z) of every case.
        spacing_xy_mm: (low, high) range the in-plane spacing is drawn from (x = y).
        spacing_z_mm: (low, high) range of the slice spacing.
        tumor_probability: chance that a case gets one tumour fitting its regions.
    """

    num_cases: int = 200
    output_size_vox: tuple[int, int, int] = (64, 64, 64)
    spacing_xy_mm: tuple[float, float] = (5.0, 7.0)
    spacing_z_mm: tuple[float, float] = (5.0, 7.0)
    tumor_probability: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.tumor_probability) <= 1.0:
            raise TrainingDataError(
                f"PhantomCorpusConfig expects 0 <= tumor_probability <= 1, but got "
                f"tumor_probability={self.tumor_probability}."
            )


def generate_phantom_case(
    seed: int,
    *,
    output_size_vox: Sequence[int],
    spacing_mm: Sequence[float],
    regions: Sequence[str],
    tumor_id: int | None = None,
    intensity_range_hu: Sequence[float] = DEFAULT_INTENSITY_RANGE_HU,
) -> TrainingCase:
    """Draw one phantom label map and paint it with the intensity model (same seed, same voxels).

    A tumour whose host organ is out of the field of view is left out (the case keeps its seed).
    """
    tumor = TumorSpec(tumor_id, (10.0, 40.0)) if tumor_id is not None else None
    size = tuple(int(s) for s in output_size_vox)
    spacing = tuple(float(s) for s in spacing_mm)
    try:
        case = generate_phantom(PhantomConfig(tuple(regions), size, spacing, tumor), seed=seed)
    except TumorPlacementError:
        case = generate_phantom(PhantomConfig(tuple(regions), size, spacing, None), seed=seed)
    hu = synthesize_ct(case.label_map, spacing, seed=seed)
    return TrainingCase(hu_to_unit(hu, intensity_range_hu), case.label_map.astype(np.uint8), spacing,  # type: ignore[arg-type]
                        f"phantom-{seed}")


def generate_phantom_corpus(
    config: PhantomCorpusConfig,
    *,
    seed: int,
    intensity_range_hu: Sequence[float] = DEFAULT_INTENSITY_RANGE_HU,
    workers: int = 1,
) -> list[TrainingCase]:
    """Draw ``config.num_cases`` phantom cases; case i uses phantom seed ``seed * 1_000_003 + i``.

    Regions, spacing and tumour of each case are drawn from ``np.random.default_rng(seed)`` in this
    process, so ``workers > 1`` (a pool of spawned processes painting the cases) gives the same cases.
    """
    if int(workers) < 1:
        raise TrainingDataError(f"generate_phantom_corpus expects workers >= 1, but got workers={workers}.")
    rng = np.random.default_rng(seed)
    sets = [s for s, _ in PHANTOM_REGION_SETS]
    weights = np.array([w for _, w in PHANTOM_REGION_SETS])
    jobs = []
    for i in range(int(config.num_cases)):
        regions = sets[int(rng.choice(len(sets), p=weights / weights.sum()))]
        sxy = float(rng.uniform(*config.spacing_xy_mm))
        sz = float(rng.uniform(*config.spacing_z_mm))
        tumors = [t for r in regions for t in REGION_TUMORS[r]]
        tumor = int(rng.choice(tumors)) if tumors and rng.random() < config.tumor_probability else None
        jobs.append(partial(generate_phantom_case, int(seed) * 1_000_003 + i, output_size_vox=config.output_size_vox,
                            spacing_mm=(sxy, sxy, sz), regions=regions, tumor_id=tumor,
                            intensity_range_hu=intensity_range_hu))
    if int(workers) == 1 or len(jobs) < 2:
        cases = [job() for job in jobs]
    else:
        # spawn, not fork: the caller may hold threads (torch, CUDA) that a forked child must not inherit
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            cases = list(pool.map(_call, jobs, chunksize=max(1, len(jobs) // (8 * int(workers)))))
    logger.info("phantom corpus: %d cases of %s", len(cases), config.output_size_vox)
    return cases


def _call(job: Callable[[], TrainingCase]) -> TrainingCase:
    return job()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))


def find_nifti_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """Return the (image, label) file pairs of a training folder, sorted by name.

    Raises:
        TrainingDataNotFoundError: the folder does not exist.
        TrainingDataError: no pairs, or an image without its label (or the reverse).
    """
    root = Path(folder)
    who = "find_nifti_pairs"
    if not root.is_dir():
        raise TrainingDataNotFoundError(
            f"{who} expects an existing folder of NIfTI image/label pairs, but got folder={str(root)!r}, "
            "which does not exist. Give imagesTr/ + labelsTr/ or *_image.nii.gz + *_label.nii.gz files."
        )
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        images = {_stem(p).removesuffix("_0000"): p for p in _nifti_files(root / "imagesTr")}
        labels_ = {_stem(p): p for p in _nifti_files(root / "labelsTr")}
    else:
        files = _nifti_files(root)
        images = {_stem(p).removesuffix("_image"): p for p in files if _stem(p).endswith("_image")}
        labels_ = {_stem(p).removesuffix("_label"): p for p in files if _stem(p).endswith("_label")}
    unmatched = sorted(set(images) ^ set(labels_))
    if unmatched:
        raise TrainingDataError(
            f"{who} expects every image to have a label of the same name, but got unmatched={unmatched[:5]} "
            f"in folder={str(root)!r}. Rename or remove them."
        )
    if not images:
        raise TrainingDataError(
            f"{who} expects at least one image/label pair, but got none in folder={str(root)!r}. "
            "Use imagesTr/X.nii.gz + labelsTr/X.nii.gz or X_image.nii.gz + X_label.nii.gz."
        )
    return [(images[k], labels_[k]) for k in sorted(images)]


def fit_to_grid(
    image_hu: np.ndarray,
    label_map: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    target_spacing_mm: Sequence[float],
    output_size_vox: Sequence[int],
    pad_hu: float = -1000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample (X, Y, Z) image (trilinear) and labels (nearest) to a spacing, then centre pad/crop to a size."""
    zoom = [float(s) / float(t) for s, t in zip(spacing_mm, target_spacing_mm, strict=True)]
    img = ndimage.zoom(np.asarray(image_hu, dtype=np.float32), zoom, order=1, mode="nearest")
    lab = ndimage.zoom(np.asarray(label_map), zoom, order=0, mode="nearest")
    out_img = np.full(tuple(output_size_vox), pad_hu, dtype=np.float32)
    out_lab = np.zeros(tuple(output_size_vox), dtype=lab.dtype)
    src, dst = [], []
    for n_in, n_out in zip(img.shape, output_size_vox, strict=True):
        lo_in, lo_out = max(0, (n_in - n_out) // 2), max(0, (n_out - n_in) // 2)
        n = min(n_in, n_out)
        src.append(slice(lo_in, lo_in + n))
        dst.append(slice(lo_out, lo_out + n))
    out_img[tuple(dst)] = img[tuple(src)]
    out_lab[tuple(dst)] = lab[tuple(src)]
    return out_img, out_lab


def load_nifti_corpus(
    folder: str | Path,
    *,
    output_size_vox: Sequence[int],
    spacing_mm: Sequence[float],
    intensity_range_hu: Sequence[float] = DEFAULT_INTENSITY_RANGE_HU,
) -> list[TrainingCase]:
    """Load a folder of NIfTI pairs onto the model grid (see :func:`find_nifti_pairs` for the layouts).

    Raises:
        TrainingDataError: unmatched names, shape mismatch between a pair, or label IDs above 255.
    """
    cases = []
    for image_path, label_path in find_nifti_pairs(folder):
        image, label = io.load_image(image_path), io.load_label(label_path)
        if image.shape != label.shape:
            raise TrainingDataError(
                f"load_nifti_corpus expects an image and label of the same shape, but got "
                f"image.shape={image.shape}, label.shape={label.shape} for {image_path.name!r}."
            )
        if int(label.array.max()) > 255:
            raise TrainingDataError(
                f"load_nifti_corpus expects MAISI label IDs 0-255, but got max_id={int(label.array.max())} "
                f"in {label_path.name!r}. Remap the labels first (maisi_core.anatomy.labels)."
            )
        img, lab = fit_to_grid(image.array, label.array, image.spacing_mm, target_spacing_mm=spacing_mm,
                               output_size_vox=output_size_vox, pad_hu=float(intensity_range_hu[0]))
        cases.append(TrainingCase(hu_to_unit(img, intensity_range_hu), lab.astype(np.uint8),
                                  tuple(float(s) for s in spacing_mm), _stem(image_path)))  # type: ignore[arg-type]
    logger.info("loaded %d NIfTI pairs from %s", len(cases), folder)
    return cases
