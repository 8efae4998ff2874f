"""``MaisiPipeline``: label map (or region/modality) + spacing + seed → a volume (CT: Hounsfield units).

Every call runs the same numbered steps, each a public method:

1. :meth:`MaisiPipeline.check_inputs`: output size, spacing and field of view against the preset's
   rules; the label map against the MAISI vocabulary (unknown IDs, shape, body label 200).
2. :meth:`MaisiPipeline.prepare_control`: the label map as the ControlNet's 8-bit binary encoding.
3. :meth:`MaisiPipeline.prepare_conditioning`: spacing (mm × 100), modality class or body-region
   one-hots (× 100).
4. :meth:`MaisiPipeline.prepare_timesteps`: the scheduler's timesteps for the latent size.
5. :meth:`MaisiPipeline.prepare_latents`: Gaussian noise drawn from the caller's ``torch.Generator``.
6. :meth:`MaisiPipeline.denoise`: ControlNet → UNet → scheduler, with optional classifier-free guidance.
7. :meth:`MaisiPipeline.decode`: memory-bounded VAE decoding (sliding window + tensor splits).
8. :meth:`MaisiPipeline.postprocess`: clip and map by modality (CT: [0, 1] → HU, background -1000 HU;
   MR: lower clip only, [0, 1000], background 0), affine.

The module is longer than the house's ~400 lines on purpose: like a diffusers pipeline file, it keeps the
request and output types and every numbered step of the one class together, so a reader follows a call
from top to bottom in one place; the parts that stand alone (decoding, schedulers, networks, geometry,
weights) are modules of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from maisi_core.anatomy import labels

from maisi_core.engine import geometry
from maisi_core.engine.config import PipelineConfig
from maisi_core.engine.decoding import (
    DecodePreset,
    decode_latents,
    free_cuda_memory_gb,
    get_decode_preset,
    select_decode_preset,
)
from maisi_core.errors import ConfigError, DeviceError, GeometryError, LabelMapError
from maisi_core.engine.networks import (
    build_controlnet,
    build_unet,
    build_vae,
    controlnet_residuals,
    embed_control,
    vae_decode_settings,
)
from maisi_core.engine.schedulers import TimestepPlan, build_scheduler, plan_timesteps, scheduler_step
from maisi_core.modality import IntensityConvention, convention_for_code, is_ct_code

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Give a ``label_map`` (paired path) or an ``output_size_vox`` (image-only path).

    Attributes:
        spacing_mm: voxel spacing (x, y, z) in mm.
        label_map: (X, Y, Z) integer array in MAISI label IDs, or None for the image-only path.
        output_size_vox: (X, Y, Z); taken from the label map when None.
        body_region: for the image-only path of body-region models (ddpm): one region or a
            (top, bottom) pair; for label maps the regions are read from the map.
        modality: modality class for modality models (rflow); None means the preset's (CT = 1).
        fix_body: add body label 200 around the labelled structures when the map lacks it (explicit
            fix-up, see :func:`maisi_core.anatomy.labels.add_body_label`); otherwise a map without it is refused.
        affine: the label map's (4, 4) affine; when None a centred diagonal affine is built from spacing.
    """

    spacing_mm: tuple[float, float, float]
    label_map: np.ndarray | None = None
    output_size_vox: tuple[int, int, int] | None = None
    body_region: str | tuple[str, str] | None = None
    modality: int | None = None
    fix_body: bool = False
    affine: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationOutput:
    """A generated volume.

    Attributes:
        image: (X, Y, Z) float32 intensities in the modality's unit (CT: Hounsfield units; see
            :mod:`maisi_core.modality`).
        modality: ``"CT"`` or ``"MR"``, the convention ``image`` follows.
        label_map: (X, Y, Z) label map used as the condition (None on the image-only path).
        affine: (4, 4) RAS affine of both arrays.
        spacing_mm: voxel spacing.
        timings_s: seconds per stage (``denoise``, ``decode``, ``total``...).
    """

    image: np.ndarray
    modality: str
    label_map: np.ndarray | None
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    seed: int | None
    num_inference_steps: int
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Conditioning:
    """Tensors the UNet and ControlNet take besides the latent (batch of one)."""

    spacing: torch.Tensor
    class_labels: torch.Tensor | None
    top_region: torch.Tensor | None
    bottom_region: torch.Tensor | None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the device to run on: ``"auto"``/None picks CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"MaisiPipeline expects an available device, but got device={str(device)!r} with no CUDA. "
            "Use device='cpu' or 'auto'."
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return the precision to run at: ``"auto"`` is fp16 on CUDA (upstream's autocast) and fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(
            f"MaisiPipeline expects precision in {['auto', *sorted(PRECISIONS)]}, but got precision={precision!r}."
        )
    return precision


