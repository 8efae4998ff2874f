"""Named pipeline presets.

* ``tiny()``: test-sized networks (32³ image → 8³ latent) that run on a CPU in milliseconds per step.
* ``default()``: the embedded CPU model's architecture (64³ image at ~6 mm → 16³ latent); its
  trained weights ship in ``maisi_core/models/default`` (``MaisiPipeline.from_pretrained("default")``).
* ``maisi_ct_rflow()``: the released MAISI-v2 CT architecture (rectified flow, 30 steps, modality
  conditioning), read from the shipped upstream network config.
* ``maisi_ct_ddpm()``: the released MAISI-v1 CT architecture (DDPM, 1000 steps, body-region
  conditioning).
"""

from __future__ import annotations

from maisi_core.engine.config import (
    AutoencoderConfig,
    ControlNetConfig,
    DiffusionUNetConfig,
    GeometryRules,
    PipelineConfig,
    RFlowSchedulerConfig,
    _maisi_ct,
)
from maisi_core.errors import ConfigError, did_you_mean


def tiny() -> PipelineConfig:
    """Return the test preset: VAE channels (4, 4, 4) → a (4, 8, 8, 8) latent for a 32³ image.

    The UNet and ControlNet have channels (8, 8, 8) with attention at the deepest level, rflow style
    (spacing input, modality class embedding). Geometry: any size divisible by 16, spacing 0.1-20 mm.
    """
    return PipelineConfig(
        name="tiny",
        vae=AutoencoderConfig(
            spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
            num_channels=(4, 4, 4), num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
            norm_num_groups=4, num_splits=1, dim_split=1,
        ),
        unet=DiffusionUNetConfig(
            spatial_dims=3, in_channels=4, out_channels=4, num_channels=(8, 8, 8),
            attention_levels=(False, False, True), num_head_channels=(0, 0, 8), num_res_blocks=1,
            norm_num_groups=8, include_spacing_input=True, num_class_embeds=128, resblock_updown=True,
            include_fc=True,
        ),
        controlnet=ControlNetConfig(
            spatial_dims=3, in_channels=4, num_channels=(8, 8, 8), attention_levels=(False, False, True),
            num_head_channels=(0, 0, 8), num_res_blocks=1, norm_num_groups=8, num_class_embeds=128,
            resblock_updown=True, include_fc=True, conditioning_embedding_in_channels=8,
            conditioning_embedding_num_channels=(8, 8, 8), use_checkpointing=False,
        ),
        scheduler=RFlowSchedulerConfig(use_discrete_timesteps=False, use_timestep_transform=True, scale=1.4),
        geometry=GeometryRules(size_multiple_vox=16),
        conditioning="modality",
        decode_roi_latent=None,
        licence="Apache-2.0 (random or user-trained weights)",
    )


DEFAULT_GEOMETRY = GeometryRules(
    size_multiple_vox=16,
    spacing_xy_range_mm=(2.0, 10.0),
    spacing_z_range_mm=(2.0, 10.0),
    min_fov_xy_mm=256.0,
)


def default() -> PipelineConfig:
    """Return the embedded default model's architecture: 64³ at ~6 mm (a 384 mm torso) in seconds on a CPU.

    VAE channels (16, 32, 64), two res blocks per level, 8 groups → a (4, 16, 16, 16) latent for a 64³
    image (×4 per axis). UNet and ControlNet channels (16, 32, 64), one res block per level,
    attention only at the deepest level (4³ latent), rflow style (spacing input, 128 class embeds,
    resblock up/down, fc attention projections). The ControlNet's conditioning embedding is
    (8, 16, 32), two stride-2 convs (×4). Rectified flow with MAISI-v2's timestep shift, 25 steps.
    Geometry: sizes divisible by 16, spacing 2-10 mm, field of view >= 256 mm. 4.2 M parameters
    (17 MB in fp32); generation takes ~3.5 s per case on one CPU thread (the UNet and ControlNet stay
    small because they run 25 times per case; the VAE decodes once).
    """
    return PipelineConfig(
        name="default",
        vae=AutoencoderConfig(
            spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
            num_channels=(16, 32, 64), num_res_blocks=(2, 2, 2), attention_levels=(False, False, False),
            norm_num_groups=8, num_splits=1, dim_split=1,
        ),
        unet=DiffusionUNetConfig(
            spatial_dims=3, in_channels=4, out_channels=4, num_channels=(16, 32, 64),
            attention_levels=(False, False, True), num_head_channels=(0, 0, 32), num_res_blocks=1,
            norm_num_groups=8, include_spacing_input=True, num_class_embeds=128, resblock_updown=True,
            include_fc=True,
        ),
        controlnet=ControlNetConfig(
            spatial_dims=3, in_channels=4, num_channels=(16, 32, 64), attention_levels=(False, False, True),
            num_head_channels=(0, 0, 32), num_res_blocks=1, norm_num_groups=8, num_class_embeds=128,
            resblock_updown=True, include_fc=True, conditioning_embedding_in_channels=8,
            conditioning_embedding_num_channels=(8, 16, 32), use_checkpointing=False,
        ),
        scheduler=RFlowSchedulerConfig(
            use_discrete_timesteps=False, use_timestep_transform=True, scale=1.4, default_num_inference_steps=25,
        ),
        geometry=DEFAULT_GEOMETRY,
        conditioning="modality",
        decode_roi_latent=None,
        licence="Apache-2.0 (code and weights; trained on procedural phantoms only)",
    )


def maisi_ct_rflow() -> PipelineConfig:
    """Return the released MAISI-v2 CT architecture (rectified flow, the default)."""
    return _maisi_ct("rflow")


def maisi_ct_ddpm() -> PipelineConfig:
    """Return the released MAISI-v1 CT architecture (DDPM)."""
    return _maisi_ct("ddpm")


PRESETS = {
    "tiny": tiny,
    "default": default,
    "maisi_ct_rflow": maisi_ct_rflow,
    "maisi_ct_ddpm": maisi_ct_ddpm,
}


def get_preset(name: str) -> PipelineConfig:
    """Return a preset by name."""
    if name not in PRESETS:
        raise ConfigError(
            f"get_preset expects one of {sorted(PRESETS)}, but got name={name!r}.{did_you_mean(name, PRESETS)}"
        )
    return PRESETS[name]()
