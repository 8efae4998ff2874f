"""Named feature extractors for volumes, and the 2.5D slicing they use.

Nothing here is FID: no InceptionV3 weights are available offline. The default extractor is the weights-free
:class:`RadiomicsFeatureExtractor` (radiomics-style features per slice). :class:`TorchFeatureExtractor` runs any
2D or 3D torch network from a user's checkpoint, loaded with :func:`load_state_dict_file`.

The 2.5D protocol follows MAISI's ``compute_fid_2-5d_ct.py``: HU clipped to [-1000, 1000], slices taken from the
axial (XY), coronal (XZ) and sagittal (YZ) planes, and features per slice. 3D extractors give one feature vector
per volume.
"""

from __future__ import annotations

import hashlib
from abc import ABC
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maisi_core.errors import FeatureError, WeightsError, WeightsNotFoundError

if TYPE_CHECKING:  # torch is imported lazily: the radiomics path does not need it
    import torch

__all__ = [
    "PLANES", "FeatureExtractor", "RadiomicsFeatureExtractor", "TorchFeatureExtractor", "extract_plane_slices",
    "load_state_dict_file",
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


def _check_features(features: np.ndarray, name: str, who: str) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise FeatureError(f"{who} expects features (N, D) with N >= 2, but got {name} with shape={arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise FeatureError(f"{who} expects finite features, but got {name} with NaN/inf values.")
    return arr


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


# --------------------------------------------------------------------------- weight files and torch extractor


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
        from maisi_core.engine.weights import _load_safetensors

        state = _load_safetensors(path, who=who)
    else:
        from maisi_core.engine.weights import load_torch_checkpoint

        state = load_torch_checkpoint(path, who=who, what=f"path={str(path)!r}")
    return _clean_state_dict(state, key_prefix=key_prefix, who=who, what=f"path={str(path)!r}")


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
