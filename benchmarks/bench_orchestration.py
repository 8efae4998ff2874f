"""Orchestration overhead of the generate-dataset flow against a plain sequential loop.

Both sides run the same cases through the same library code (``factory.case.run_case``: phantom mask,
stub generation, QC, NIfTI writes), commit the same catalog batches and finish with the same dataset
tail (the bodies of the flow's ``validate-dataset``, ``record-dataset`` and ``publish-card`` tasks:
dataset metrics over up to 64 cases, the dataset row, the HTML card). The generator is the
``sleep:SECONDS`` stub of ``factory.case`` (the documented generator seam, ``runtime.generator``), so
the difference is what Prefect adds: task runs, state events to the (ephemeral) API server, futures
and the flow's own start and end.

    python benchmarks/bench_orchestration.py                 # 200 cases x 1 s (about 8 minutes)
    python benchmarks/bench_orchestration.py --cases 50      # quicker

Prints the baseline loop and the flow (after a warm-up flow that starts the ephemeral server; the
cold start is printed separately), each split into cases + commits and the dataset tail (the flow's
split comes from the ``timings_s`` of its dataset row), and the per-case overhead in ms and in %.
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
name: {name}
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
runtime: {{{runtime}}}
"""


def stub_spec(root: str, *, cases: int, seed: int, runtime: str, name: str = "bench"):
    """The stub cohort the orchestration benchmarks share (32^3 tiny cases, QC off); ``runtime``: a YAML mapping's body."""
    from factory.spec import parse_spec

    return parse_spec(SPEC.format(name=name, root=root, seed=seed, cases=cases, runtime=runtime))


def baseline_loop(spec, root: str, sleep: float, batch: int) -> tuple[float, float]:
    """The same cases, commits and dataset tail as plain function calls; return (cases + commits, tail) seconds."""
    from catalog.root import DatasetRoot
    from factory import dataset
    from factory.case import SleepGenerator, run_case
    from factory.plan import plan_dataset

    t0 = time.perf_counter()
    plan = plan_dataset(spec)
    where = DatasetRoot.of(root)
    gen, pending = SleepGenerator(sleep), []
    for case in plan.cases:
        pending.append(run_case(case, gen, root=where, code_version="bench"))
        if len(pending) >= batch:
            dataset.commit(where, pending, metadata={})
            pending = []
    if pending:
        dataset.commit(where, pending, metadata={})
    t1 = time.perf_counter()
    metrics = dataset.dataset_metrics(spec, plan.spec_id, where)
    dataset.record_dataset(spec, plan.spec_id, where, metrics=metrics, timings={}, code_version="bench",
                           new_rows=len(plan.cases))
    dataset.write_card(where)
    return t1 - t0, time.perf_counter() - t1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds per stub generation")
    parser.add_argument("--batch", type=int, default=8, help="records per catalog commit")
    args = parser.parse_args()

    from flows.generate import run_generate

    runtime = f'batch_size: {args.batch}, max_workers: 1, generator: "sleep:{args.sleep}"'
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        make = lambda root, cases, seed: stub_spec(root, cases=cases, seed=seed, runtime=runtime)  # noqa: E731
        t0 = time.perf_counter()
        run_generate(make(f"{tmp}/warm", 1, 0))
        cold = time.perf_counter() - t0

        base_cases, base_tail = baseline_loop(make(f"{tmp}/base", args.cases, 1), f"{tmp}/base", args.sleep,
                                              args.batch)
        t0 = time.perf_counter()
        summary = run_generate(make(f"{tmp}/flow", args.cases, 1))
        flow = time.perf_counter() - t0
        assert summary["n_passed"] == args.cases, summary

    base = base_cases + base_tail
    timings = summary["timings_s"]
    flow_cases = timings["plan"] + timings["generate"]  # flow body start to the last commit
    ideal = args.cases * args.sleep
    per_case_ms = (flow - base) / args.cases * 1000
    print(f"cases {args.cases}, stub {args.sleep:g} s/case, batch {args.batch}, 1 worker thread")
    print(f"cold start (ephemeral server + 1-case flow): {cold:.1f} s")
    print(f"ideal (cases x stub):          {ideal:8.1f} s")
    print(f"baseline loop (no Prefect):    {base:8.1f} s  = cases + commits {base_cases:.1f} s "
          f"({(base_cases - ideal) / args.cases * 1000:.1f} ms/case library work) + dataset tail {base_tail:.1f} s")
    print(f"flow (warm server):            {flow:8.1f} s  = cases + commits {flow_cases:.1f} s + dataset tail "
          f"{flow - flow_cases:.1f} s (metrics {timings['validate']:.1f} s; dataset row, card, flow-run start "
          f"and end {flow - timings['wall']:.1f} s)")
    print(f"orchestration overhead:        {flow - base:8.1f} s  = {per_case_ms:.1f} ms/case = "
          f"{100 * (flow - base) / base:.2f} % of the baseline ({100 * (flow - ideal) / ideal:.2f} % over ideal)")
    print(f"  in cases + commits:          {flow_cases - base_cases:8.1f} s  = "
          f"{(flow_cases - base_cases) / args.cases * 1000:.1f} ms/case = "
          f"{100 * (flow_cases - base_cases) / base_cases:.2f} % of the loop's cases + commits")
    print(f"flow vs the loop without its dataset tail: {flow - base_cases:.1f} s = "
          f"{(flow - base_cases) / args.cases * 1000:.1f} ms/case = {100 * (flow - base_cases) / base_cases:.2f} % "
          f"(orchestration plus the tail's {base_tail:.1f} s of library work)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
