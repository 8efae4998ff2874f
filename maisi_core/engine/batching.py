"""How many cases to denoise together: the memory rule, its measurement on CUDA, and the limits.

Cases that share an output size go through the ControlNet and the UNet as one batch (see
:meth:`maisi_core.engine.pipeline.MaisiPipeline.generate_batch`); the VAE decodes them one at a time,
so the decode preset bounds the decoding peak whatever the batch. What a batch adds is, per case, the
denoising loop's working set: the latent, the ControlNet's mask embedding (held for every step) and one
network evaluation's activations. :func:`measure_case_memory` measures those on the device with one
evaluation at batch 1, and :func:`batch_size_for_memory` turns free memory into a batch size.

On a CPU batching pays too, for small latents: a convolution over a few cases keeps the cores busier
than one over a single small case. ``benchmarks/bench_batching.py`` with the shipped default model on 2
cores measured 1.75-2.17x the cases per hour at 64^3 (latent 16^3) for batches of 2-8 and 1.41-1.49x at
128^3 (latent 32^3) for 2-4. :func:`cpu_batch_size` batches up to 4 cases while the batch's latent stays
within 4 x 32^3 voxels; larger cases (256x256x128 and up) stay alone, unmeasured.

A batch is not bit-identical to batch 1: the convolution kernels sum in another order for another batch
size, so a case's float volume moves by about 0.005 HU (0.004-0.007 measured) and its int16 file by 1 HU
in a few voxels. The same batch gives the same bits again; ``runtime.generation_batch`` is 1 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from maisi_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

CPU_MAX_BATCH = 4  # the gain had levelled off at 4 in both measurements
CPU_LATENT_VOXELS = 4 * 32**3  # a batch's latent voxels on a CPU: 4 cases of 128^3 (latent 32^3), 1 of 256x256x128
HEADROOM = 0.8  # fraction of the free memory a batch may plan to use: allocator fragmentation, cuDNN workspaces
MAX_AUTO_BATCH = 8  # more cases per batch add little once the GPU is busy, and a lost batch loses them all


@dataclass(frozen=True)
class CaseMemory:
    """Bytes one case of a given output size needs on the device while it is denoised.

    Attributes:
        per_case: held for every case of a batch for the whole loop (latent, mask embedding) plus one
            evaluation's activations, which grow with the batch.
        transient: the peak of embedding one mask at full resolution; masks are embedded one at a time,
            so it is paid once, not per case.
    """

    per_case: int
    transient: int


def batch_size_for_memory(free_bytes: int, memory: CaseMemory, *, limit: int, headroom: float = HEADROOM) -> int:
    """Return how many cases fit: ``floor((headroom * free - transient) / per_case)``, within ``[1, limit]``.

    Raises:
        ConfigError: a limit below 1 or a non-positive per-case size.
    """
    if limit < 1:
        raise ConfigError(f"batch_size_for_memory expects limit >= 1, but got limit={limit}.")
    if memory.per_case <= 0:
        raise ConfigError(f"batch_size_for_memory expects per_case > 0 bytes, but got per_case={memory.per_case}.")
    usable = headroom * max(0, int(free_bytes)) - max(0, memory.transient)
    return max(1, min(int(limit), math.floor(usable / memory.per_case)))


def cpu_batch_size(latent_voxels: int, *, limit: int) -> int:
    """Cases per batch on a CPU: as many as keep the batch's latent within :data:`CPU_LATENT_VOXELS`, 1 to 4."""
    return max(1, min(int(limit), CPU_MAX_BATCH, CPU_LATENT_VOXELS // max(1, int(latent_voxels))))


def available_cuda_bytes(device: torch.device) -> int:
    """Free device memory plus what torch's allocator holds cached but unused (it can hand that out again)."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def measure_case_memory(pipeline: Any, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> CaseMemory:
    """Measure :class:`CaseMemory` on the pipeline's CUDA device: one mask embedding and one evaluation at batch 1.

    Runs the ControlNet embedding on an all-body mask and one ControlNet + UNet evaluation on a zero
    latent, at the pipeline's precision, and reads the allocator's peaks. Costs about one denoising step.
    """
    import numpy as np
    import torch

    from maisi_core.anatomy.labels import BODY_ID
    from maisi_core.engine import geometry
    from maisi_core.engine.networks import embed_control

    device = pipeline.device
    if device.type != "cuda":
        raise ConfigError(f"measure_case_memory expects a CUDA pipeline, but got device={device}.")
    label_map = np.full(size, BODY_ID, dtype=np.uint8)
    # a body-region model reads its regions from the map; an all-body map has none, so name one
    cond = pipeline.prepare_conditioning(spacing, label_map=label_map, body_region="abdomen")
    lat_shape = geometry.latent_shape(pipeline.config, size)
    plan = pipeline.prepare_timesteps(1, lat_shape[1:])
    with torch.no_grad(), pipeline._autocast():
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        control = pipeline.prepare_control(label_map)
        emb = embed_control(pipeline.controlnet, control)
        del control
        torch.cuda.synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - base
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.zeros((1, *lat_shape), device=emb.device)
        out = pipeline._velocity(x, plan.timesteps[0], emb, cond)
        torch.cuda.synchronize(device)
        step = torch.cuda.max_memory_allocated(device) - held
        del out, x, emb
    return CaseMemory(per_case=int(step + (held - base)), transient=int(transient))
