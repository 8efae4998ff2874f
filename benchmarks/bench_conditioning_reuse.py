"""ControlNet conditioning reuse: one 64³ case on the embedded default model, with and without it.

Baseline (named, measured in the same run): the same ``generate`` call with the conditioning embedding
recomputed at every denoising step, i.e. MONAI's own ``ControlNetMaisi.forward`` on the raw mask at each
step (``pipeline.embed_control`` made the identity, ``pipeline.controlnet_residuals`` the full forward).
Prints seconds per case for both, the speed-up, and whether the volumes are bit-identical.

    python benchmarks/bench_conditioning_reuse.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maisi_core.engine.pipeline as pipeline_module  # noqa: E402
from maisi_core import MaisiPipeline  # noqa: E402
from maisi_core.training.data import generate_phantom_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = MaisiPipeline.from_pretrained(args.model, device="cpu")
    case = generate_phantom_case(123, output_size_vox=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0),
                                 regions=("chest", "abdomen"))
    embed, residuals = pipeline_module.embed_control, pipeline_module.controlnet_residuals

    def every_step(controlnet, x, timesteps, *, control_embedding, class_labels=None):
        return controlnet(x=x, timesteps=timesteps, controlnet_cond=control_embedding, class_labels=class_labels)

    def run(with_reuse: bool) -> tuple[float, float, np.ndarray]:
        if not with_reuse:  # the raw mask goes to MONAI's forward, which embeds it at every step
            pipeline_module.embed_control = lambda controlnet, control: control
            pipeline_module.controlnet_residuals = every_step
        try:
            t = time.perf_counter()
            out = pipe.generate(case.label_map, spacing_mm=(6.0, 6.0, 6.0), seed=5)
            return time.perf_counter() - t, out.timings_s["denoise"], out.image
        finally:
            pipeline_module.embed_control, pipeline_module.controlnet_residuals = embed, residuals

    run(True)  # warm-up
    rows = {name: [run(flag) for _ in range(args.repeats)] for name, flag in (("baseline", False), ("reuse", True))}
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in rows.items()}
    same = all(np.array_equal(rows["baseline"][0][2], r[2]) for r in rows["reuse"])
    print(f"default model, 64^3, {pipe.config.scheduler.default_num_inference_steps} steps, {args.threads} thread(s), "
          f"median of {args.repeats}")
    for name, (total, denoise) in med.items():
        print(f"{name:9} total {total:6.2f} s  denoise {denoise:6.2f} s")
    print(f"reuse: {med['baseline'][0] / med['reuse'][0]:.2f}x faster per case, "
          f"{med['baseline'][1] / med['reuse'][1]:.2f}x in the denoising loop; bit-identical: {same}")


if __name__ == "__main__":
    main()
