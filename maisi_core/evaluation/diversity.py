"""Diversity and memorisation of a generated set, from per-case features ``(N, D)``.

:func:`diversity` measures the pairwise spread of the generated cases and finds near-duplicate pairs;
:func:`memorization` measures how close each generated case is to its nearest reference (training) case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist, pdist, squareform

from maisi_core.errors import FeatureError
from maisi_core.evaluation.features import _check_features

__all__ = ["DiversityResult", "MemorizationResult", "diversity", "memorization"]


def _standardized(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    sd = reference.std(axis=0)
    return (features - reference.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)


@dataclass(frozen=True)
class DiversityResult:
    """Pairwise spread of a generated set in feature space.

    Attributes:
        mean_pairwise_distance: mean Euclidean distance over all pairs.
        median_pairwise_distance: median over all pairs.
        threshold: pairs closer than this are near-duplicates (``duplicate_ratio`` x median).
        near_duplicates: ``(i, j, distance)`` for each near-duplicate pair, i < j.
    """

    mean_pairwise_distance: float
    median_pairwise_distance: float
    threshold: float
    near_duplicates: tuple[tuple[int, int, float], ...]


def diversity(features: np.ndarray, *, duplicate_ratio: float = 0.1, standardize: bool = True) -> DiversityResult:
    """Return the diversity of per-case features ``(N, D)`` and the near-duplicate pairs.

    Args:
        features: one row per generated case (e.g. ``extractor.extract(volumes)``).
        duplicate_ratio: a pair is a near-duplicate when closer than this fraction of the median distance.
        standardize: z-score each feature over the set first.
    """
    feats = _check_features(features, "features", "diversity")
    if not 0.0 < duplicate_ratio < 1.0:
        raise FeatureError(f"diversity expects 0 < duplicate_ratio < 1, but got duplicate_ratio={duplicate_ratio}.")
    if standardize:
        feats = _standardized(feats, feats)
    dists = pdist(feats)
    median = float(np.median(dists))
    threshold = duplicate_ratio * median
    square = squareform(dists)
    ii, jj = np.triu_indices(len(feats), k=1)
    pairs = tuple((int(i), int(j), float(square[i, j])) for i, j in zip(ii, jj, strict=True)
                  if square[i, j] < threshold)
    return DiversityResult(float(dists.mean()), median, threshold, pairs)


@dataclass(frozen=True)
class MemorizationResult:
    """Nearest-neighbour distances from generated cases to a reference (training) set.

    Attributes:
        nn_distance: ``(N,)`` distance of each generated case to its nearest reference case.
        nn_index: ``(N,)`` index of that reference case.
        reference_loo_distance: ``(M,)`` leave-one-out nearest-neighbour distance within the reference set.
        threshold: the ``quantile`` of ``reference_loo_distance``.
        fraction_memorized: fraction of generated cases with ``nn_distance < threshold``.
        fraction_closer_than_own_nn: fraction with ``nn_distance`` below the LOO distance of their own nearest
            reference case (a per-sample authenticity test; about 0.5 for fresh samples, 1 for copies).
    """

    nn_distance: np.ndarray
    nn_index: np.ndarray
    reference_loo_distance: np.ndarray
    threshold: float
    fraction_memorized: float
    fraction_closer_than_own_nn: float


def memorization(
    generated: np.ndarray, reference: np.ndarray, *, quantile: float = 0.05, standardize: bool = True
) -> MemorizationResult:
    """Return nearest-neighbour distances of generated ``(N, D)`` to reference ``(M, D)`` features.

    A generated case closer to a reference case than almost any two reference cases are to each other
    (below the ``quantile`` of the reference set's leave-one-out NN distances) is a memorisation / privacy
    signal: for fresh samples the fraction is about ``quantile``; for copies it is 1.
    """
    gen = _check_features(generated, "generated", "memorization")
    ref = _check_features(reference, "reference", "memorization")
    if gen.shape[1] != ref.shape[1]:
        raise FeatureError(
            f"memorization expects features of the same dimension, but got D={gen.shape[1]} and D={ref.shape[1]}."
        )
    if not 0.0 <= quantile <= 1.0:
        raise FeatureError(f"memorization expects 0 <= quantile <= 1, but got quantile={quantile}.")
    if standardize:
        gen, ref = _standardized(gen, ref), _standardized(ref, ref)
    ref_square = squareform(pdist(ref))
    np.fill_diagonal(ref_square, np.inf)
    loo = ref_square.min(axis=1)
    cross = cdist(gen, ref)
    nn_index = cross.argmin(axis=1)
    nn = cross[np.arange(len(gen)), nn_index]
    threshold = float(np.quantile(loo, quantile))
    return MemorizationResult(nn, nn_index, loo, threshold, float(np.mean(nn < threshold)),
                              float(np.mean(nn < loo[nn_index])))
