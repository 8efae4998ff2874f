"""Batched generation against one case at a time: cases per hour, peak memory, and whether the voxels agree.

Both arms run the same cases through the factory's own path (``factory.case.run_cases``: phantom mask,
generation, QC, NIfTI writes) with the same model, seeds and settings; only ``batch_size`` differs.
The baseline is the first batch size listed (batch 1 by default), measured in the same run. Each arm gets a warm-up (two one-step cases, at its
own batch size) so lazy CUDA start-up and kernel selection stay out of both timings.

    # GPU (issue 16): the full MAISI-v2 CT architecture, random weights, 30 steps, fp16; arms: batch 1,
    # batch auto, batch auto with QC and writes overlapping the next batch's generation
    python benchmarks/bench_batching.py --model preset:maisi_ct_rflow --sizes 256x256x128 512x512x128 \
        --cases 8 --batches 1:off auto:off auto:on
    # CPU: the shipped default model at 64^3
    python benchmarks/bench_batching.py --model default --sizes 64x64x64 --spacing 4 --cases 8 \
        --batches 1:off 2:off 4:off 8:off --steps 20

The seeded presets (``preset:maisi_ct_rflow``, ``preset:default``) have zero-initialised ControlNet and UNet
output layers: their timing is real (the convolutions run in full), but their difference column is 0
trivially. A trained model directory (``--model default``, the shipped one) shows the real difference.

Prints one JSON line per (size, batch) and a table: cases/hour, its ratio to batch 1, the batch sizes
the cases actually ran at (``generation_batch`` of their records), peak GPU memory, and the largest
voxel difference against batch 1 in the written int16 files (HU) and the share of voxels that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPEC = """\
name: batching
version: "1"
model: {model}
output_root: {root}
seed: 16
cohorts:
  - name: bench
    count: {cases}
    body_region: [chest, abdomen]
    output_size: [{x}, {y}, {z}]
    spacing_mm: [{sx}, {sx}, {sz}]
    num_inference_steps: {steps}
    qc: {{organ_hu_check: false, orientation_check: false, tumor_check: false, agreement_check: false,
          max_retries: 0}}
"""


def _spec(args, root: Path, size: tuple[int, int, int], cases: int, steps: int):
    from factory.spec import parse_spec

    sx = args.spacing or 1.0
    sz = args.spacing_z or args.spacing or 2.5
    return parse_spec(SPEC.format(model=args.model, root=root, cases=cases, x=size[0], y=size[1], z=size[2],
                                  sx=sx, sz=sz, steps=steps))


def _run(args, generator, size, batch, root: Path, cases: int, steps: int, overlap: bool | None = None
         ) -> tuple[float, list]:
    from catalog.root import DatasetRoot
    from factory.case import run_cases
    from factory.plan import plan_dataset

    requests = plan_dataset(_spec(args, root, size, cases, steps)).cases
    t0 = time.perf_counter()
    results = run_cases(requests, generator, root=DatasetRoot.of(root), code_version="bench", batch_size=batch,
                        overlap=overlap)
    return time.perf_counter() - t0, results


def _voxels(root: Path) -> dict[str, object]:
    import nibabel as nib

    return {p.name: nib.load(p).get_fdata(dtype="float32") for p in sorted((root / "images").glob("*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:maisi_ct_rflow")
    parser.add_argument("--sizes", nargs="+", default=["256x256x128", "512x512x128"])
    parser.add_argument("--spacing", type=float, default=None, help="x/y spacing in mm (default 1.0)")
    parser.add_argument("--spacing-z", type=float, default=None)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batches", nargs="+", default=["1:off", "auto:off", "auto:on"],
                        help="arms BATCH[:on|off|auto]: a batch size (a number or auto) and whether QC and writes "
                             "overlap the next batch's generation (default auto: on CUDA); the first is the baseline")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode-preset", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()

    import numpy as np
    import torch

    from factory.case import get_generator

    generator = get_generator("maisi", args.model, args.device, args.decode_preset, args.precision)
    device = torch.device(generator.device)
    cuda = device.type == "cuda"
    print(f"# {args.model} on {torch.cuda.get_device_name(device) if cuda else 'cpu'}, precision "
          f"{generator.precision}, {args.steps} steps, {args.cases} cases per arm, torch {torch.__version__}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_text in args.sizes:
            size = tuple(int(v) for v in size_text.split("x"))
            reference = None
            for arm in args.batches:
                batch_text, _, overlap_text = arm.partition(":")
                batch = batch_text if batch_text == "auto" else int(batch_text)
                overlap = {"on": True, "off": False, "auto": None, "": None}[overlap_text]
                warm = Path(tmp) / f"warm-{size_text}-{arm.replace(':', '-')}"
                _run(args, generator, size, batch, warm, 2 if batch != 1 else 1, 1, overlap)
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                root = Path(tmp) / f"{size_text}-{arm.replace(':', '-')}"
                wall, results = _run(args, generator, size, batch, root, args.cases, args.steps, overlap)
                if cuda:
                    torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else float("nan")
                voxels = _voxels(root)
                if reference is None:
                    reference = voxels
                shared = [k for k in voxels if k in reference]
                diff = max((float(np.abs(voxels[k] - reference[k]).max()) for k in shared), default=float("nan"))
                differing = (sum(int(np.count_nonzero(voxels[k] != reference[k])) for k in shared)
                             / max(1, sum(voxels[k].size for k in shared)))
                records = [r for r in results if hasattr(r, "generation_batch")]
                row = {"size": size_text, "batch": arm, "cases": args.cases,
                       "passed": sum(r.status == "passed" for r in records), "wall_s": round(wall, 2),
                       "cases_per_hour": round(3600 * args.cases / wall, 1),
                       "ran_at": sorted({r.generation_batch for r in records}),
                       "peak_gb": round(peak, 2), "max_abs_diff_hu": diff, "voxels_differing": differing}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| size | batch | ran at | cases/hour | vs batch 1 | peak GB | max |diff| HU vs batch 1 | voxels differing |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"])
        print(f"| {row['size']} | {row['batch']} | {row['ran_at']} | {row['cases_per_hour']} | "
              f"{row['cases_per_hour'] / base['cases_per_hour']:.2f}x | {row['peak_gb']} | {row['max_abs_diff_hu']} | "
              f"{row['voxels_differing']:.2e} |")


if __name__ == "__main__":
    main()
