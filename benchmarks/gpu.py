"""Full MAISI-v2 CT architecture (maisi_ct_rflow, random weights) on a GPU: time per stage, peak memory.

Runs the paired pipeline (ControlNet + UNet + sliding-window VAE decode) at 256x256x128 and 512x512x512
for each decode memory preset, 30 rectified-flow steps, and prints seconds per stage and peak GPU
memory. Published reference (NV-Generate-CTMR docs/performance.md, A100 80 GB): 512^3 in about 48-51 s
with rectified flow, peak 22.8-45.3 GB depending on the decode preset.

    python benchmarks/gpu.py [--sizes 256x256x128 512x512x512] [--presets 24g 80g] [--precision fp16]

``--device cpu --preset tiny --sizes 32x32x32`` runs the same script as a smoke test without a GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from maisi_core import MaisiPipeline, presets
from maisi_core.engine.decoding import get_decode_preset


def synthetic_label_map(size: tuple[int, int, int]) -> np.ndarray:
    """Body (200) as an elliptic cylinder with liver (1), spleen (3), kidneys (5, 14) and lung lobes."""
    x, y, z = np.ogrid[: size[0], : size[1], : size[2]]
    cx, cy = size[0] / 2, size[1] / 2
    lm = np.zeros(size, np.uint8)
    body = ((x - cx) / (0.45 * size[0])) ** 2 + ((y - cy) / (0.32 * size[1])) ** 2 <= 1
    lm[np.broadcast_to(body, size)] = 200

    def blob(label, c, r):
        m = sum(((g - ci * s) / (ri * s)) ** 2 for g, ci, ri, s in zip((x, y, z), c, r, size)) <= 1
        lm[m] = label

    blob(1, (0.35, 0.5, 0.3), (0.12, 0.1, 0.12))
    blob(3, (0.68, 0.55, 0.3), (0.06, 0.06, 0.08))
    blob(5, (0.4, 0.62, 0.22), (0.04, 0.04, 0.07))
    blob(14, (0.6, 0.62, 0.22), (0.04, 0.04, 0.07))
    blob(30, (0.35, 0.5, 0.75), (0.1, 0.12, 0.15))
    blob(28, (0.65, 0.5, 0.75), (0.1, 0.12, 0.15))
    return lm


def run(args) -> list[dict]:
    """Time every (size, decode preset); the networks are built once and warmed up with a 2-step run."""
    device = torch.device(args.device)
    preset = presets.get_preset(args.preset)
    base = MaisiPipeline.from_config(preset, device=device, precision=args.precision)
    spacing = (args.spacing,) * 2 + (args.spacing_z,)
    results = []
    for k, size_s in enumerate(args.sizes):
        size = tuple(int(v) for v in size_s.split("x"))
        lm = synthetic_label_map(size)
        for dp in args.presets:
            pipe = MaisiPipeline(base.config, base.vae, base.unet, base.controlnet, device=base.device,
                                 precision=args.precision,
                                 decode_preset=None if dp == "none" else get_decode_preset(dp))
            if k == 0 and dp == args.presets[0]:  # cuDNN autotuning and lazy CUDA init stay out of the timings
                pipe.generate(lm, spacing_mm=spacing, seed=0, num_inference_steps=2)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            out = pipe.generate(lm, spacing_mm=spacing, seed=0, num_inference_steps=args.steps)
            wall = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")
            row = {"size": size_s, "decode_preset": dp, "precision": args.precision, "steps": args.steps,
                   "denoise_s": out.timings_s["denoise"], "decode_s": out.timings_s["decode"], "total_s": wall,
                   "peak_gb": peak, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
            results.append(row)
            print(json.dumps(row), flush=True)
            del pipe, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="maisi_ct_rflow")
    ap.add_argument("--sizes", nargs="+", default=["256x256x128", "512x512x512"])
    ap.add_argument("--presets", nargs="+", default=["24g", "32g", "80g"], help="decode presets (or 'none')")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--spacing", type=float, default=1.0)
    ap.add_argument("--spacing-z", type=float, default=1.0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    rows = run(args)
    print(f"\n{'size':>12} {'decode':>6} {'denoise s':>9} {'decode s':>8} {'total s':>8} {'peak GB':>8}")
    for r in rows:
        print(f"{r['size']:>12} {r['decode_preset']:>6} {r['denoise_s']:9.1f} {r['decode_s']:8.1f} "
              f"{r['total_s']:8.1f} {r['peak_gb']:8.1f}")
    print("reference (A100 80 GB, upstream docs): 512^3 rflow total 48-51 s, peak 22.8 (24g) / 28.4 (32g) / 45.3 GB (80g)")


if __name__ == "__main__":
    main()
