"""Catalog benchmarks: a filtered query over N synthetic rows, and K commits of 100 rows.

Baselines are measured in the same run on the same files:
- query: plain ``pyarrow.parquet.read_table(files, filters=...)`` and ``pandas.read_parquet``;
- commits: a bare ``deltalake.write_deltalake(mode="append")`` of the same rows (no idempotence check).

Usage: ``python benchmarks/bench_catalog.py [--rows 1000000] [--commits 100] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import write_deltalake

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog.query import sample_filter  # noqa: E402
from catalog.schema import SAMPLES_SCHEMA, SCHEMA_VERSION  # noqa: E402
from catalog.store import open_catalog  # noqa: E402

REGIONS = np.array(["head_neck", "chest", "abdomen", "lower"])
PATHOLOGIES = np.array(["none", "hepatic_tumor", "lung_tumor", "bone_lesion"])


def synthetic_rows(n: int, *, start: int = 0, seed: int = 0) -> pa.Table:
    """Return ``n`` synthetic ``samples`` rows with ``SAMPLES_SCHEMA``, built column-wise."""
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    passed = rng.random(n) < 0.9
    ids = pa.array([f"case_{i:08d}" for i in idx])
    image = pa.array([f"images/case_{i:08d}.nii.gz" if ok else None for i, ok in zip(idx, passed)])
    label = pa.array([f"labels/case_{i:08d}.nii.gz" if ok else None for i, ok in zip(idx, passed)])
    when_passed = lambda v: pa.array(np.where(passed, v, None))  # noqa: E731
    three = np.arange(0, 3 * n + 1, 3, dtype=np.int32)
    organs = np.tile(np.array(["liver", "spleen", "kidney"]), n)
    hu = pa.MapArray.from_arrays(pa.array(three), pa.array(organs), pa.array(rng.normal(60, 20, 3 * n)))
    timings = pa.MapArray.from_arrays(pa.array(np.arange(0, n + 1, dtype=np.int32)), pa.array(np.repeat("generate", n)),
                                      pa.array(rng.uniform(1, 5, n)))
    const = lambda v: pa.array(np.repeat(v, n))  # noqa: E731
    nulls = lambda t: pa.nulls(n, type=t)  # noqa: E731
    columns = {
        "sample_id": ids, "dataset": const("bench"), "dataset_version": const("1"), "spec_id": const("spec-bench"),
        "cohort": pa.array(np.where(idx % 5 == 0, "test", "train")), "case_index": pa.array(idx),
        "seed": pa.array(idx + 1000), "attempt": pa.array(np.zeros(n, dtype=np.int32)),
        "model_name": const("maisi-ct-rflow"), "model_digest": const("sha256:" + "f" * 16),
        "code_version": const("0.1.0"), "body_region": pa.array(REGIONS[rng.integers(0, 4, n)]),
        "pathology": pa.array(PATHOLOGIES[rng.integers(0, 4, n)]), "tumor_label": nulls(pa.int32()),
        "tumor_size_mm": nulls(pa.float64()),
        "output_size": pa.ListArray.from_arrays(pa.array(three), pa.array(np.full(3 * n, 256, dtype=np.int32))),
        "spacing_mm": pa.ListArray.from_arrays(pa.array(three), pa.array(np.full(3 * n, 1.5))),
        "mask_source": const("phantom"), "mask_id": nulls(pa.string()),
        "image_uri": image, "label_uri": label, "image_sha256": when_passed("a" * 64),
        "label_sha256": when_passed("b" * 64), "image_bytes": when_passed(30_000_000),
        "label_bytes": when_passed(400_000),
        "status": pa.array(np.where(passed, "passed", "failed")), "qc_pass": pa.array(passed),
        "qc_failures": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string())),
        "organ_median": hu, "timings_s": timings, "device": const("cuda:0"), "failure_reason": nulls(pa.string()),
        "created_at": pa.array(np.repeat(datetime.now(timezone.utc), n), type=SAMPLES_SCHEMA.field("created_at").type),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, dtype=np.int32)), "modality": const("CT"),
    }
    # columns this benchmark does not exercise (precision, the tumour QC fields, ...) are null
    table = {f.name: columns.get(f.name, nulls(f.type)) for f in SAMPLES_SCHEMA}
    return pa.Table.from_pydict(table).cast(SAMPLES_SCHEMA)


def _median_time(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_query(workdir: Path, rows: int, repeat: int) -> None:
    """Time the catalog's filtered query against plain pyarrow/pandas reads of the same files."""
    cat = open_catalog(workdir / "query")
    t0 = time.perf_counter()
    chunk = 250_000
    for start in range(0, rows, chunk):
        table = synthetic_rows(min(chunk, rows - start), start=start, seed=start)
        write_deltalake(cat.table_uri("samples"), table, mode="append")
    print(f"setup: wrote {rows:,} rows in {time.perf_counter() - t0:.1f} s "
          f"({len(cat.delta_table().file_uris())} files)")
    files = list(cat.delta_table().file_uris())
    flt = sample_filter(region="chest", pathology="none", qc="pass")
    pq_filters = [("body_region", "=", "chest"), ("pathology", "=", "none"), ("qc_pass", "=", True)]
    cases = {
        "catalog.query (all columns)": lambda: cat.query(flt),
        "catalog.query (4 columns)": lambda: cat.query(flt, columns=["sample_id", "seed", "image_uri", "label_uri"]),
        "catalog.sql count/avg (DuckDB)": lambda: cat.sql(
            "SELECT count(*) AS n, avg(seed) AS s FROM samples "
            "WHERE body_region='chest' AND pathology='none' AND qc_pass"),
        "baseline pq.read_table+filters": lambda: pq.read_table(files, filters=pq_filters),
        "baseline pd.read_parquet+filters": lambda: pd.read_parquet(files, filters=pq_filters),
    }
    _report_query(cases, rows, repeat, "as written")
    t0 = time.perf_counter()
    cat.optimize()
    files[:] = cat.delta_table().file_uris()
    print(f"\noptimize (z-order on body_region, pathology, qc_pass): {time.perf_counter() - t0:.1f} s "
          f"({len(files)} files)")
    _report_query(cases, rows, repeat, "after Catalog.optimize()")


