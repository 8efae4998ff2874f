"""Memory-bounded VAE decoding: named memory presets and the sliding-window decoder.

Peak memory of MAISI generation is reached while decoding the latent. Two knobs bound it: the
sliding-window size (the decoder sees one window of latent voxels at a time, so activation memory is
set by the window, not by the volume) and the tensor-split count of the VAE's convolutions. The
presets are the upstream per-GPU-memory inference configs (NV-Generate-CTMR
``configs/config_infer_{16,24,32,80}g_*.json``, ``docs/performance.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maisi_core.errors import ConfigError, did_you_mean

if TYPE_CHECKING:  # the presets are plain data; torch and MONAI load with the decoder (planning needs neither)
    import torch


@dataclass(frozen=True)
class DecodePreset:
    """Sliding-window decode settings for a GPU memory class.

    Attributes:
        roi_latent: window size in latent voxels (x, y, z).
        overlap: fraction of overlap between windows (gaussian blending).
        num_splits: tensor-split count of the VAE convolutions.
        gpu_memory_gb: the GPU memory class this preset was sized for.
    """

    name: str
    roi_latent: tuple[int, int, int]
    overlap: float
    num_splits: int
    gpu_memory_gb: float


DECODE_PRESETS: dict[str, DecodePreset] = {
    # docs/performance.md, 256^3 with [48,48,64] and 4 splits (15.4 GB peak on an A100)
    "16g": DecodePreset("16g", (48, 48, 64), 0.6666, 4, 16),
    # config_infer_24g_512x512x512.json (22.8 GB at 512^3)
    "24g": DecodePreset("24g", (64, 64, 48), 0.4, 2, 24),
    # docs/performance.md, 512^3 with [80,80,48] and 4 splits (28.4 GB)
    "32g": DecodePreset("32g", (80, 80, 48), 0.4, 4, 32),
    # config_infer_80g_512x512x512.json (45.3 GB at 512^3; 49.7 GB at 512x512x768 with z 96)
    "80g": DecodePreset("80g", (80, 80, 80), 0.4, 4, 80),
}


def get_decode_preset(name: str) -> DecodePreset:
    """Return a decode preset by name (``16g``, ``24g``, ``32g``, ``80g``)."""
    if name not in DECODE_PRESETS:
        raise ConfigError(
            f"get_decode_preset expects one of {sorted(DECODE_PRESETS)}, but got name={name!r}."
            + did_you_mean(name, DECODE_PRESETS)
        )
    return DECODE_PRESETS[name]


def select_decode_preset(free_memory_gb: float) -> DecodePreset:
    """Return the largest preset whose memory class fits in ``free_memory_gb`` (the smallest otherwise)."""
    fitting = [p for p in DECODE_PRESETS.values() if p.gpu_memory_gb <= free_memory_gb]
    if not fitting:
        return min(DECODE_PRESETS.values(), key=lambda p: p.gpu_memory_gb)
    return max(fitting, key=lambda p: p.gpu_memory_gb)


def free_cuda_memory_gb(device: torch.device) -> float:
    """Return the free memory of a CUDA device in GB."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return free / 1024**3


def decode_latents(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    *,
    roi_latent: Sequence[int] | None,
    overlap: float,
    output_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Decode latents (B, C, x, y, z) to images (B, 1, X, Y, Z), window by window when they are large.

    Upstream's rule (``dynamic_infer`` in CTMR ``scripts/utils.py``): when ``roi_latent`` is None or the
    latent has no more voxels than one window (``x·y·z <= prod(roi_latent)``, whatever the per-axis
    sizes), the decoder runs once on the whole latent. Otherwise a gaussian-blended sliding window,
    each axis of the window capped at the latent's, runs the decoder on the latents' device and
    accumulates the output on ``output_device``, so the peak memory of the decoder is set by the window.
    """
    import torch
    from monai.inferers import SlidingWindowInferer

    spatial = tuple(int(s) for s in latents.shape[2:])
    if roi_latent is None or math.prod(spatial) <= math.prod(int(r) for r in roi_latent):
        return decode_fn(latents).to(output_device)
    roi = tuple(min(int(r), s) for r, s in zip(roi_latent, spatial, strict=True))
    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=1,
        overlap=float(overlap),
        mode="gaussian",
        sw_device=latents.device,
        device=torch.device(output_device),
        progress=False,
    )
    return inferer(latents, decode_fn)
