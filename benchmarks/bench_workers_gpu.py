"""Generation on 1, 2, ... Dask worker processes sharing the GPUs: cases per hour against one worker.

The GPU half of issue 16, item 3. ``benchmarks/bench_dask.py`` proves the Prefect flow's Dask fan-out on
a CPU with a stub; this runs the real model on Dask workers without Prefect (the GPU image has no
Prefect, and the orchestration is not what is measured here), through the same pieces the flow's case
task uses: a ``distributed.LocalCluster`` whose workers advertise ``GPU`` resources, tasks annotated
with one GPU each, ``flows.runtime.worker_device`` (worker ``i`` takes GPU ``i mod count``), the
per-process model cache (``factory.models``) and ``factory.case.run_cases``. The baseline is the first
worker count listed (one by default), measured in the same run.

    python benchmarks/bench_workers_gpu.py --model preset:maisi_ct_rflow --size 256x256x128 --cases 8 \
        --workers 1 2
    python benchmarks/bench_workers_gpu.py --model preset:tiny --size 32x32x32 --spacing 8 --device cpu \
        --cases 4 --workers 1 2 --steps 1        # CPU smoke test

Prints per worker count: the wall time, the time until every worker had finished its first task (process
start, imports and the model load, once per worker), steady-state cases per hour after that and their
ratio to the baseline, the model loads seen (one per worker process), and each worker's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_batching import SPEC  # noqa: E402  (the same cohort: QC off, random weights)


def work(spec_text: str, indices: list[int], root: str, device: str, precision: str, decode_preset: str,
         batch: int | str) -> dict:
    """One task on a worker: a few cases of the spec, with this worker's GPU and its cached model."""
    import torch

    from catalog.root import DatasetRoot
    from factory.case import get_generator, run_cases
    from factory.models import take_load_seconds
    from factory.plan import plan_dataset
    from factory.spec import parse_spec
    from flows.runtime import worker_device

    requests = [plan_dataset(parse_spec(spec_text)).cases[i] for i in indices]
    take_load_seconds()
    generator = get_generator("maisi", requests[0].model_ref, worker_device(device, spread_gpus=True),
                              decode_preset, precision)
    loaded = take_load_seconds()
    results = run_cases(requests, generator, root=DatasetRoot.of(root), code_version="bench", batch_size=batch)
    dev = torch.device(generator.device)
    peak = torch.cuda.max_memory_allocated(dev) / 1024**3 if dev.type == "cuda" else float("nan")
    return {"pid": os.getpid(), "device": generator.device, "loaded_s": loaded, "end": time.time(), "peak_gb": peak,
            "passed": sum(getattr(r, "status", "") == "passed" for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:maisi_ct_rflow")
    parser.add_argument("--size", default="256x256x128")
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--spacing-z", type=float, default=2.5)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases-per-task", type=int, default=1)
    parser.add_argument("--batch", default="1", help="generation batch inside a task (a number or auto)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode-preset", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    size = [int(v) for v in args.size.split("x")]
    batch = args.batch if args.batch == "auto" else int(args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            root = f"{tmp}/w{n}"
            spec_text = SPEC.format(model=args.model, root=root, cases=args.cases, x=size[0], y=size[1], z=size[2],
                                    sx=args.spacing, sz=args.spacing_z, steps=args.steps)
            tasks = [list(range(i, min(args.cases, i + args.cases_per_task)))
                     for i in range(0, args.cases, args.cases_per_task)]
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, resources={"GPU": 1},
                              dashboard_address=None) as cluster, Client(cluster) as client:
                t0 = time.time()
                with dask.annotate(resources={"GPU": 1}):
                    futures = [client.submit(work, spec_text, t, root, args.device, args.precision,
                                             args.decode_preset, batch, pure=False) for t in tasks]
                results = client.gather(futures)
                wall = time.time() - t0
            ends = sorted(r["end"] - t0 for r in results)
            first_pids, warm_until = set(), 0.0
            for r in sorted(results, key=lambda r: r["end"]):  # until every worker has finished a task
                if r["pid"] not in first_pids:
                    first_pids.add(r["pid"])
                    warm_until = r["end"] - t0
            steady = [e for e in ends if e > warm_until]
            steady_cases = len(steady) * args.cases_per_task
            row = {"workers": n, "cases": args.cases, "size": args.size, "wall_s": round(wall, 1),
                   "warm_until_s": round(warm_until, 1),
                   "steady_cases_per_hour": round(3600 * steady_cases / (ends[-1] - warm_until), 1)
                   if steady else float("nan"),
                   "model_loads": sum(r["loaded_s"] is not None for r in results),
                   "worker_processes": len({r["pid"] for r in results}),
                   "devices": sorted({r["device"] for r in results}),
                   "peak_gb_per_worker": [round(max(r["peak_gb"] for r in results if r["pid"] == pid), 2)
                                          for pid in sorted({r["pid"] for r in results})],
                   "passed": sum(r["passed"] for r in results)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    base = rows[0]
    print(f"\n{args.model} {args.size}, {args.steps} steps, {args.cases} cases; baseline: {base['workers']} worker(s)")
    print("| workers | wall s | warm-up s | steady cases/hour | vs baseline | model loads | peak GB per worker |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["steady_cases_per_hour"] / base["steady_cases_per_hour"]
        print(f"| {row['workers']} | {row['wall_s']} | {row['warm_until_s']} | {row['steady_cases_per_hour']} | "
              f"{ratio:.2f}x | {row['model_loads']} | {row['peak_gb_per_worker']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