def _report_query(cases: dict, rows: int, repeat: int, label: str) -> None:
    results = {name: _median_time(fn, repeat) for name, fn in cases.items()}
    base = results["baseline pq.read_table+filters"][0]
    print(f"\nfiltered query over {rows:,} rows, {label} (median of {repeat}; region=chest, pathology=none, qc pass)")
    for name, (seconds, out) in results.items():
        n = out.num_rows if hasattr(out, "num_rows") else len(out)
        print(f"  {name:34s} {seconds * 1000:8.1f} ms  rows={n:<8d} ratio vs pq baseline {seconds / base:5.2f}x")


def bench_commits(workdir: Path, commits: int, batch: int) -> None:
    """Time ``append_samples`` commits against bare ``write_deltalake`` appends of the same rows."""
    cat = open_catalog(workdir / "commits")
    raw_uri = str(workdir / "raw" / "samples")
    ours, raw = [], []
    for k in range(commits):
        table = synthetic_rows(batch, start=k * batch, seed=k)
        records = table.to_pylist()
        t0 = time.perf_counter()
        cat.append_samples(records, commit_metadata={"spec_id": "spec-bench", "commit": str(k)})
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_deltalake(raw_uri, table, mode="append")
        raw.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    noop = cat.append_samples(records)
    noop_s = time.perf_counter() - t0
    med, med_raw = statistics.median(ours), statistics.median(raw)
    print(f"\n{commits} commits of {batch} rows (version now {cat.version})")
    print(f"  append_samples (checks + idempotence) median {med * 1000:7.1f} ms, last {ours[-1] * 1000:7.1f} ms, "
          f"total {sum(ours):6.2f} s")
    print(f"  baseline bare write_deltalake       median {med_raw * 1000:7.1f} ms, last {raw[-1] * 1000:7.1f} ms, "
          f"total {sum(raw):6.2f} s")
    print(f"  ratio append_samples / baseline     {med / med_raw:5.2f}x (median)")
    print(f"  idempotent re-commit of the last batch (no new version, returned {noop}): {noop_s * 1000:.1f} ms")
    t0 = time.perf_counter()
    ids = cat.committed_sample_ids()
    print(f"  committed_sample_ids() of {len(ids):,} rows: {(time.perf_counter() - t0) * 1000:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks in a temporary directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the query benchmark")
    parser.add_argument("--commits", type=int, default=100, help="number of commits")
    parser.add_argument("--batch", type=int, default=100, help="rows per commit")
    parser.add_argument("--repeat", type=int, default=5, help="query repetitions (median reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_catalog_") as tmp:
        bench_query(Path(tmp), args.rows, args.repeat)
        bench_commits(Path(tmp), args.commits, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
