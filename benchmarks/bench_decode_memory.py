"""Peak memory of VAE decoding against volume size: whole-volume decode vs sliding-window decode.

Each point runs in a fresh subprocess, which builds the VAE, allocates the latent and records its peak
resident memory before and after decoding (``ru_maxrss``; on CUDA ``max_memory_allocated``). The
named baseline is the whole-volume decode of the same latent; the sliding-window decode (window
``--roi`` latent voxels, gaussian overlap 0.25) should stay flat as the volume grows, set by the window.

    python benchmarks/bench_decode_memory.py [--vae mid|official] [--latents 8 16 24 32] [--roi 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from maisi_core.engine.config import AutoencoderConfig
from maisi_core.engine.decoding import decode_latents
from maisi_core.engine.networks import build_vae, set_vae_num_splits

VAES = {
    # a mid-size VAE with the official layout (3 levels, x4 downsampling) that decodes quickly on a CPU
    "mid": AutoencoderConfig(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                             num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1),
                             attention_levels=(False, False, False), norm_num_groups=16,
                             num_splits=1, dim_split=1),
}


def _vae_config(name: str) -> AutoencoderConfig:
    if name == "official":
        from maisi_core import presets

        return presets.maisi_ct_rflow().vae
    return VAES[name]


def child(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = build_vae(_vae_config(args.vae), device)
    set_vae_num_splits(vae, args.splits)
    z = torch.randn(1, 4, args.latent, args.latent, args.latent, generator=torch.Generator().manual_seed(0)).to(device)
    roi = None if args.roi == 0 else (args.roi,) * 3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    with torch.no_grad():
        image = decode_latents(vae.decode_stage_2_outputs, z, roi_latent=roi, overlap=0.25)
    seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"latent": args.latent, "roi": args.roi, "image": list(image.shape[2:]),
                      "peak_extra_mb": (peak - before) / 2**20, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default="mid", choices=["mid", "official"])
    ap.add_argument("--latents", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--roi", type=int, default=8, help="sliding-window size in latent voxels (0 = whole volume)")
    ap.add_argument("--splits", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"VAE '{args.vae}', device {args.device}, window {args.roi}^3 latent voxels, splits {args.splits}")
    print(f"{'image':>12} {'whole MB':>9} {'whole s':>8} {'window MB':>10} {'window s':>9} {'mem ratio':>10}")
    for lat in args.latents:
        res = {}
        for roi in (0, args.roi):
            cmd = [sys.executable, __file__, "--child", "--latent", str(lat), "--roi", str(roi), "--vae", args.vae,
                   "--splits", str(args.splits), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res[roi] = json.loads(out)
        w, s = res[0], res[args.roi]
        print(f"{'x'.join(map(str, w['image'])):>12} {w['peak_extra_mb']:9.0f} {w['seconds']:8.2f} "
              f"{s['peak_extra_mb']:10.0f} {s['seconds']:9.2f} {s['peak_extra_mb'] / max(w['peak_extra_mb'], 1):9.2f}x")
    print("mem ratio = sliding-window peak / whole-volume peak (baseline)")


if __name__ == "__main__":
    main()
