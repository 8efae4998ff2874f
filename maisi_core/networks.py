"""Build the VAE, diffusion UNet and ControlNet from configs with MONAI's MAISI network classes.

Device policy: the released configs ask for fp16 group norms and flash attention, which only work on
CUDA. On any other device (CPU, meta) the builders switch ``norm_float16`` and the UNet's
``use_flash_attention`` off; neither changes the parameters, so released weights still load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiConvolution,
    MaisiGroupNorm3D,
)
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.nets.controlnet import ControlNetConditioningEmbedding

from maisi_core.config import AutoencoderConfig, ControlNetConfig, DiffusionUNetConfig
from maisi_core.errors import ConfigError

logger = logging.getLogger(__name__)


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def adapt_for_device(cfg, device: torch.device | str):
    """Return ``cfg`` with the CUDA-only options switched off when ``device`` is not CUDA."""
    if _is_cuda(device):
        return cfg
    changes = {}
    if getattr(cfg, "norm_float16", False):
        changes["norm_float16"] = False
    if isinstance(cfg, DiffusionUNetConfig) and cfg.use_flash_attention:
        changes["use_flash_attention"] = False
    if changes:
        logger.debug("%s on %s: switching off %s", type(cfg).__name__, device, sorted(changes))
        cfg = cfg.replace(**changes)
    return cfg


def _build(cls, cfg, device: torch.device | str) -> torch.nn.Module:
    kwargs = adapt_for_device(cfg, device).to_kwargs()
    try:
        with torch.device(device):
            module = cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(
            f"{cls.__name__} expects a valid configuration, but got {type(cfg).__name__} that MONAI "
            f"rejected: {exc}"
        ) from exc
    return module.eval()


def build_vae(cfg: AutoencoderConfig, device: torch.device | str = "cpu") -> AutoencoderKlMaisi:
    """Build the volume-compression VAE (image (B, 1, X, Y, Z) ↔ latent (B, C, X/f, Y/f, Z/f))."""
    return _build(AutoencoderKlMaisi, cfg, device)


def build_unet(cfg: DiffusionUNetConfig, device: torch.device | str = "cpu") -> DiffusionModelUNetMaisi:
    """Build the latent diffusion UNet."""
    return _build(DiffusionModelUNetMaisi, cfg, device)


def build_controlnet(cfg: ControlNetConfig, device: torch.device | str = "cpu") -> ControlNetMaisi:
    """Build the ControlNet (mask (B, 8, X, Y, Z) → residuals for the UNet's skip connections)."""
    return _build(ControlNetMaisi, cfg, device)


# (id(embedding module), id(conditioning tensor)) -> (tensor, output, autocast dtype or None), per context
_COND_CACHE: ContextVar[dict[tuple[int, int], tuple] | None] = ContextVar("controlnet_cond_cache", default=None)


class _ReusedConditioningEmbedding:
    """Mixin for MONAI's ControlNet conditioning embedding: inside :func:`reuse_controlnet_conditioning`
    and without autograd, the same input tensor object is embedded once (the embedding runs at full image
    resolution and does not depend on the timestep, so a denoising loop would redo it at every step)."""

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        cache = _COND_CACHE.get()
        if cache is None or torch.is_grad_enabled():
            return super().forward(conditioning)  # type: ignore[misc]
        amp = torch.get_autocast_dtype(conditioning.device.type) if torch.is_autocast_enabled(
            conditioning.device.type) else None
        key = (id(self), id(conditioning))
        hit = cache.get(key)
        if hit is not None and hit[0] is conditioning and hit[2] == amp:
            return hit[1]
        out = super().forward(conditioning)  # type: ignore[misc]
        cache[key] = (conditioning, out, amp)  # holding the input keeps its id from being reused
        return out


class ReusedControlNetConditioningEmbedding(_ReusedConditioningEmbedding, ControlNetConditioningEmbedding):
    """MONAI's ControlNet conditioning embedding with the reuse of :func:`reuse_controlnet_conditioning`."""


def enable_conditioning_reuse(controlnet: torch.nn.Module) -> None:
    """Let the ControlNet's conditioning embedding take part in :func:`reuse_controlnet_conditioning`.

    The module's class becomes a subclass with a caching ``forward`` (for MONAI's own embedding class an
    importable one, so the network still pickles); parameters and state-dict keys stay.
    """
    emb = controlnet.controlnet_cond_embedding
    if isinstance(emb, _ReusedConditioningEmbedding):
        return
    if type(emb) is ControlNetConditioningEmbedding:
        emb.__class__ = ReusedControlNetConditioningEmbedding
    else:  # another embedding class: a subclass made here (not picklable by name)
        emb.__class__ = type(f"Reused{type(emb).__name__}", (_ReusedConditioningEmbedding, type(emb)), {})


@contextmanager
def reuse_controlnet_conditioning() -> Iterator[None]:
    """Within this block (in this thread or task only), embed each ControlNet conditioning tensor once.

    The caller promises not to modify a conditioning tensor in place inside the block; the cached
    embeddings are dropped when it ends. Outside such a block, and whenever autograd is on, nothing is
    cached.
    """
    token = _COND_CACHE.set({})
    try:
        yield
    finally:
        _COND_CACHE.reset(token)


def count_parameters(module: torch.nn.Module) -> int:
    """Return the number of parameters of a module (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def set_vae_num_splits(vae: AutoencoderKlMaisi, num_splits: int) -> None:
    """Set the tensor-split count of every MAISI convolution of the VAE (a memory/speed knob).

    Splitting convolutions along ``dim_split`` bounds the activation memory of each convolution; it does
    not change the parameters.
    """
    if num_splits < 1:
        raise ConfigError(f"set_vae_num_splits expects num_splits >= 1, but got num_splits={num_splits}.")
    for module in vae.modules():
        if isinstance(module, MaisiConvolution):
            module.num_splits = int(num_splits)


def set_vae_norm_float16(vae: AutoencoderKlMaisi, enabled: bool) -> None:
    """Switch the fp16 output of the VAE's group norms on or off (only valid under CUDA autocast)."""
    for module in vae.modules():
        if isinstance(module, MaisiGroupNorm3D):
            module.norm_float16 = bool(enabled)
