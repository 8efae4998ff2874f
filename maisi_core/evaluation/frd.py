"""The Fréchet Radiomics Distance as published (FRD v1), through the ``frd-score`` package (the ``frd`` extra).

FRD v1 (Konz, Osuala et al., Medical Image Analysis 110, 103943, 2026) is computed by ``frd_score.compute_frd``
with its defaults, unchanged: PyRadiomics features of each whole 3D volume (every voxel but one corner, or a
given mask) after resampling to 2 mm isotropic (B-spline) and per-image intensity normalisation (scale 100,
bin width 5, voxel shift 300), on the Original image, four LoG filters (sigma 2-5 mm) and eight wavelet
sub-bands (first order, GLCM, GLRLM, GLSZM, NGTDM, about a thousand features plus the numeric diagnostics
such as the image's mean in HU); each feature z-scored with the **reference** set's mean and std, columns that
become NaN or infinite dropped, and the result reported as ``log(d²)`` of the Fréchet distance ``d``. Lower is
better; it can be negative, and it is ``-inf`` for two identical sets.

It needs ``frd-score`` and a PyRadiomics build (``pyradiomics-bhklab`` builds from its sdist; the PyPI
``pyradiomics`` does not on Python >= 3.10). Neither needs torch. The weights-free
:class:`~maisi_core.evaluation.features.RadiomicsFeatureExtractor` distance (``fd_radiomics``) is the fast
fallback: radiomics-style, not the published FRD.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Union

import numpy as np

from maisi_core.errors import FeatureError, MaisiError
from maisi_core.io import Volume

__all__ = ["FRD_EXTRACTOR", "FRD_EXTRA", "FrdNotInstalledError", "describe_frd_extractor", "frd_available", "frd_v1"]

FRD_EXTRA = "frd"
FRD_PACKAGES = ("frd-score", "pyradiomics-bhklab")
# PyRadiomics distributions that provide the ``radiomics`` module, in order of preference.
_RADIOMICS_DISTS = ("pyradiomics-bhklab", "pyradiomics")

VolumeLike = Union[str, os.PathLike, np.ndarray, Volume]


class FrdNotInstalledError(MaisiError, ImportError):
    """Raised when the published FRD is asked for but ``frd-score`` or its PyRadiomics is not installed."""


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_frd_extractor() -> str:
    """Return the extractor of :func:`frd_v1` with its package versions, e.g. ``frd-score 1.0.1 (FRD v1; ...)``."""
    frd = _dist_version("frd-score")
    radiomics = next((f"{d} {v}" for d in _RADIOMICS_DISTS if (v := _dist_version(d))), None)
    if frd is None or radiomics is None:
        return "frd-score (not installed)"
    return f"frd-score {frd} (FRD v1, Konz et al. 2026; {radiomics})"


FRD_EXTRACTOR: str = describe_frd_extractor()


def frd_available() -> bool:
    """Whether :func:`frd_v1` can run: ``frd-score`` and a PyRadiomics build are installed."""
    return _dist_version("frd-score") is not None and any(_dist_version(d) for d in _RADIOMICS_DISTS)


def _import_frd_score():
    try:
        import frd_score
        import radiomics  # noqa: F401  (frd_score imports it only on first use)
    except ImportError as exc:
        raise FrdNotInstalledError(
            f"frd_v1 expects the '{FRD_EXTRA}' extra ({' and '.join(FRD_PACKAGES)}), but got "
            f"missing={exc.name or 'frd_score'!r}. Install it with `pip install 'ctfactory[{FRD_EXTRA}]'`, or "
            "use the fast fallback maisi_core.evaluation.frechet.compute_frechet (radiomics-style, not the "
            "published FRD)."
        ) from exc
    return frd_score


def _spacing_for(item: VolumeLike, spacing_mm: Sequence[float] | None, who: str) -> tuple[float, float, float]:
    if isinstance(item, Volume):
        return item.spacing_mm
    if spacing_mm is None:
        raise FeatureError(f"{who} expects spacing_mm for volumes given as arrays, but got spacing_mm=None.")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise FeatureError(f"{who} expects spacing_mm as three positive numbers, but got spacing_mm={spacing_mm!r}.")
    return spacing  # type: ignore[return-value]


def _write_nifti(array: np.ndarray, spacing_mm: tuple[float, float, float], path: Path, *, dtype) -> str:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).astype(dtype).transpose(2, 1, 0)))
    image.SetSpacing(spacing_mm)  # (X, Y, Z) arrays: SimpleITK's arrays are (Z, Y, X)
    sitk.WriteImage(image, str(path))
    return str(path)


def _binarised_copy(path: str | os.PathLike, out: Path) -> str:
    """Write the mask file's ``> 0`` voxels as a 0/1 mask with the file's own geometry; return its path."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkUInt8), str(out))
    return str(out)


