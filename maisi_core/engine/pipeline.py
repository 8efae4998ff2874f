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

:meth:`MaisiPipeline.generate_batch` runs several masks of one size through the same steps: 1-5 and the
mask embedding (6a, :meth:`MaisiPipeline.embed_conditions`) per case, the denoising loop once for the
stacked batch, 7 and 8 per case. Each case draws its noise from its own seed, so it gets the volume it
gets alone up to float rounding; :mod:`maisi_core.engine.batching` says how many to batch.

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
        timings_s: seconds per stage (``denoise``, ``decode``, ``total``...); in a batch, the shared stages
            are this case's share and ``denoise_batch`` is the whole loop.
        batch_size: how many cases were denoised together with this one (itself included).
    """

    image: np.ndarray
    modality: str
    label_map: np.ndarray | None
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    seed: int | None
    num_inference_steps: int
    timings_s: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


@dataclass(frozen=True)
class Conditioning:
    """Tensors the UNet and ControlNet take besides the latent, one row per case."""

    spacing: torch.Tensor
    class_labels: torch.Tensor | None
    top_region: torch.Tensor | None
    bottom_region: torch.Tensor | None

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """The cases' conditioning stacked along the batch dimension, in order."""
        if len(items) == 1:
            return items[0]

        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(c, name) for c in items]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(*(stack(f.name) for f in dataclasses.fields(Conditioning)))


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

    This is MAISI's ControlNet input encoding (not one-hot); IDs must lie in 0..255. The bits are made in
    one byte a voxel and converted once: besides the float32 result (32 bytes a voxel, 4 GiB at 512^3),
    8 bytes a voxel, where eight int64 planes and their concatenation took 128.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=label_map.device).view(1, 8, 1, 1, 1)
    return ((label_map.to(torch.uint8) >> shifts) & 1).to(torch.float32)


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
        self._case_memory: dict = {}  # output size -> batching.CaseMemory measured on this device
        self._batch_caps: dict = {}  # output size -> the largest batch known to fit after an out-of-memory split

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
        return self._generate_split([request], [int(seed)], num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, callback=callback)[0]

    def generate_batch(
        self,
        label_maps: Sequence[np.ndarray],
        *,
        spacing_mm: Sequence[float],
        seeds: Sequence[int],
        num_inference_steps: int | None = None,
        affines: Sequence[np.ndarray | None] | None = None,
        modality: int | None = None,
        guidance_scale: float = 0.0,
        callback: StepCallback | None = None,
    ) -> list[GenerationOutput]:
        """Generate one volume per label map, denoising them together; the volumes of one at a time, up to rounding.

        Each case draws its noise from its own generator seeded by its seed, exactly as :meth:`generate`
        does, and the networks treat the cases of a batch independently. The kernels of another batch
        size sum in another order, so a volume differs from batch 1 by float rounding (about 0.005 HU;
        ``tests/test_batching.py``); the same batch repeats its bits. A batch that runs out of CUDA
        memory is split in halves (and the size remembered, see :meth:`suggest_batch_size`).

        Raises:
            ConfigError: label maps of different sizes, or seeds and maps of different counts.
        """
        if len(seeds) != len(label_maps) or (affines is not None and len(affines) != len(label_maps)):
            raise ConfigError(
                f"MaisiPipeline.generate_batch expects one seed (and affine) per label map, but got "
                f"{len(label_maps)} label maps, seeds={len(seeds)}"
                f"{'' if affines is None else f', affines={len(affines)}'}."
            )
        spacing = tuple(float(s) for s in spacing_mm)
        requests = [GenerationRequest(spacing_mm=spacing, label_map=lm, modality=modality,  # type: ignore[arg-type]
                                      affine=None if affines is None else affines[i])
                    for i, lm in enumerate(label_maps)]
        return self._generate_split(requests, [int(s) for s in seeds], num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, callback=callback)

    def _generate_split(self, requests: list[GenerationRequest], seeds: list[int], **kwargs) -> list[GenerationOutput]:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        try:
            outputs = self.run_batch(requests, generators=generators, **kwargs)
        except torch.OutOfMemoryError:
            if len(requests) == 1:
                raise
            half = len(requests) // 2
            size = tuple(np.shape(requests[0].label_map)) if requests[0].label_map is not None else None
            self._batch_caps[size] = min(self._batch_caps.get(size, half), half)
            logger.warning("a batch of %d cases ran out of device memory; splitting it into %d and %d",
                           len(requests), half, len(requests) - half)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return (self._generate_split(requests[:half], seeds[:half], **kwargs)
                    + self._generate_split(requests[half:], seeds[half:], **kwargs))
        return [dataclasses.replace(out, seed=seed) for out, seed in zip(outputs, seeds, strict=True)]

    def suggest_batch_size(self, size_vox: Sequence[int], spacing_mm: Sequence[float], *, limit: int) -> int:
        """How many cases of this size to denoise together (at most ``limit``).

        On a CPU, :func:`maisi_core.engine.batching.cpu_batch_size` of the latent. On CUDA the per-case
        memory is measured once per size (:func:`maisi_core.engine.batching.measure_case_memory`) and the
        free memory read at each call; a size that once ran out of memory keeps the smaller batch.
        """
        from maisi_core.engine import batching

        if limit <= 1:
            return 1
        size = tuple(int(s) for s in size_vox)
        if self.device.type != "cuda":
            _, *spatial = geometry.latent_shape(self.config, size)
            return batching.cpu_batch_size(int(np.prod(spatial)), limit=limit)
        if size not in self._case_memory:
            self._case_memory[size] = batching.measure_case_memory(self, size, tuple(float(s) for s in spacing_mm))
        n = batching.batch_size_for_memory(batching.available_cuda_bytes(self.device), self._case_memory[size],
                                           limit=limit)
        return min(n, self._batch_caps.get(size, n))

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
        """Run the numbered steps for one request and return the volume in HU (a batch of one)."""
        return self.run_batch([request], generators=[generator], latents=None if latents is None else [latents],
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              callback=callback)[0]

    @torch.no_grad()
    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        generators: Sequence[torch.Generator | None],
        latents: Sequence[torch.Tensor] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 0.0,
        callback: StepCallback | None = None,
    ) -> list[GenerationOutput]:
        """Run the numbered steps for requests of one output size; denoise together, decode one by one.

        Steps 1-5 run per request; their conditioning, noise and mask embeddings are stacked; step 6 runs
        once for the batch; steps 7 and 8 run per case, so the decode preset bounds the peak as for one
        case. Each output's ``timings_s`` has its own ``decode`` and ``postprocess``, its share of the
        batch's ``prepare`` and ``denoise``, and ``denoise_batch``, the whole loop's time.
        """
        t0 = time.perf_counter()
        who = f"MaisiPipeline[{self.config.name}]"
        steps = int(num_inference_steps or self.config.scheduler.default_num_inference_steps)
        checked = [self.check_inputs(r) for r in requests]  # the model's rules first, whatever the device
        if self.device.type == "meta":
            raise DeviceError(
                "MaisiPipeline expects real weights to generate, but got device='meta'. "
                "Build with device='cpu' or 'cuda', or load weights with from_pretrained."
            )
        sizes = sorted({size for size, _, _ in checked})
        if len(sizes) != 1 or len({lm is None for _, _, lm in checked}) != 1:
            raise ConfigError(
                f"{who} expects a batch of one output size, all with label maps or all without, but got "
                f"sizes={sizes}. Batch only cases that share size and spacing."
            )
        if len(generators) != len(requests) or (latents is not None and len(latents) != len(requests)):
            raise ConfigError(
                f"{who} expects one generator (and latent) per request, but got {len(requests)} requests and "
                f"generators={len(generators)}."
            )
        size = sizes[0]
        conds = [self.prepare_conditioning(spacing, label_map=lm, body_region=r.body_region, modality=r.modality)
                 for r, (_, spacing, lm) in zip(requests, checked)]
        lat_shape = geometry.latent_shape(self.config, size)
        plan = self.prepare_timesteps(steps, lat_shape[1:])
        x = torch.cat([self.prepare_latents(lat_shape, generator=g, latents=None if latents is None else latents[i])
                       for i, g in enumerate(generators)])
        emb, uncond_emb, uncond_cond = self.embed_conditions([lm for _, _, lm in checked], conds, guidance_scale)
        t1 = time.perf_counter()
        x = self.denoise(x, plan, control_embedding=emb, cond=Conditioning.cat(conds), guidance_scale=guidance_scale,
                         generator=list(generators), uncond_embedding=uncond_emb, uncond_cond=uncond_cond,
                         callback=callback)
        del emb, uncond_emb
        t2 = time.perf_counter()
        n = len(requests)
        outputs = []
        for i, (request, (_, spacing, label_map)) in enumerate(zip(requests, checked)):
            t3 = time.perf_counter()
            image = self.decode(x[i:i + 1])
            t4 = time.perf_counter()
            intensities = self.postprocess(image, label_map, request.modality)
            affine = request.affine if request.affine is not None else geometry.affine_from_spacing(spacing, size)
            t5 = time.perf_counter()
            timings = {"prepare": (t1 - t0) / n, "denoise": (t2 - t1) / n, "denoise_batch": t2 - t1,
                       "decode": t4 - t3, "postprocess": t5 - t4}
            timings["total"] = timings["prepare"] + timings["denoise"] + timings["decode"] + timings["postprocess"]
            outputs.append(GenerationOutput(
                image=intensities, modality=self.intensity_convention(request.modality).name, label_map=label_map,
                affine=np.asarray(affine, dtype=np.float64), spacing_mm=spacing, seed=None,
                num_inference_steps=steps, timings_s=timings, batch_size=n,
            ))
        return outputs

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
        timesteps = t.reshape(1).to(self.device).expand(x.shape[0])
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

    def embed_conditions(
        self, label_maps: Sequence[np.ndarray | None], conds: Sequence[Conditioning], guidance_scale: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Conditioning | None]:
        """Step 6a: the ControlNet's mask embeddings (and guidance's unconditional ones), stacked over the cases.

        The embedding does not depend on the timestep, so it is computed once per case and passed to every
        step. Masks are encoded and embedded one at a time, so only one full-resolution mask is on the
        device at once however large the batch.

        Returns:
            (the embeddings (B, C, x, y, z) or None without masks, the unconditional embeddings or None
            without guidance, the unconditional conditioning or None without guidance).
        """
        embs, uncond_embs, uncond_conds = [], [], []
        with self._autocast():
            for label_map, cond in zip(label_maps, conds, strict=True):
                uncond_control, uncond_cond = self.prepare_guidance(label_map, cond, guidance_scale)
                emb = None if label_map is None else embed_control(self.controlnet, self.prepare_control(label_map))
                embs.append(emb)
                uncond_embs.append(emb if uncond_control is None else embed_control(self.controlnet, uncond_control))
                uncond_conds.append(uncond_cond)
                del uncond_control
        emb = _stack(embs)
        if not guidance_scale:
            return emb, None, None
        return emb, _stack(uncond_embs), Conditioning.cat(uncond_conds)

    def denoise(
        self,
        latents: torch.Tensor,
        plan: TimestepPlan,
        *,
        control_embedding: torch.Tensor | None,
        cond: Conditioning,
        guidance_scale: float = 0.0,
        uncond_embedding: torch.Tensor | None = None,
        uncond_cond: Conditioning | None = None,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Step 6: the denoising loop, ControlNet → UNet → scheduler, for each timestep, over the whole batch.

        ``generator`` is one per case (DDPM's step noise is drawn per case, as at batch 1) or one for all.
        """
        x = latents
        total = len(plan)
        with self._autocast():
            for i, (t, t_next) in enumerate(zip(plan.timesteps, plan.next_timesteps, strict=True)):
                out = self._velocity(x, t, control_embedding, cond)
                if guidance_scale and uncond_cond is not None:
                    out_u = self._velocity(x, t, uncond_embedding, uncond_cond)
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


def _stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The cases' tensors along the batch dimension (a batch of one is its tensor, not a copy)."""
    if tensors[0] is None:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


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
