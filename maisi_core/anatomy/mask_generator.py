"""MAISI's own mask generator (mask source A): a DDPM over a mask-VAE latent, conditioned on 10 organ sizes.

For users who have the released files ``mask_generation_autoencoder.pt`` (a raw state dict) and
``mask_generation_diffusion_unet.pt`` (``unet_state_dict`` and ``scale_factor``). Both are read with
``torch.load(weights_only=True)`` only; a checkpoint that needs other pickled objects is refused.

Steps of :meth:`MaskGenerator.generate`: draw the latent noise from the seed; run the DDPM loop
with the size vector as cross-attention context ``(1, 1, 10)``; decode ``latent / scale_factor``
to 125-channel logits; take the argmax; remap the 0-124 indices to MAISI IDs
(``label_dict_124_to_132.json``, 124 -> body 200); post-process.

Post-processing is deliberately lighter than upstream's ``general_mask_generation_post_process``:
only the largest body component is kept and tumours that were not requested (and the generator's
``kidney mass`` class, which has no slot in the CT label dictionary) are relabelled as their host
organ. Upstream's per-organ largest-component filtering, morphological refilling and special
handling of lung, liver and colon tumours are omitted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from maisi_core.anatomy import labels
from maisi_core.engine.weights import load_torch_checkpoint
from maisi_core.errors import ConfigError, MaskSourceError, WeightsError
from maisi_core.anatomy.mask_remap import resample_label_map
from maisi_core.anatomy.mask_types import GeneratorOptions, MaskRequest, MaskResult, place_requested_tumor

logger = logging.getLogger(__name__)

SIZE_VECTOR_NAMES: tuple[str, ...] = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
GENERATED_SPACING_MM = (1.5, 1.5, 1.5)  # upstream's fixed output spacing of the mask generator
KIDNEY_MASS_ID = 129
_CPU_OVERRIDES = {"norm_float16": False, "use_flash_attention": False}


@dataclass(frozen=True)
class MaskGeneratorConfig:
    """Constructor arguments of the mask VAE, the mask diffusion UNet and the DDPM scheduler.

    Attributes:
        autoencoder: keyword arguments of ``AutoencoderKlMaisi``.
        diffusion: keyword arguments of ``monai.networks.nets.DiffusionModelUNet``.
        scheduler: keyword arguments of ``monai.networks.schedulers.DDPMScheduler``.
        latent_shape: ``(C, X, Y, Z)`` of the latent.
        scale_factor: latent scale used when no checkpoint provides one.
    """

    autoencoder: Mapping[str, Any]
    diffusion: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    latent_shape: tuple[int, int, int, int]
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("autoencoder", "diffusion", "scheduler"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "latent_shape", tuple(int(v) for v in self.latent_shape))

    @classmethod
    def official(cls, *, use_checkpointing: bool = False) -> MaskGeneratorConfig:
        """The released architecture, read from ``data/config_network_rflow.json`` (CPU-safe flags)."""
        text = resources.files("maisi_core").joinpath("data/config_network_rflow.json").read_text()
        raw = json.loads(text)
        refs = {f"@{k}": v for k, v in raw.items() if not isinstance(v, (dict, list))}
        resolve = lambda block: {k: refs.get(v, v) if isinstance(v, str) else v  # noqa: E731
                                 for k, v in raw[block].items() if k != "_target_"}
        autoencoder = {**resolve("mask_generation_autoencoder_def"), **_CPU_OVERRIDES,
                       "use_checkpointing": use_checkpointing}
        diffusion = {**resolve("mask_generation_diffusion_def"), "use_flash_attention": False}
        return cls(autoencoder=autoencoder, diffusion=diffusion, scheduler=resolve("mask_generation_noise_scheduler"),
                   latent_shape=tuple(raw["mask_generation_latent_shape"]),
                   scale_factor=float(raw["mask_generation_scale_factor"]))

    @classmethod
    def tiny(cls) -> MaskGeneratorConfig:
        """A tiny architecture for tests: a ``(4, 8, 8, 8)`` latent decoded to 125 x 32^3 logits."""
        autoencoder = {
            "spatial_dims": 3, "in_channels": 8, "out_channels": 125, "latent_channels": 4,
            "num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8, "norm_eps": 1e-6,
            "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False, "use_convtranspose": True, "num_splits": 1, "dim_split": 1,
            **_CPU_OVERRIDES, "use_checkpointing": False,
        }
        diffusion = {
            "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "channels": [8, 8, 8],
            "attention_levels": [False, False, True], "num_head_channels": [0, 0, 8], "num_res_blocks": 1,
            "norm_num_groups": 8, "with_conditioning": True, "cross_attention_dim": 10, "upcast_attention": True,
            "use_flash_attention": False,
        }
        scheduler = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
                     "schedule": "scaled_linear_beta", "clip_sample": False}
        return cls(autoencoder=autoencoder, diffusion=diffusion, scheduler=scheduler, latent_shape=(4, 8, 8, 8))


def build_mask_autoencoder(config: MaskGeneratorConfig) -> torch.nn.Module:
    """Build the mask VAE (8 -> 125 channels) with random weights."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(**dict(config.autoencoder))


