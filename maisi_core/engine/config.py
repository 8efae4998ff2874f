"""Frozen configuration dataclasses for the MAISI networks, schedulers and pipeline, with presets.

The network configs' fields match MONAI's constructor arguments one to one
(``AutoencoderKlMaisi``, ``DiffusionModelUNetMaisi``, ``ControlNetMaisi``, ``RFlowScheduler``,
``DDPMScheduler``), so ``Network(**cfg.to_kwargs())`` builds the network. Presets:

* ``tiny()``: 32³ image, 8³ latent; for tests, runs in well under a second per step on a CPU.
* ``maisi_ct_rflow()`` / ``maisi_ct_ddpm()``: exactly the released MAISI CT architectures, read from
  the upstream network configs shipped in ``maisi_core/data``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar, Literal

from maisi_core.errors import ConfigError, did_you_mean
from maisi_core.modality import CT


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


class _ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``to_kwargs`` shared by every config dataclass."""

    _NOT_KWARGS: ClassVar[tuple[str, ...]] = ()  # fields that are not constructor arguments of the upstream class

    def to_kwargs(self) -> dict[str, Any]:
        """Return the upstream constructor's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._NOT_KWARGS}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = value.to_dict()  # type: ignore[union-attr]
            elif isinstance(value, tuple):
                value = json.loads(json.dumps(value))
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            hint = did_you_mean(unknown[0], names)
            raise ConfigError(
                f"{cls.__name__} expects only the fields {sorted(names)}, but got unknown={unknown}.{hint}"
            )
        return cls(**{k: _tupleize(v) for k, v in data.items()})

    def replace(self, **changes: Any):
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class AutoencoderConfig(_ConfigMixin):
    """Arguments of ``monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi``."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    num_res_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    latent_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    include_fc: bool = False
    use_combined_linear: bool = False
    use_flash_attention: bool = False
    use_checkpointing: bool = False
    use_convtranspose: bool = False
    num_splits: int = 16
    dim_split: int = 0
    norm_float16: bool = False
    save_mem: bool = True

    def __post_init__(self) -> None:
        n = len(self.num_channels)
        if len(self.num_res_blocks) != n or len(self.attention_levels) != n:
            raise ConfigError(
                "AutoencoderConfig expects num_res_blocks and attention_levels of the same length as "
                f"num_channels ({n}), but got num_res_blocks={self.num_res_blocks}, "
                f"attention_levels={self.attention_levels}."
            )
        bad = [c for c in self.num_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"AutoencoderConfig expects every num_channels entry divisible by norm_num_groups="
                f"{self.norm_num_groups}, but got num_channels={self.num_channels}."
            )
        if self.num_splits < 1:
            raise ConfigError(f"AutoencoderConfig expects num_splits >= 1, but got num_splits={self.num_splits}.")

    @property
    def downsample_factor(self) -> int:
        """Image voxels per latent voxel along each axis (2 per level after the first)."""
        return 2 ** (len(self.num_channels) - 1)


