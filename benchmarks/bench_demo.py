"""The README's main job from a cold start: ``ctfactory run specs/demo.yaml`` into a fresh folder, N times.

Each run is a new process with a new ``PREFECT_HOME`` (the ephemeral Prefect server starts every time
and migrates a new database) and a new output folder, as a new user's first run. ``--warm-runs`` adds
runs whose ``PREFECT_HOME`` has been used before (its database migrated by one start of the server,
untimed), as every later run of a user. Reported: min/median/max wall of the whole command, and the
median of the flow's own split (``plan``, ``generate``, ``validate``) read from the dataset row.
Baseline in the same run: ``--threads 1`` (one torch thread per case, the choice for a busy box).

Usage: ``python benchmarks/bench_demo.py [--runs 5] [--warm-runs 2] [--baseline-runs 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prime_home(home: Path) -> None:
    """Start and stop the ephemeral server once in ``home``: its database is created and migrated."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    code = ("from prefect.server.api.server import SubprocessASGIServer as S\n"
            "s = S(); s.start(); s.stop()\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def _one_run(workdir: Path, k: int, extra: list[str], home: Path | None = None) -> tuple[float, dict[str, float]]:
    out = workdir / f"out{k}"
    env = {**os.environ, "PREFECT_HOME": str(home or workdir / f"prefect{k}")}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows", "run", "specs/demo.yaml", "--out", str(out),
                           "--no-progress", *extra], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_demo: run {k} exited {done.returncode}: {done.stderr[-800:]}")
    sys.path.insert(0, str(REPO))
    from catalog.store import open_catalog

    row = open_catalog(out).read_table("datasets").to_pylist()[-1]
    return wall, {k2: float(v) for k2, v in (row["timings_s"] or [])}


def _report(label: str, runs: list[tuple[float, dict[str, float]]]) -> None:
    walls = [w for w, _ in runs]
    split = {key: statistics.median(t[key] for _, t in runs) for key in ("plan", "generate", "validate", "wall")}
    print(f"{label:<28} n={len(walls)}  min {min(walls):6.1f} s  median {statistics.median(walls):6.1f} s  "
          f"max {max(walls):6.1f} s  | flow median: plan {split['plan']:.1f}  generate {split['generate']:.1f}  "
          f"validate {split['validate']:.1f}  flow wall {split['wall']:.1f}  "
          f"(outside the flow: {statistics.median(walls) - split['wall']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=2, help="runs in a PREFECT_HOME used before (0 to skip)")
    parser.add_argument("--baseline-runs", type=int, default=2, help="runs with --threads 1 (0 to skip)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    print(f"cpu cores {os.cpu_count()}; each run a cold process with its own ephemeral Prefect", flush=True)
    auto = [_one_run(workdir, k, []) for k in range(args.runs)]
    _report("demo, automatic threads", auto)
    if args.warm_runs:
        warm = []
        for k in range(args.warm_runs):
            home = workdir / f"prefect-warm{k}"
            _prime_home(home)
            warm.append(_one_run(workdir, 200 + k, [], home=home))
        _report("demo, PREFECT_HOME used", warm)
    if args.baseline_runs:
        base = [_one_run(workdir, 100 + k, ["--threads", "1"]) for k in range(args.baseline_runs)]
        _report("demo, --threads 1 (baseline)", base)
        ratio = statistics.median(w for w, _ in auto) / statistics.median(w for w, _ in base)
        print(f"automatic / baseline median wall: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