def build_mask_diffusion(config: MaskGeneratorConfig) -> torch.nn.Module:
    """Build the mask diffusion UNet (cross-attention on the 10-value size vector) with random weights."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**dict(config.diffusion))


def load_weights(path: str | os.PathLike, *, who: str) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; never unpickle anything else.

    Raises:
        WeightsNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs arbitrary pickled objects.
        WeightsError: the file holds no dict.
    """
    obj = load_torch_checkpoint(path, who=who, what=f"path={str(path)!r}")
    if not isinstance(obj, dict):
        raise WeightsError(f"{who} expects a dict checkpoint, but got {type(obj).__name__} in path={str(path)!r}.")
    return obj


def _load_state(module: torch.nn.Module, state: Mapping[str, Any], *, who: str, path) -> None:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{who} expects a state dict of the configured architecture, but got path={str(path)!r} with "
            f"missing={list(result.missing_keys)[:5]} unexpected={list(result.unexpected_keys)[:5]}. "
            "Check the MaskGeneratorConfig against the checkpoint."
        )


@lru_cache(maxsize=1)
def index_to_label_lut() -> np.ndarray:
    """Return the 125-entry lookup table from generator indices to MAISI IDs (124 -> body 200)."""
    text = resources.files("maisi_core").joinpath("data/label_dict_124_to_132.json").read_text()
    lut = np.zeros(125, dtype=np.uint8)
    for index, label in json.loads(text).values():
        lut[int(index)] = int(label)
    return lut