def encode_labels_8bit(label_map: torch.Tensor) -> torch.Tensor:
    """Encode an integer label map (B, 1, X, Y, Z) as 8 binary channels (B, 8, X, Y, Z), bit k in channel k.

    This is MAISI's ControlNet input encoding (not one-hot); IDs must lie in 0..255.
    """
    ids = label_map.to(torch.int64)
    bits = [((ids >> k) & 1) for k in range(8)]
    return torch.cat(bits, dim=1).to(torch.float32)


class MaisiPipeline:
    """The three MAISI networks plus a scheduler, run as one generation pipeline.

    Build with :meth:`from_config` (random weights) or :meth:`from_pretrained` (a model directory).
    """

    def __init__(
        self,
        config: PipelineConfig,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        controlnet: torch.nn.Module,
        *,
        device: str | torch.device,
        precision: str = "auto",
        decode_preset: DecodePreset | None = None,
        scale_factor: float | None = None,
        model_digest: str | None = None,
    ) -> None:
        device = torch.device(device)  # as given; from_config and from_pretrained check it is available
        precision = resolve_precision(precision, device)
        if precision == "fp16" and device.type != "cuda":
            raise DeviceError(
                f"MaisiPipeline expects fp16 only on CUDA, but got precision='fp16' on device={device}. "
                "Use 'fp32' or 'bf16' on a CPU."
            )
        self.config = config
        self.vae, self.unet, self.controlnet = vae, unet, controlnet  # used as given, never modified
        self.device = device
        self.precision = precision
        self.scheduler = build_scheduler(config.scheduler)
        self.scale_factor = float(config.scale_factor if scale_factor is None else scale_factor)
        self.model_digest = model_digest
        self.decode_preset = decode_preset

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: PipelineConfig,
        *,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        decode_preset: str | None = None,
        init_seed: int | None = 0,
    ) -> MaisiPipeline:
        """Build a pipeline with randomly initialised networks (``device="meta"`` allocates nothing).

        Args:
            config: a preset such as ``presets.tiny()``.
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"meta"``.
            precision: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` (CUDA or CPU autocast) or
                ``fp16`` (CUDA only); :attr:`precision` holds the one in use.
            decode_preset: a memory preset name (``16g`` ...), ``"auto"`` (from free GPU memory) or None
                (the preset's own window).
            init_seed: seed for the random initialisation (None: torch's global RNG).
        """
        dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
        rng = torch.random.fork_rng(devices=[]) if init_seed is not None else contextlib.nullcontext()
        with rng:
            if init_seed is not None:
                torch.manual_seed(init_seed)
            vae = build_vae(config.vae, dev)
            unet = build_unet(config.unet, dev)
            controlnet = build_controlnet(config.controlnet, dev)
        return cls(
            config, vae, unet, controlnet, device=dev, precision=precision,
            decode_preset=cls._resolve_decode_preset(decode_preset, dev),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        decode_preset: str | None = None,
    ) -> MaisiPipeline:
        """Load a model directory written by :meth:`save_pretrained` (``"default"``: the packaged model)."""
        from maisi_core.engine.weights import load_model_dir

        dev = resolve_device(device)
        loaded = load_model_dir(path, device=dev)
        return cls(
            loaded.config, loaded.vae, loaded.unet, loaded.controlnet, device=dev, precision=precision,
            decode_preset=cls._resolve_decode_preset(decode_preset, dev), scale_factor=loaded.scale_factor,
            model_digest=loaded.digest,
        )

    def save_pretrained(self, path: str | Path, *, name: str | None = None, extra_index: dict | None = None) -> str:
        """Write the model directory (one folder per network + ``model_index.json``); return its digest."""
        from maisi_core.engine.weights import save_model_dir

        digest = save_model_dir(
            path, self.config, {"vae": self.vae, "unet": self.unet, "controlnet": self.controlnet},
            scale_factor=self.scale_factor, name=name or self.config.name, extra_index=extra_index,
        )
        self.model_digest = digest
        return digest

    @staticmethod
    def _resolve_decode_preset(name: str | None, device: torch.device) -> DecodePreset | None:
        if name is None:
            return None
        if name == "auto":
            if device.type != "cuda":
                return None
            return select_decode_preset(free_cuda_memory_gb(device))
        return get_decode_preset(name)

    # ------------------------------------------------------------------ public entry points

    def generate(
        self,
        label_map: np.ndarray | None = None,
        *,
        spacing_mm: Sequence[float],
        seed: int = 0,
        num_inference_steps: int | None = None,
        output_size_vox: Sequence[int] | None = None,
        body_region: str | tuple[str, str] | None = None,
        modality: int | None = None,
        fix_body: bool = False,
        affine: np.ndarray | None = None,
        guidance_scale: float = 0.0,
        callback: StepCallback | None = None,
    ) -> GenerationOutput:
        """Generate one volume with a per-sample generator seeded by ``seed`` (see :meth:`__call__`)."""
        request = GenerationRequest(
            spacing_mm=tuple(float(s) for s in spacing_mm),  # type: ignore[arg-type]
            label_map=label_map,
            output_size_vox=None if output_size_vox is None else tuple(int(s) for s in output_size_vox),  # type: ignore[arg-type]
            body_region=body_region, modality=modality, fix_body=fix_body, affine=affine,
        )
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        out = self(request, num_inference_steps=num_inference_steps, generator=generator,
                   guidance_scale=guidance_scale, callback=callback)
        return dataclasses.replace(out, seed=int(seed))

    @torch.no_grad()
    def __call__(
        self,
        request: GenerationRequest,
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 0.0,
        callback: StepCallback | None = None,
    ) -> GenerationOutput:
        """Run the numbered steps for one request and return the volume in HU."""
        t0 = time.perf_counter()
        steps = int(num_inference_steps or self.config.scheduler.default_num_inference_steps)
        size, spacing, label_map = self.check_inputs(request)  # the model's rules first, whatever the device
        if self.device.type == "meta":
            raise DeviceError(
                "MaisiPipeline expects real weights to generate, but got device='meta'. "
                "Build with device='cpu' or 'cuda', or load weights with from_pretrained."
            )
        control = self.prepare_control(label_map) if label_map is not None else None
        cond = self.prepare_conditioning(spacing, label_map=label_map, body_region=request.body_region,
                                         modality=request.modality)
        lat_shape = geometry.latent_shape(self.config, size)
        plan = self.prepare_timesteps(steps, lat_shape[1:])
        x = self.prepare_latents(lat_shape, generator=generator, latents=latents)
        uncond_control, uncond_cond = self.prepare_guidance(label_map, cond, guidance_scale)
        t1 = time.perf_counter()
        x = self.denoise(x, plan, control=control, cond=cond, guidance_scale=guidance_scale, generator=generator,
                         uncond_control=uncond_control, uncond_cond=uncond_cond, callback=callback)
        t2 = time.perf_counter()
        image = self.decode(x)
        t3 = time.perf_counter()
        intensities = self.postprocess(image, label_map, request.modality)
        affine = request.affine if request.affine is not None else geometry.affine_from_spacing(spacing, size)
        t4 = time.perf_counter()
        timings = {"prepare": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "postprocess": t4 - t3,
                   "total": t4 - t0}
        return GenerationOutput(
            image=intensities, modality=self.intensity_convention(request.modality).name, label_map=label_map,
            affine=np.asarray(affine, dtype=np.float64),
            spacing_mm=spacing, seed=None, num_inference_steps=steps, timings_s=timings,
        )

    # ------------------------------------------------------------------ the numbered steps

    def check_inputs(
        self, request: GenerationRequest
    ) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray | None]:
        """Step 1: validate geometry and the label map; return (size, spacing, label map or None)."""
        who = f"MaisiPipeline[{self.config.name}]"
        label_map = request.label_map
        if label_map is not None:
            label_map = np.asarray(label_map)
            if label_map.ndim != 3:
                raise LabelMapError(
                    f"{who} expects a 3D label map (X, Y, Z), but got shape={tuple(label_map.shape)}."
                )
            size_req = request.output_size_vox or tuple(label_map.shape)
        elif request.output_size_vox is not None:
            size_req = request.output_size_vox
        else:
            raise ConfigError(
                f"{who} expects a label_map or an output_size_vox, but got neither. "
                "Pass a label map (paired path) or output_size_vox (image-only path)."
            )
        size, spacing = geometry.check_geometry(self.config.geometry, size_req, request.spacing_mm, who=who)
        if label_map is not None:
            if request.fix_body and labels.BODY_ID not in np.unique(label_map):
                labels.check_label_map(label_map, expected_shape=size, require_body=False, who=who)
                label_map = labels.add_body_label(label_map)
            labels.check_label_map(label_map, expected_shape=size, require_body=True, who=who)
            label_map = label_map.astype(np.uint8 if label_map.max() <= 255 else np.uint16)
        if request.modality is not None and self.config.conditioning != "modality":
            raise ConfigError(
                f"{who} expects no modality for a body-region model, but got modality={request.modality}."
            )
        if request.affine is not None:
            _check_affine_matches_spacing(np.asarray(request.affine, dtype=np.float64), spacing, who=who)
        return size, spacing, label_map

    def prepare_control(self, label_map: np.ndarray) -> torch.Tensor:
        """Step 2: the ControlNet condition (1, 8, X, Y, Z) from a label map (X, Y, Z)."""
        # the compact map travels to the device and the 8 float channels (32 bytes a voxel) are made there
        t = torch.from_numpy(np.ascontiguousarray(label_map))[None, None].to(self.device)
        return encode_labels_8bit(t)

    def prepare_conditioning(
        self,
        spacing_mm: Sequence[float],
        *,
        label_map: np.ndarray | None = None,
        body_region: str | tuple[str, str] | None = None,
        modality: int | None = None,
    ) -> Conditioning:
        """Step 3: spacing (1, 3) × 100; modality class (1,) or top/bottom region one-hots (1, 4) × 100."""
        spacing = torch.tensor([list(spacing_mm)], dtype=torch.float32, device=self.device) * 100.0
        if self.config.conditioning == "modality":
            code = self.config.modality if modality is None else int(modality)
            return Conditioning(spacing, torch.tensor([code], dtype=torch.long, device=self.device), None, None)
        top, bottom = self._regions(label_map, body_region)
        one_hot = torch.eye(len(labels.BODY_REGIONS), dtype=torch.float32, device=self.device) * 100.0
        return Conditioning(spacing, None, one_hot[[top]], one_hot[[bottom]])

    def _regions(self, label_map: np.ndarray | None, body_region) -> tuple[int, int]:
        who = f"MaisiPipeline[{self.config.name}]"
        if label_map is not None:
            present = labels.regions_in_label_map(label_map)
            if present:
                return labels.region_index(present[0]), labels.region_index(present[-1])
        if body_region is None:
            raise ConfigError(
                f"{who} expects a body_region (one of {list(labels.BODY_REGIONS)} or a (top, bottom) pair) "
                "for a body-region model, but got body_region=None and no region markers in the label map."
            )
        pair = (body_region, body_region) if isinstance(body_region, str) else tuple(body_region)
        return labels.region_index(pair[0]), labels.region_index(pair[-1])

    def prepare_timesteps(self, num_inference_steps: int, latent_spatial_shape: Sequence[int]) -> TimestepPlan:
        """Step 4: the timesteps and their successors for this latent size."""
        return plan_timesteps(self.scheduler, num_inference_steps,
                              latent_spatial_shape=tuple(latent_spatial_shape), device=self.device)

    def prepare_latents(
        self,
        latent_shape: Sequence[int],
        *,
        generator: torch.Generator | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 5: initial noise (1, C, x, y, z), drawn on the CPU from ``generator`` so every device agrees."""
        shape = (1, *latent_shape)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ConfigError(
                    f"MaisiPipeline expects latents of shape {shape}, but got latents.shape={tuple(latents.shape)}."
                )
            return latents.to(self.device, torch.float32)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
        return noise.to(self.device)

    def prepare_guidance(
        self, label_map: np.ndarray | None, cond: Conditioning, guidance_scale: float
    ) -> tuple[torch.Tensor | None, Conditioning | None]:
        """Classifier-free guidance's unconditional branch, as upstream builds it.

        The mask (if any) with its tumours removed (:func:`maisi_core.anatomy.labels.remove_tumors`; a mask without
        tumours stays as it is) and, on modality models, modality class 0 ("unknown") in place of the
        requested one. On a body-region model without a mask there is nothing to drop, so it is refused.

        Returns:
            (the unconditional ControlNet input (1, 8, X, Y, Z), or None when it is the conditional one,
            the unconditional conditioning), or (None, None) when ``guidance_scale`` is 0.
        """
        if not guidance_scale:
            return None, None
        if label_map is None and cond.class_labels is None:
            raise ConfigError(
                f"MaisiPipeline expects guidance only with a mask or a modality model, but got "
                f"guidance_scale={guidance_scale} on a body-region model without a mask."
            )
        uncond = cond
        if cond.class_labels is not None:
            uncond = dataclasses.replace(cond, class_labels=torch.zeros_like(cond.class_labels))
        if label_map is None:
            return None, uncond
        cleaned = labels.remove_tumors(label_map)
        # None: the unconditional branch reuses the conditional mask (:meth:`denoise`)
        return (None if np.array_equal(cleaned, label_map) else self.prepare_control(cleaned)), uncond

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, control_embedding: torch.Tensor | None,
                  cond: Conditioning):
        timesteps = t.reshape(1).to(self.device)
        down, mid = None, None
        if control_embedding is not None:
            down, mid = controlnet_residuals(self.controlnet, x, timesteps, control_embedding=control_embedding,
                                             class_labels=cond.class_labels)
        kwargs = {"spacing_tensor": cond.spacing, "down_block_additional_residuals": down,
                  "mid_block_additional_residual": mid}
        if cond.class_labels is not None:
            kwargs["class_labels"] = cond.class_labels
        if cond.top_region is not None:
            kwargs["top_region_index_tensor"] = cond.top_region
            kwargs["bottom_region_index_tensor"] = cond.bottom_region
        return self.unet(x, timesteps, **kwargs).float()

    def denoise(
        self,
        latents: torch.Tensor,
        plan: TimestepPlan,
        *,
        control: torch.Tensor | None,
        cond: Conditioning,
        guidance_scale: float = 0.0,
        uncond_control: torch.Tensor | None = None,
        uncond_cond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Step 6: the denoising loop, ControlNet → UNet → scheduler, for each timestep."""
        x = latents
        total = len(plan)
        with self._autocast():
            # the mask's embedding does not depend on the timestep: computed once, passed to every step
            emb = None if control is None else embed_control(self.controlnet, control)
            uncond_emb = emb if uncond_control is None else embed_control(self.controlnet, uncond_control)
            for i, (t, t_next) in enumerate(zip(plan.timesteps, plan.next_timesteps, strict=True)):
                out = self._velocity(x, t, emb, cond)
                if guidance_scale and uncond_cond is not None:
                    out_u = self._velocity(x, t, uncond_emb, uncond_cond)
                    out = out_u + guidance_scale * (out - out_u)
                x = scheduler_step(self.scheduler, out, t, t_next, x.float(), generator=generator)
                if callback is not None:
                    callback(i + 1, total)
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Step 7: latents (1, C, x, y, z) → image (1, 1, X, Y, Z) in the VAE's [0, 1] scale, on the CPU."""
        preset = self.decode_preset
        roi = preset.roi_latent if preset else self.config.decode_roi_latent
        overlap = preset.overlap if preset else self.config.decode_overlap
        z = latents / self.scale_factor
        num_splits = preset.num_splits if preset else self.config.vae.num_splits
        # fp16 group-norm outputs (the released setting) only work under CUDA autocast
        norm_float16 = self.config.vae.norm_float16 and self.device.type == "cuda" and self.precision != "fp32"

        def decode_fn(window: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.vae.decode_stage_2_outputs(window).float()

        with vae_decode_settings(self.vae, num_splits=num_splits, norm_float16=norm_float16):
            return decode_latents(decode_fn, z, roi_latent=roi, overlap=overlap, output_device="cpu")

    def intensity_convention(self, modality: int | None = None) -> IntensityConvention:
        """Return how a request's modality code maps to intensities.

        Codes of the model's own family (CT or MR, from ``config.modality``) use the config's
        ``intensity_range`` and ``background_value``; codes of the other family use that family's
        defaults from :mod:`maisi_core.modality`, as upstream does.
        """
        code = self.config.modality if modality is None else int(modality)
        family = convention_for_code(code)
        if is_ct_code(code) != is_ct_code(self.config.modality):
            return family
        return dataclasses.replace(family, output_range=tuple(self.config.intensity_range),
                                   background=float(self.config.background_value))

    def postprocess(self, image: torch.Tensor, label_map: np.ndarray | None, modality: int | None = None) -> np.ndarray:
        """Step 8: map the VAE's [0, 1] output to intensities by modality code, as upstream does.

        CT codes (0-7, and body-region models): clip to [0, 1], map to the CT range (HU) and set voxels
        where the mask is 0 to the background (-1000 HU). MR codes (8 and above): clip below 0 only, map
        to [0, 1000] and set the background to 0. See :meth:`intensity_convention`.
        """
        convention = self.intensity_convention(modality)
        arr = image[0, 0].float()
        arr = arr.clamp(0.0, 1.0) if convention.clip_above else arr.clamp(min=0.0)
        lo, hi = convention.output_range
        out = (arr.cpu().numpy() * (hi - lo) + lo).astype(np.float32)
        if label_map is not None:
            out[label_map == labels.BACKGROUND_ID] = convention.background
        return out


def _check_affine_matches_spacing(affine: np.ndarray, spacing: tuple[float, float, float], *, who: str) -> None:
    """The affine written with the volume must place voxels at the spacing the model generated them for.

    Its column norms are the voxel sizes; an affine that says otherwise would file a volume generated at
    one spacing under another (a 0.8 mm CT read as 1.5 mm), which no later check could notice.
    """
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise GeometryError(f"{who} expects a finite (4, 4) affine, but got affine with shape={affine.shape}.")
    voxel = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    if not np.allclose(voxel, spacing, rtol=1e-3, atol=1e-4):
        raise GeometryError(
            f"{who} expects an affine whose voxel sizes equal spacing_mm={list(spacing)}, but got "
            f"affine voxel sizes={[round(v, 4) for v in voxel]}. Pass the label map's own affine and spacing, "
            "or resample the map to spacing_mm first."
        )
