"""Build the VAE, diffusion UNet and ControlNet from configs with MONAI's MAISI network classes.

Device policy: the released configs ask for fp16 group norms and flash attention, which only work on
CUDA. On any other device (CPU, meta) the builders switch ``norm_float16`` and the UNet's
``use_flash_attention`` off; neither changes the parameters, so released weights still load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiConvolution,
    MaisiGroupNorm3D,
)
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from maisi_core.engine.config import AutoencoderConfig, ControlNetConfig, DiffusionUNetConfig
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
def embed_control(controlnet: torch.nn.Module, control: torch.Tensor) -> torch.Tensor:
    """The ControlNet's embedding of a mask input ``(1, 8, X, Y, Z)``.

    It runs at full image resolution and does not depend on the timestep, so a denoising loop computes
    it once and passes it to :func:`controlnet_residuals` at every step.
    """
    return controlnet.controlnet_cond_embedding(control)


def controlnet_residuals(
    controlnet: torch.nn.Module,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    control_embedding: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNet's residuals for the UNet, with the mask already embedded (:func:`embed_control`).

    The same steps, in the same order, as MONAI's ``ControlNetMaisi.forward``, which embeds the mask
    itself on every call; the network is used as it is, never modified. Bit-identical to that forward
    (``tests/test_pipeline.py``).
    """
    emb = controlnet._prepare_time_and_class_embedding(x, timesteps, class_labels)
    h = controlnet._apply_initial_convolution(x)
    h = h + control_embedding
    down, h = controlnet._apply_down_blocks(emb, None, h)
    h = controlnet._apply_mid_block(emb, None, h)
    down, mid = controlnet._apply_controlnet_blocks(h, down)
    return [d * conditioning_scale for d in down], mid * conditioning_scale


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


@contextmanager
def vae_decode_settings(vae: AutoencoderKlMaisi, *, num_splits: int, norm_float16: bool) -> Iterator[None]:
    """Within this block the VAE uses ``num_splits`` and ``norm_float16``; afterwards its own values again.

    A pipeline applies its decode settings this way at each decode, so a VAE shared with another
    pipeline (or a training run) keeps the settings its owner gave it.
    """
    if num_splits < 1:
        raise ConfigError(f"vae_decode_settings expects num_splits >= 1, but got num_splits={num_splits}.")
    saved = [(m, m.num_splits) for m in vae.modules() if isinstance(m, MaisiConvolution)]
    norms = [(m, m.norm_float16) for m in vae.modules() if isinstance(m, MaisiGroupNorm3D)]
    try:
        for module, _ in saved:
            module.num_splits = int(num_splits)
        for module, _ in norms:
            module.norm_float16 = bool(norm_float16)
        yield
    finally:
        for module, value in saved:
            module.num_splits = value
        for module, value in norms:
            module.norm_float16 = value


def set_vae_norm_float16(vae: AutoencoderKlMaisi, enabled: bool) -> None:
    """Switch the fp16 output of the VAE's group norms on or off (only valid under CUDA autocast)."""
    for module in vae.modules():
        if isinstance(module, MaisiGroupNorm3D):
            module.norm_float16 = bool(enabled)