@dataclass(eq=False)
class MaskGenerator:
    """The mask VAE, the mask diffusion UNet and their DDPM scheduler."""

    autoencoder: torch.nn.Module
    diffusion: torch.nn.Module
    config: MaskGeneratorConfig
    scale_factor: float = 1.0
    scheduler: Any = field(default=None)

    def __post_init__(self) -> None:
        from monai.networks.schedulers import DDPMScheduler

        if self.scheduler is None:
            self.scheduler = DDPMScheduler(**dict(self.config.scheduler))
        self.autoencoder.eval()
        self.diffusion.eval()

    @classmethod
    def from_config(cls, config: MaskGeneratorConfig | str = "tiny", *, seed: int = 0) -> MaskGenerator:
        """Build a generator with random weights from a config or a preset name (``tiny``, ``official``)."""
        if isinstance(config, str):
            presets = {"tiny": MaskGeneratorConfig.tiny, "official": MaskGeneratorConfig.official}
            if config not in presets:
                raise ConfigError(f"MaskGenerator.from_config expects one of {sorted(presets)}, but got config={config!r}.")
            config = presets[config]()
        torch.manual_seed(int(seed))
        return cls(build_mask_autoencoder(config), build_mask_diffusion(config), config, config.scale_factor)

    @classmethod
    def from_checkpoints(cls, config: MaskGeneratorConfig, *, autoencoder_path: str | os.PathLike,
                         diffusion_path: str | os.PathLike) -> MaskGenerator:
        """Load the released checkpoints (VAE: raw state dict; UNet: ``unet_state_dict`` + ``scale_factor``)."""
        who = "MaskGenerator.from_checkpoints"
        generator = cls.from_config(config)
        vae_state = load_weights(autoencoder_path, who=who)
        vae_state = vae_state.get("unet_state_dict", vae_state)
        _load_state(generator.autoencoder, vae_state, who=who, path=autoencoder_path)
        unet = load_weights(diffusion_path, who=who)
        if "unet_state_dict" not in unet:
            raise WeightsError(
                f"{who} expects the diffusion checkpoint to hold 'unet_state_dict' (and 'scale_factor'), "
                f"but got keys={sorted(unet)[:8]} in path={str(diffusion_path)!r}."
            )
        _load_state(generator.diffusion, unet["unet_state_dict"], who=who, path=diffusion_path)
        if "scale_factor" in unet:
            generator.scale_factor = float(torch.as_tensor(unet["scale_factor"]).reshape(-1)[0])
        return generator

    @torch.no_grad()
    def generate(
        self,
        size_vector: Sequence[float],
        *,
        seed: int,
        num_inference_steps: int = 1000,
        latent_shape: Sequence[int] | None = None,
        keep_tumors: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Sample one label map.

        Args:
            size_vector: 10 organ sizes in [0, 1] (or -1), order :data:`SIZE_VECTOR_NAMES`.
            seed: seed of the latent noise and the DDPM steps.
            num_inference_steps: DDPM steps (upstream uses 1000).
            latent_shape: ``(C, X, Y, Z)``; defaults to the config's.
            keep_tumors: tumour IDs to keep; None keeps those with a positive size.

        Returns:
            MAISI IDs ``(X, Y, Z)`` (uint8) at :data:`GENERATED_SPACING_MM`.
        """
        sizes = check_size_vector(size_vector)
        if int(num_inference_steps) < 1:
            raise ConfigError(f"MaskGenerator.generate expects num_inference_steps >= 1, but got {num_inference_steps}.")
        shape = tuple(int(v) for v in (latent_shape or self.config.latent_shape))
        generator = torch.Generator().manual_seed(int(seed))
        latent = torch.randn((1, *shape), generator=generator)
        context = torch.tensor(sizes, dtype=torch.float32).reshape(1, 1, 10)
        self.scheduler.set_timesteps(int(num_inference_steps))
        for t in self.scheduler.timesteps:
            output = self.diffusion(latent, timesteps=torch.as_tensor([int(t)]), context=context)
            latent, _ = self.scheduler.step(output, int(t), latent, generator=generator)
        logits = self.autoencoder.decode_stage_2_outputs(latent / self.scale_factor)
        indices = torch.argmax(logits, dim=1)[0].cpu().numpy()
        label_map = index_to_label_lut()[indices]
        if keep_tumors is None:
            keep_tumors = [labels.label_id(n) for n, s in zip(SIZE_VECTOR_NAMES[5:], sizes[5:]) if s > 0]
        return postprocess_generated_mask(label_map, keep_tumors=keep_tumors)


def check_size_vector(size_vector: Sequence[float]) -> list[float]:
    """Return the 10 sizes as floats; each must be -1 (remove) or in [0, 1]."""
    values = [float(v) for v in size_vector]
    if len(values) != 10 or any(not (v == -1.0 or 0.0 <= v <= 1.0) for v in values):
        raise MaskSourceError(
            f"MaskGenerator expects a size vector of 10 values in [0, 1] or -1, ordered {list(SIZE_VECTOR_NAMES)}, "
            f"but got size_vector={values!r}."
        )
    return values


def postprocess_generated_mask(label_map: np.ndarray, *, keep_tumors: Sequence[int]) -> np.ndarray:
    """Keep the largest body component and relabel unrequested tumours (and kidney mass) as host organs."""
    out = np.array(label_map, dtype=np.uint8, copy=True)
    components, count = ndimage.label(out != labels.BACKGROUND_ID)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[(components != int(np.argmax(sizes))) & (components != 0)] = labels.BACKGROUND_ID
    hosts = {**labels.TUMOR_HOSTS, KIDNEY_MASS_ID: labels.KIDNEY_IDS}
    for tumor, host_ids in hosts.items():
        mask = out == tumor
        if tumor in keep_tumors or not mask.any():
            continue
        host_mask = np.isin(out, host_ids)
        if not host_mask.any():
            out[mask] = labels.BODY_ID
            continue
        _, nearest = ndimage.distance_transform_edt(~host_mask, return_indices=True)
        out[mask] = out[tuple(n[mask] for n in nearest)]
    return out


def generate_mask_for_request(request: MaskRequest) -> MaskResult:
    """The ``maisi_mask_generator`` mask source: generate at 1.5 mm, resample, place the requested tumour."""
    from maisi_core.engine.geometry import affine_from_spacing

    opts = request.options
    if not isinstance(opts, GeneratorOptions):
        raise MaskSourceError(f"generate_mask_for_request expects GeneratorOptions, but got "
                              f"options={type(opts).__name__}.")
    sizes = check_size_vector(list(opts.size_vector) if opts.size_vector is not None else [0.5] * 5 + [0.0] * 5)
    raw = opts.generator.generate(sizes, seed=request.seed, num_inference_steps=int(opts.num_inference_steps),
                                  latent_shape=opts.latent_shape)
    label_map, affine = resample_label_map(raw, affine_from_spacing(GENERATED_SPACING_MM, raw.shape),
                                           spacing_mm=request.spacing_mm, output_size_vox=request.output_size_vox)
    tumors = place_requested_tumor(label_map, affine, request)
    digest = hashlib.sha256(json.dumps(sizes).encode()).hexdigest()[:12]
    return MaskResult(label_map, affine, "maisi_mask_generator", f"maisi_mask_generator:{request.seed}:{digest}", tumors)
