"""Everyday commands, wall time of the whole process: each ``ctfactory`` command against a plain script.

Baseline (measured in the same run, on the same catalog): a fresh ``python -c`` doing the same read
with deltalake/pyarrow directly, so both sides pay interpreter start and their imports. Reported: the
median of ``--repeat`` runs per command and the ratio to its baseline. The issue's targets: at most
1.5 s wall and at most 5x the plain script.

The catalog is the demo's: pass ``--root`` to an existing one, or let the script build one with
``ctfactory run specs/demo.yaml`` (about a minute on 2 CPU cores).

Usage: ``python benchmarks/bench_cli.py [--root runs/demo] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows"]

PLAIN_HISTORY = ("from deltalake import DeltaTable; import sys\n"
                 "for t in ('samples', 'datasets'): print(len(DeltaTable(sys.argv[1] + '/catalog/' + t).history()))")
PLAIN_QUERY = ("from deltalake import DeltaTable; import sys\n"
               "t = DeltaTable(sys.argv[1] + '/catalog/samples').to_pyarrow_dataset().to_table()\n"
               "print(t.sort_by('sample_id').select(['sample_id', 'cohort', 'status']).to_pandas().to_string())")
PLAIN_SQL = ("import duckdb, sys; from deltalake import DeltaTable\n"
             "samples = DeltaTable(sys.argv[1] + '/catalog/samples').to_pyarrow_dataset()\n"
             "print(duckdb.sql('select cohort, count(*) from samples group by cohort').fetchall())")
PLAIN_VERIFY = ("import hashlib, sys; from deltalake import DeltaTable\n"
                "rows = DeltaTable(sys.argv[1] + '/catalog/samples').to_pyarrow_dataset().to_table().to_pylist()\n"
                "for r in rows:\n"
                "    if r['status'] == 'passed':\n"
                "        for k in ('image', 'label'):\n"
                "            assert hashlib.sha256(open(sys.argv[1] + '/' + r[k + '_uri'], 'rb').read()).hexdigest()"
                " == r[k + '_sha256']\n")
PLAIN_SPEC = "import yaml, sys; print(len(yaml.safe_load(open(sys.argv[1]))['cohorts']))"


def _wall(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"bench_cli: {' '.join(argv[:6])} exited {done.returncode}: {done.stderr[-500:]}")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="an existing dataset output root (default: build the demo in a temp folder)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    root = args.root
    if root is None:
        root = str(workdir / "demo")
        print(f"building the demo catalog in {root} ...", flush=True)
        subprocess.run([*CLI, "run", "specs/demo.yaml", "--out", root, "--no-progress"], cwd=REPO, check=False,
                       capture_output=True)
    spec = str(REPO / "specs" / "demo.yaml")
    cases = [
        ("catalog history", [*CLI, "catalog", "history", root], PLAIN_HISTORY, [root]),
        ("catalog query", [*CLI, "catalog", "query", root], PLAIN_QUERY, [root]),
        ("catalog query --sql", [*CLI, "catalog", "query", root, "--sql",
                                 "select cohort, count(*) from samples group by cohort"], PLAIN_SQL, [root]),
        ("catalog verify", [*CLI, "catalog", "verify", root], PLAIN_VERIFY, [root]),
        ("catalog export msd", [*CLI, "catalog", "export", root, "--format", "msd", "--dest", str(workdir / "x"),
                                "--overwrite"], PLAIN_VERIFY, [root]),
        ("check-spec", [*CLI, "check-spec", spec], PLAIN_SPEC, [spec]),
    ]
    print(f"{'command':<22} {'ctfactory s':>11} {'plain s':>8} {'ratio':>6}  target <= 1.5 s and <= 5x")
    for name, command, plain, plain_args in cases:
        ours = _wall(command, args.repeat)
        base = _wall([sys.executable, "-c", plain, *plain_args], args.repeat)
        verdict = "ok" if ours <= 1.5 and ours <= 5 * base else "MISSED"
        print(f"{name:<22} {ours:>11.2f} {base:>8.2f} {ours / base:>6.1f}  {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
