"""Orchestration overhead of the generate-dataset flow against a plain sequential loop.

Both sides run the same cases through the same library code (``flows.case.run_case``: phantom mask,
stub generation, QC, NIfTI writes) and commit the same catalog batches; the generator is the
``sleep:SECONDS`` stub of ``flows.case`` (the documented generator seam, ``runtime.generator``), so
the difference is what Prefect adds: task runs, state reporting to the (ephemeral) API server,
futures and the flow's own start and end.

    python benchmarks/bench_orchestration.py                 # 200 cases x 1 s (about 7 minutes)
    python benchmarks/bench_orchestration.py --cases 50      # quicker

Prints the baseline loop time, the flow time (after a warm-up flow that starts the ephemeral
server; the cold start is printed separately), and the per-case overhead in ms and in %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

SPEC = """\
name: bench
version: "1"
model: preset:tiny
output_root: {root}
seed: {seed}
cohorts:
  - name: stub
    count: {cases}
    body_region: chest
    output_size: [32, 32, 32]
    spacing_mm: [8, 8, 8]
    num_inference_steps: 1
    qc: {{organ_hu_check: false, max_retries: 0}}
runtime: {{batch_size: {batch}, max_workers: 1, generator: "sleep:{sleep}"}}
"""


def baseline_loop(spec, root: str, sleep: float, batch: int) -> float:
    """The same cases and commits as plain function calls, one after the other."""
    from catalog.store import open_catalog
    from flows.case import SleepGenerator, run_case
    from flows.plan import plan_dataset

    t0 = time.perf_counter()
    plan = plan_dataset(spec)
    gen, cat, pending = SleepGenerator(sleep), open_catalog(root), []
    for case in plan.cases:
        pending.append(run_case(case, gen, output_root=root, code_version="bench"))
        if len(pending) >= batch:
            cat.append_samples(pending)
            pending = []
    if pending:
        cat.append_samples(pending)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds per stub generation")
    parser.add_argument("--batch", type=int, default=8, help="records per catalog commit")
    args = parser.parse_args()

    from flows.generate import run_generate
    from flows.spec import parse_spec

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        make = lambda root, cases, seed: parse_spec(SPEC.format(root=root, cases=cases, sleep=args.sleep,  # noqa: E731
                                                                 batch=args.batch, seed=seed))
        t0 = time.perf_counter()
        run_generate(make(f"{tmp}/warm", 1, 0))
        cold = time.perf_counter() - t0

        base = baseline_loop(make(f"{tmp}/base", args.cases, 1), f"{tmp}/base", args.sleep, args.batch)
        t0 = time.perf_counter()
        summary = run_generate(make(f"{tmp}/flow", args.cases, 1))
        flow = time.perf_counter() - t0
        assert summary["n_passed"] == args.cases, summary

    ideal = args.cases * args.sleep
    per_case_ms = (flow - base) / args.cases * 1000
    print(f"cases {args.cases}, stub {args.sleep:g} s/case, batch {args.batch}, 1 worker thread")
    print(f"cold start (ephemeral server + 1-case flow): {cold:.1f} s")
    print(f"ideal (cases x stub):          {ideal:8.1f} s")
    print(f"baseline loop (no Prefect):    {base:8.1f} s  ({(base - ideal) / args.cases * 1000:6.1f} ms/case library work)")
    print(f"flow (warm server):            {flow:8.1f} s")
    print(f"orchestration overhead:        {flow - base:8.1f} s  = {per_case_ms:.1f} ms/case = "
          f"{100 * (flow - base) / base:.2f} % of the baseline ({100 * (flow - ideal) / ideal:.2f} % over ideal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
