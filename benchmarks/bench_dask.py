"""Scale-out through Dask: throughput of the generate-dataset flow on 1, 2, ... local Dask workers.

Runs the real flow (``flows.generate.run_generate``: plan, Prefect task runs on a ``DaskTaskRunner``
with a temporary ``LocalCluster`` of worker processes, NIfTI writes, catalog commits) with the
``sleep:SECONDS`` stub generator, so each worker behaves like a GPU that is busy for SECONDS per case
and the box's CPU does not limit the scaling. The baseline is one worker, measured in the same run.

    python benchmarks/bench_dask.py                       # 24 cases x 1 s on 1, 2 and 4 workers
    python benchmarks/bench_dask.py --cases 32 --workers 1 2 4 8 --sleep 2

For each worker count it prints the generate phase (fan-out plus commits, from the dataset row's
``timings_s``) and, apart from it, the steady state: cases per minute after every worker has finished
its first case (a worker's first case also pays its process start: Python imports, and on a GPU the
model load, once per worker), their ratio to one worker, and the per-case overhead in the steady
state (worker-seconds per case beyond the stub's own seconds). The LocalCluster's start and stop
(a few seconds per flow run) are outside the phase and printed apart.
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
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds per stub generation")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    from bench_orchestration import stub_spec
    from flows.generate import run_generate
    from flows.runtime import progress_listener

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        for i, workers in enumerate(args.workers):
            spec = stub_spec(f"{tmp}/w{workers}", name="dask-bench", seed=i, cases=args.cases,
                             runtime=f'batch_size: 8, dask_local_workers: {workers}, generator: "sleep:{args.sleep}", '
                                     'threads: 1')
            done: list[float] = []

            def on_event(event: str, data: dict) -> None:
                if event == "case":
                    done.append(time.perf_counter())

            t0 = time.perf_counter()
            with progress_listener(on_event):
                summary = run_generate(spec)
            wall = time.perf_counter() - t0
            steady = args.cases - workers  # the cases after each worker's first
            steady_s = done[-1] - done[workers - 1]
            assert summary["n_passed"] == args.cases, summary
            phase = summary["timings_s"]["generate"]
            row = {"workers": workers, "cases": args.cases, "sleep_s": args.sleep, "generate_s": round(phase, 2),
                   "wall_s": round(wall, 2), "cluster_and_flow_s": round(wall - summary["timings_s"]["wall"], 2),
                   "first_cases_s": round(done[workers - 1] - t0, 2),
                   "steady_cases_per_min": round(60 * steady / steady_s, 1),
                   "steady_overhead_ms_per_case": round(1000 * (steady_s * workers / steady - args.sleep), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\nstub {args.sleep:g} s/case, {args.cases} cases; baseline: {base['workers']} worker(s)")
    print("| workers | generate s | until each worker's first case s | steady cases/min | vs baseline | ideal | "
          "steady overhead ms/case | cluster + flow start/stop s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['generate_s']} | {row['first_cases_s']} | {row['steady_cases_per_min']} | "
              f"{row['steady_cases_per_min'] / base['steady_cases_per_min']:.2f}x | "
              f"{row['workers'] / base['workers']:.0f}x | {row['steady_overhead_ms_per_case']} | "
              f"{row['cluster_and_flow_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