@dataclass(frozen=True)
class DiffusionUNetConfig(_ConfigMixin):
    """Arguments of ``monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi``."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    num_res_blocks: int | tuple[int, ...] = (2, 2, 2, 2)
    num_channels: tuple[int, ...] = (32, 64, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    num_head_channels: int | tuple[int, ...] = 8
    with_conditioning: bool = False
    transformer_num_layers: int = 1
    cross_attention_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    include_fc: bool = False
    use_combined_linear: bool = False
    use_flash_attention: bool = False
    dropout_cattn: float = 0.0
    include_top_region_index_input: bool = False
    include_bottom_region_index_input: bool = False
    include_spacing_input: bool = False

    def __post_init__(self) -> None:
        n = len(self.num_channels)
        if len(self.attention_levels) != n:
            raise ConfigError(
                f"DiffusionUNetConfig expects attention_levels of length {n} (one per num_channels entry), "
                f"but got attention_levels={self.attention_levels}."
            )

    @property
    def size_multiple(self) -> int:
        """Latent voxels each spatial axis must be divisible by (2 per downsampling level)."""
        return 2 ** (len(self.num_channels) - 1)


@dataclass(frozen=True)
class ControlNetConfig(_ConfigMixin):
    """Arguments of ``monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi``."""

    spatial_dims: int
    in_channels: int
    num_res_blocks: int | tuple[int, ...] = (2, 2, 2, 2)
    num_channels: tuple[int, ...] = (32, 64, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    num_head_channels: int | tuple[int, ...] = 8
    with_conditioning: bool = False
    transformer_num_layers: int = 1
    cross_attention_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    conditioning_embedding_in_channels: int = 1
    conditioning_embedding_num_channels: tuple[int, ...] = (16, 32, 96, 256)
    use_checkpointing: bool = True
    include_fc: bool = False
    use_combined_linear: bool = False
    use_flash_attention: bool = False

    @property
    def condition_downsample_factor(self) -> int:
        """Mask voxels per latent voxel of the conditioning embedding (2 per level after the first)."""
        return 2 ** (len(self.conditioning_embedding_num_channels) - 1)


@dataclass(frozen=True)
class RFlowSchedulerConfig(_ConfigMixin):
    """Arguments of ``monai.networks.schedulers.RFlowScheduler`` (MAISI-v2), plus the step count."""

    _NOT_KWARGS: ClassVar[tuple[str, ...]] = ("default_num_inference_steps",)  # ours, not the scheduler's

    name: ClassVar[str] = "rflow"
    num_train_timesteps: int = 1000
    use_discrete_timesteps: bool = True
    sample_method: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    use_timestep_transform: bool = False
    transform_scale: float = 1.0
    steps_offset: int = 0
    base_img_size_numel: int = 32768
    spatial_dim: int = 3
    default_num_inference_steps: int = 30

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **super().to_dict()}


@dataclass(frozen=True)
class DDPMSchedulerConfig(_ConfigMixin):
    """Arguments of ``monai.networks.schedulers.DDPMScheduler`` (MAISI-v1), plus the step count."""

    _NOT_KWARGS: ClassVar[tuple[str, ...]] = ("default_num_inference_steps",)  # ours, not the scheduler's

    name: ClassVar[str] = "ddpm"
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    default_num_inference_steps: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **super().to_dict()}


SchedulerConfig = RFlowSchedulerConfig | DDPMSchedulerConfig
SCHEDULER_CONFIGS: dict[str, type] = {"rflow": RFlowSchedulerConfig, "ddpm": DDPMSchedulerConfig}


def scheduler_config_from_dict(data: dict[str, Any]) -> SchedulerConfig:
    """Build a scheduler config from ``{"name": "rflow" | "ddpm", ...}``."""
    data = dict(data)
    name = data.pop("name", "rflow")
    if name not in SCHEDULER_CONFIGS:
        raise ConfigError(
            f"scheduler_config_from_dict expects name in {sorted(SCHEDULER_CONFIGS)}, but got name={name!r}."
            + did_you_mean(name, SCHEDULER_CONFIGS)
        )
    return SCHEDULER_CONFIGS[name].from_dict(data)


@dataclass(frozen=True)
class GeometryRules(_ConfigMixin):
    """Output size, spacing and field-of-view rules a preset enforces (see maisi_core.engine.geometry).

    ``allowed_*_sizes`` empty means any size that is a multiple of ``size_multiple_vox``.
    """

    allowed_xy_sizes: tuple[int, ...] = ()
    allowed_z_sizes: tuple[int, ...] = ()
    require_square_xy: bool = False
    spacing_xy_range_mm: tuple[float, float] = (0.1, 20.0)
    spacing_z_range_mm: tuple[float, float] = (0.1, 20.0)
    require_equal_xy_spacing: bool = False
    min_fov_xy_mm: float = 0.0
    size_multiple_vox: int = 1


# Field names of model directories saved by earlier versions, and what they are called now.
_RENAMED_FIELDS = {"intensity_range_hu": "intensity_range", "background_hu": "background_value"}


@dataclass(frozen=True)
class PipelineConfig(_ConfigMixin):
    """Everything needed to build and run a MAISI pipeline, besides the weights.

    Attributes:
        conditioning: ``"modality"`` (rflow-ct: class label added to the time embedding) or
            ``"body_region"`` (ddpm-ct: top/bottom region one-hots).
        scale_factor: latent scale; the released models store theirs with the weights.
        modality: the model's modality code (:mod:`maisi_core.modality`; 1 = CT), used when a request
            names none.
        intensity_range: the range, in the unit of ``modality``'s family (HU for CT), that the VAE's
            [0, 1] output maps to. Requests of the other family use that family's
            :class:`~maisi_core.modality.IntensityConvention`.
        background_value: the value written where the label map is 0 (outside the body), same unit.
        decode_roi_latent: sliding-window size in latent voxels for decoding (None: whole volume), used
            when no memory preset is given; the latent is decoded whole when it has no more voxels than
            the window (see :func:`maisi_core.engine.decoding.decode_latents`).
        decode_overlap: the sliding window's overlap fraction.
    """

    name: str
    vae: AutoencoderConfig
    unet: DiffusionUNetConfig
    controlnet: ControlNetConfig
    scheduler: RFlowSchedulerConfig | DDPMSchedulerConfig
    geometry: GeometryRules = field(default_factory=GeometryRules)
    conditioning: Literal["modality", "body_region"] = "modality"
    modality: int = 1
    scale_factor: float = 1.0
    intensity_range: tuple[float, float] = CT.output_range
    background_value: float = CT.background
    decode_roi_latent: tuple[int, int, int] | None = None
    decode_overlap: float = 0.4
    licence: str = "Apache-2.0 (architecture); weights: see the model index"

    def __post_init__(self) -> None:
        if self.conditioning not in ("modality", "body_region"):
            raise ConfigError(
                "PipelineConfig expects conditioning in ['body_region', 'modality'], but got "
                f"conditioning={self.conditioning!r}."
            )
        lat = self.vae.latent_channels
        if self.unet.in_channels != lat or self.controlnet.in_channels != lat:
            raise ConfigError(
                f"PipelineConfig expects the UNet and ControlNet to take the VAE's latent_channels={lat}, "
                f"but got unet.in_channels={self.unet.in_channels}, "
                f"controlnet.in_channels={self.controlnet.in_channels}."
            )
        if self.controlnet.condition_downsample_factor != self.vae.downsample_factor:
            raise ConfigError(
                "PipelineConfig expects the ControlNet's conditioning embedding to downsample as much as the "
                f"VAE ({self.vae.downsample_factor}x), but got conditioning_embedding_num_channels="
                f"{self.controlnet.conditioning_embedding_num_channels}."
            )

    @property
    def size_multiple_vox(self) -> int:
        """Image voxels each axis must be divisible by (VAE factor × UNet factor)."""
        return self.vae.downsample_factor * self.unet.size_multiple

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        for old, new in _RENAMED_FIELDS.items():  # model directories saved before the rename
            if old in data:
                data.setdefault(new, data.pop(old))
        parts = {
            "vae": AutoencoderConfig.from_dict(data.pop("vae")),
            "unet": DiffusionUNetConfig.from_dict(data.pop("unet")),
            "controlnet": ControlNetConfig.from_dict(data.pop("controlnet")),
            "scheduler": scheduler_config_from_dict(data.pop("scheduler")),
        }
        if "geometry" in data:
            parts["geometry"] = GeometryRules.from_dict(data.pop("geometry"))
        return super().from_dict({**data, **parts})


# ---------------------------------------------------------------------------------------------
# The official configs, read from the upstream network JSON shipped with the package.


@lru_cache(maxsize=2)
def _upstream_network_config(variant: str) -> dict[str, Any]:
    text = resources.files("maisi_core").joinpath(f"data/config_network_{variant}.json").read_text()
    raw = json.loads(text)

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@"):
            return resolve(raw[value[1:]])
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items() if k != "_target_"}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return {k: resolve(v) for k, v in raw.items()}


def _from_upstream(cls: type, block: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: _tupleize(v) for k, v in block.items() if k in names})


MAISI_CT_GEOMETRY = GeometryRules(
    allowed_xy_sizes=(256, 384, 512),
    allowed_z_sizes=(128, 256, 384, 512, 640, 768),
    require_square_xy=True,
    spacing_xy_range_mm=(0.5, 3.0),
    spacing_z_range_mm=(0.5, 5.0),
    require_equal_xy_spacing=True,
    min_fov_xy_mm=256.0,
    size_multiple_vox=32,
)


# The paired (ControlNet) sampler's decode window and overlap in CTMR configs/config_infer.json. The
# upstream image-only script (diff_model_infer.py) hard-codes [80, 80, 80] / 0.4 instead; the pipeline
# uses one window for both paths (the tiling only changes seams, not what is decoded); the ``80g``
# decode preset reproduces the image-only script's window.
UPSTREAM_DECODE_ROI_LATENT: tuple[int, int, int] = (48, 48, 48)
UPSTREAM_DECODE_OVERLAP = 0.6666


def _maisi_ct(variant: str) -> PipelineConfig:
    net = _upstream_network_config(variant)
    if variant == "rflow":
        scheduler: SchedulerConfig = _from_upstream(RFlowSchedulerConfig, net["noise_scheduler"])
    else:
        scheduler = _from_upstream(DDPMSchedulerConfig, net["noise_scheduler"])
    return PipelineConfig(
        name=f"maisi_ct_{variant}",
        vae=_from_upstream(AutoencoderConfig, net["autoencoder_def"]),
        unet=_from_upstream(DiffusionUNetConfig, net["diffusion_unet_def"]),
        controlnet=_from_upstream(ControlNetConfig, net["controlnet_def"]),
        scheduler=scheduler,
        geometry=MAISI_CT_GEOMETRY,
        conditioning="modality" if variant == "rflow" else "body_region",
        modality=1,
        decode_roi_latent=UPSTREAM_DECODE_ROI_LATENT,
        decode_overlap=UPSTREAM_DECODE_OVERLAP,
        licence="NVIDIA Open Model License (released MAISI CT weights); code Apache-2.0",
    )
