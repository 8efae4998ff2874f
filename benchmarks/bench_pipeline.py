"""Tiny-pipeline speed on the CPU: seconds per denoising step, per stage, fp32 vs bf16 autocast.

Baseline (named, measured in the same run): the image-only step (UNet alone, no ControlNet); the
paired step (ControlNet → UNet) is reported as a ratio against it.

    python benchmarks/bench_pipeline.py [--steps 30] [--repeats 3] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from maisi_core import MaisiPipeline, presets


def label_map(size: int) -> np.ndarray:
    lm = np.zeros((size,) * 3, np.uint8)
    q = size // 8
    lm[q:-q, q:-q, q:-q] = 200
    lm[2 * q:4 * q, 2 * q:4 * q, 2 * q:5 * q] = 1
    lm[5 * q:6 * q, 2 * q:4 * q, 2 * q:5 * q] = 3
    return lm


def time_generate(pipe: MaisiPipeline, lm, size: int, steps: int, repeats: int, paired: bool) -> dict[str, float]:
    runs = []
    for r in range(repeats + 1):  # first run is warm-up
        out = pipe.generate(lm if paired else None, spacing_mm=(1.5,) * 3,
                            output_size_vox=None if paired else (size,) * 3, seed=r, num_inference_steps=steps)
        if r:
            runs.append(out.timings_s)
    return {k: statistics.median(t[k] for t in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = label_map(args.size)
    print(f"tiny preset, {args.size}^3 image, {args.steps} steps, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.repeats}")
    rows = []
    for precision in ("fp32", "bf16"):
        pipe = MaisiPipeline.from_config(presets.tiny(), device="cpu", precision=precision)
        base = time_generate(pipe, lm, args.size, args.steps, args.repeats, paired=False)
        paired = time_generate(pipe, lm, args.size, args.steps, args.repeats, paired=True)
        rows.append((precision, base, paired))
    fp32_paired = rows[0][2]["denoise"] / args.steps
    print(f"{'precision':9} {'path':10} {'s/step':>8} {'decode s':>9} {'total s':>8} {'vs baseline':>12}")
    for precision, base, paired in rows:
        b_step = base["denoise"] / args.steps
        for name, t in (("image-only", base), ("paired", paired)):
            step = t["denoise"] / args.steps
            print(f"{precision:9} {name:10} {step:8.4f} {t['decode']:9.3f} {t['total']:8.3f} {step / b_step:11.2f}x")
    print(f"paired fp32 step: {fp32_paired * 1000:.1f} ms (baseline = image-only step of the same precision)")


if __name__ == "__main__":
    main()
