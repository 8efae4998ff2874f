"""Fréchet distances between feature sets, and between sets of volumes over a named feature extractor.

Nothing here is FID: no InceptionV3 weights are available offline. With the default weights-free
:class:`~maisi_core.evaluation.features.RadiomicsFeatureExtractor` the result is reported as an **FRD-style Fréchet
distance** (Fréchet distance on radiomics-style features); with any other extractor, it is named after that
extractor's network.

2D extractors follow the 2.5D protocol of MAISI's ``compute_fid_2-5d_ct.py``: one Fréchet distance per plane
(axial, coronal, sagittal) and the mean of the three. 3D extractors give a single ``"volume"`` distance.
Reference features can be cached on disk, keyed by the volumes' content hash.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

from maisi_core.errors import FeatureError
from maisi_core.evaluation.features import FeatureExtractor, RadiomicsFeatureExtractor, _check_features, _check_volumes

logger = logging.getLogger(__name__)

__all__ = ["FrechetResult", "compute_frechet", "frechet_distance"]


def _sqrtm_or_none(matrix: np.ndarray, *, strict: bool = True) -> np.ndarray | None:
    """Return ``sqrtm(matrix)``, or None when it is not finite (or, if ``strict``, scipy finds it singular)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error" if strict else "ignore", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(matrix)
        except (linalg.LinAlgWarning, linalg.LinAlgError):
            return None
    return root if np.all(np.isfinite(root)) else None


def frechet_distance(
    features_a: np.ndarray, features_b: np.ndarray, *, eps: float = 1e-6, means_only: bool = False
) -> float:
    """Return the Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``.

    ``|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½)``. When ``sqrtm`` fails (singular product: non-finite
    result) it is retried with ``eps * I`` added to both covariances. Imaginary parts from round-off are
    dropped after checking that they are tiny. Warns when ``D >= min(N, M)`` (singular covariance); then
    prefer ``means_only=True``, which returns ``|mu_a - mu_b|²`` only.

    Raises:
        FeatureError: shapes differ, fewer than 2 samples, non-finite features, or a large imaginary part.
    """
    a = _check_features(features_a, "features_a", "frechet_distance")
    b = _check_features(features_b, "features_b", "frechet_distance")
    if a.shape[1] != b.shape[1]:
        raise FeatureError(
            f"frechet_distance expects two feature sets of the same dimension, but got D={a.shape[1]} and "
            f"D={b.shape[1]}. Use the same extractor for both sets."
        )
    diff = a.mean(axis=0) - b.mean(axis=0)
    mean_term = float(diff @ diff)
    if means_only:
        return mean_term
    n_min, dim = min(a.shape[0], b.shape[0]), a.shape[1]
    if dim >= n_min:
        warnings.warn(
            f"frechet_distance: feature dimension D={dim} >= sample count N={n_min}, so the covariance is "
            "singular and the distance is unreliable. Use more samples (slices, patches), reduce D, or pass "
            "means_only=True.",
            RuntimeWarning, stacklevel=2,
        )
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm_or_none(cov_a @ cov_b)
    if covmean is None:
        logger.debug("frechet_distance: singular covariance product, retrying with eps=%g", eps)
        offset = np.eye(dim) * eps
        covmean = _sqrtm_or_none((cov_a + offset) @ (cov_b + offset), strict=False)
        if covmean is None:
            raise FeatureError(
                f"frechet_distance expects a covariance product with a matrix square root, but got none even "
                f"with eps={eps}. Pass a larger eps or means_only=True."
            )
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.max(np.abs(covmean.real))))
        imag = float(np.max(np.abs(covmean.imag)))
        if imag > 1e-3 * scale:
            raise FeatureError(
                f"frechet_distance expects a real matrix square root, but got an imaginary part of {imag:.3g} "
                f"(scale {scale:.3g}). The features are probably degenerate; try means_only=True."
            )
        covmean = covmean.real
    value = mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance per plane (2.5D) or for ``"volume"`` (3D), and their mean.

    Attributes:
        label: what to call the number, e.g. ``"FRD-style Fréchet distance (radiomics)"``.
        per_plane: plane -> distance.
        mean: mean over the planes.
        n_reference: reference volumes; n_generated: generated volumes.
        means_only: whether the covariance term was dropped.
    """

    label: str
    per_plane: dict[str, float]
    mean: float
    n_reference: int
    n_generated: int
    means_only: bool


def _label_of(extractor: FeatureExtractor) -> str:
    extractor = getattr(extractor, "inner", extractor)  # MemoizedExtractor
    if isinstance(extractor, RadiomicsFeatureExtractor):
        return "FRD-style Fréchet distance (radiomics)"
    return f"Fréchet distance on {extractor.name} features"


def _volumes_digest(volumes: Sequence[np.ndarray], extractor: FeatureExtractor, center_ratio: float) -> str:
    h = hashlib.sha256(f"{extractor.cache_key}|{center_ratio}".encode())
    for v in volumes:
        arr = np.ascontiguousarray(v)
        h.update(f"{arr.shape}|{arr.dtype.str}".encode())
        h.update(arr.data)
    return h.hexdigest()


def _cached_planes(extractor, volumes, center_ratio, cache_dir) -> dict[str, np.ndarray]:
    if cache_dir is None:
        return extractor.extract_planes(volumes, center_ratio=center_ratio)
    path = Path(cache_dir) / f"{_volumes_digest(volumes, extractor, center_ratio)}.npz"
    if path.exists():
        with np.load(path) as data:
            logger.debug("feature cache hit %s", path)
            return {k: data[k] for k in data.files}
    planes = extractor.extract_planes(volumes, center_ratio=center_ratio)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **planes)
    tmp.replace(path)
    return planes


def compute_frechet(
    reference_volumes: Sequence[np.ndarray],
    generated_volumes: Sequence[np.ndarray],
    extractor: FeatureExtractor | None = None,
    *,
    center_ratio: float = 1.0,
    standardize: bool = True,
    means_only: bool = False,
    cache_dir: str | Path | None = None,
) -> FrechetResult:
    """Return the 2.5D (2D extractor) or volume-level (3D extractor) Fréchet distance of two sets of volumes.

    Args:
        reference_volumes: real HU volumes ``(X, Y, Z)``.
        generated_volumes: generated HU volumes ``(X, Y, Z)``.
        extractor: defaults to :class:`RadiomicsFeatureExtractor`.
        center_ratio: central fraction of slices per plane.
        standardize: z-score each feature with the reference set's mean and std (features differ in units).
        means_only: drop the covariance term.
        cache_dir: folder for reference-feature caching, keyed by the volumes' content hash.
    """
    extractor = extractor or RadiomicsFeatureExtractor()
    ref = _cached_planes(extractor, _check_volumes(reference_volumes, "compute_frechet"), center_ratio, cache_dir)
    gen = extractor.extract_planes(_check_volumes(generated_volumes, "compute_frechet"), center_ratio=center_ratio)
    per_plane = {}
    for plane, ref_feats in ref.items():
        gen_feats = gen[plane]
        if standardize:
            mu, sd = ref_feats.mean(axis=0), ref_feats.std(axis=0)
            sd = np.where(sd > 1e-8, sd, 1.0)
            ref_feats, gen_feats = (ref_feats - mu) / sd, (gen_feats - mu) / sd
        per_plane[plane] = frechet_distance(ref_feats, gen_feats, means_only=means_only)
    return FrechetResult(label=_label_of(extractor), per_plane=per_plane, mean=float(np.mean(list(per_plane.values()))),
                         n_reference=len(reference_volumes), n_generated=len(generated_volumes), means_only=means_only)