def _as_files(items: Sequence[VolumeLike], folder: Path, *, spacing_mm, mask: bool, who: str, name: str) -> list[str]:
    """Return one NIfTI path per item: paths as given (images), arrays and volumes written to ``folder``."""
    if isinstance(items, (np.ndarray, Volume, str, os.PathLike)) or len(items) < 2:
        n = 1 if isinstance(items, (np.ndarray, Volume, str, os.PathLike)) else len(items)
        raise FeatureError(f"{who} expects a sequence of at least 2 volumes per set, but got {name} with {n}.")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise FeatureError(f"{who} expects existing NIfTI files, but got {name}[{i}]={str(item)!r}.")
            files.append(_binarised_copy(item, folder / f"{i:05d}.nii.gz") if mask else str(item))
            continue
        array = item.array if isinstance(item, Volume) else np.asarray(item)
        if array.ndim != 3:
            raise FeatureError(f"{who} expects 3D volumes (X, Y, Z), but got {name}[{i}] with shape={array.shape}.")
        if not mask and not np.all(np.isfinite(array)):
            raise FeatureError(f"{who} expects finite HU values, but got non-finite voxels in {name}[{i}].")
        spacing = _spacing_for(item, spacing_mm, who)
        data = (array > 0) if mask else array
        files.append(_write_nifti(data, spacing, folder / f"{i:05d}.nii.gz", dtype=np.uint8 if mask else np.float32))
    return files


def frd_v1(
    reference: Sequence[VolumeLike],
    generated: Sequence[VolumeLike],
    *,
    spacing_mm: Sequence[float] | None = None,
    reference_masks: Sequence[VolumeLike] | None = None,
    generated_masks: Sequence[VolumeLike] | None = None,
    num_workers: int | None = None,
    workdir: str | Path | None = None,
) -> float:
    """Return the published Fréchet Radiomics Distance (FRD v1) of ``generated`` against ``reference``.

    The reference set comes first, as in :func:`~maisi_core.evaluation.frechet.compute_frechet`: FRD v1
    z-scores every feature with the reference set's statistics, so the order matters.

    Args:
        reference: real CT volumes: NIfTI paths, :class:`~maisi_core.io.Volume` objects (spacing from the
            affine) or HU arrays ``(X, Y, Z)`` (spacing from ``spacing_mm``). At least 2.
        generated: generated CT volumes, the same kinds. At least 2.
        spacing_mm: voxel size ``(x, y, z)`` of the volumes given as bare arrays.
        reference_masks: optional regions of interest per reference volume (any voxel > 0 is inside), of
            the same kind as the volumes (paths keep their file's geometry; arrays and volumes are written
            with spacing only); without masks the whole volume is the region (the package's default).
        generated_masks: the same for ``generated``; give both or neither.
        num_workers: extraction processes (``None``: the package's default, CPU count - 2, at least 1).
        workdir: folder for the temporary NIfTI copies of arrays (default: a temporary folder, removed).

    Returns:
        ``log(d²)`` as ``frd_score.compute_frd(..., frd_version="v1")`` returns it; lower is better.

    Raises:
        FrdNotInstalledError: ``frd-score`` or PyRadiomics is not installed (the ``frd`` extra).
        FeatureError: fewer than 2 volumes in a set, non-3D or non-finite volumes, missing spacing, or
            masks given for one set only.
    """
    who = "frd_v1"
    if (reference_masks is None) != (generated_masks is None):
        raise FeatureError(f"{who} expects masks for both sets or neither, but got reference_masks="
                           f"{'given' if reference_masks is not None else None}, generated_masks="
                           f"{'given' if generated_masks is not None else None}.")
    frd_score = _import_frd_score()
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        paths = [_as_files(vols, root / name, spacing_mm=spacing_mm, mask=False, who=who, name=name)
                 for name, vols in (("reference", reference), ("generated", generated))]
        masks = None
        if reference_masks is not None:
            masks = [_as_files(m, root / f"{name}_masks", spacing_mm=spacing_mm, mask=True, who=who,
                               name=f"{name}_masks")
                     for name, m in (("reference", reference_masks), ("generated", generated_masks))]
            for name, img, msk in zip(("reference", "generated"), paths, masks):
                if len(img) != len(msk):
                    raise FeatureError(f"{who} expects one mask per volume, but got {len(img)} {name} volumes and "
                                       f"{len(msk)} masks.")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # compute_frd prints its result
            # v1 z-scores with the reference's std, which is 0 for some features: their inf/NaN columns warn in
            # np.cov before the package drops them, as the published pipeline does.
            warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
            value = frd_score.compute_frd(paths, frd_version="v1", paths_masks=masks, num_workers=num_workers)
    return float(value)
