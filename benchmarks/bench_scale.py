"""Per-case costs at scale: catalog commits as the table grows, the Delta log, S3 requests, Prefect runs.

Measures the project's own code paths, so that ``benchmarks/SCALE.md`` can project them to 10^4-10^6 cases:

1. ``commits``: ``Catalog.append_samples`` of ``--batch`` records (``runtime.batch_size``, default 8) per
   commit, ``--local-commits`` times on local disk and ``--s3-commits`` times on a local S3 (moto in a
   child process). Per commit: wall time, bytes added to ``_delta_log``, data files written, checkpoints
   written by delta-rs, and (S3) the requests the server received, split into reads (GET, HEAD, LIST) and
   writes (PUT, conditional PUT, POST, DELETE). Baseline: the median commit of versions 1-10 of the same table.
2. ``reads``: opening the table (``DeltaTable``) and ``factory.dataset.committed_ids`` (what a run does
   first) at versions just before and just at a checkpoint, and at the end on a copy whose checkpoints
   were removed and on a copy after ``Catalog.optimize``. Baseline: the same call on the table as delta-rs
   left it (with its checkpoint), in the same run.
3. ``case``: ``factory.case.run_case`` (``SleepGenerator(0)``: phantom mask, QC, two NIfTI writes through
   ``factory.storage.publish_volume``) plus ``factory.dataset.commit`` of the batches, against the local S3:
   requests per case and per commit.
4. ``flow``: ``flows.generate.run_generate`` on a ``sleep:0`` spec with K cases for each K of
   ``--flow-cases`` on the ephemeral Prefect API: task runs, task-run states and events per flow run (read
   back through the Prefect client), and the per-case cost of the flow against the plain loop of
   ``bench_orchestration.baseline_loop`` (baseline: the same cases, commits and dataset tail without Prefect),
   in wall time and in CPU time of this process plus the ephemeral server (CPU is steadier on shared cores).
   With ``--generation-batch`` above 1, one more flow run packs that many cases per task.
5. ``settings`` and ``probe``: commit cost for other records per commit, and what ``delta.checkpointInterval``,
   ``delta.dataSkippingNumIndexedCols`` and a second z-order do in this delta-rs.
6. ``projection``: least-squares fits of the measured commit costs, EXTRAPOLATED linearly (in versions since
   the last checkpoint and in data files) to 10^4, 10^5 and 10^6 cases for a few settings; see SCALE.md.

Usage::

    python benchmarks/bench_scale.py            # defaults, about 4-5 minutes on 2 busy cores
    python benchmarks/bench_scale.py --quick    # about 1.5 minutes
    python benchmarks/bench_scale.py --local-commits 1000 --s3-commits 400 --flow-cases 8,104   # larger
    python benchmarks/bench_scale.py --skip s3,flow --batch 64     # local catalog only, 64 records per commit

Prints one JSON line per measurement, then a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

BUCKET = "scale"
KEY, SECRET, REGION = "testing", "testing", "us-east-1"
SPEC_ID = "spec-bench"  # the spec_id of bench_catalog.synthetic_rows
COUNTS_PATH = "/__request_counts__"
READS, WRITES = ("GET", "HEAD", "LIST"), ("PUT", "PUT_IF_NONE_MATCH", "COPY", "POST", "DELETE")
# moto's S3 in a child process (deltalake blocks holding the GIL, see tests/s3_server.py), wrapped in a WSGI
# middleware that counts the requests it receives by kind and answers GET COUNTS_PATH with the counts.
_SERVE = """
import json, sys, threading
from urllib.parse import parse_qs
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
app, counts, lock = DomainDispatcherApplication(create_backend_app), {}, threading.Lock()
def kind(env):
    method, path, query = env["REQUEST_METHOD"], env.get("PATH_INFO", ""), parse_qs(env.get("QUERY_STRING", ""))
    if method == "GET" and (path.strip("/").count("/") == 0 or "list-type" in query or "prefix" in query):
        return "LIST"
    if method == "PUT" and "HTTP_X_AMZ_COPY_SOURCE" in env:
        return "COPY"
    if method == "PUT" and "HTTP_IF_NONE_MATCH" in env:
        return "PUT_IF_NONE_MATCH"
    return method
def counting(env, start):
    if env.get("PATH_INFO") == "%s":
        with lock:
            body = json.dumps(counts).encode()
        start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    with lock:
        k = kind(env)
        counts[k] = counts.get(k, 0) + 1
    return app(env, start)
make_server("127.0.0.1", int(sys.argv[1]), counting, True, request_handler=MotoRequestHandler).serve_forever()
""" % COUNTS_PATH

def emit(**row) -> dict:
    """Print one measurement as a JSON line and return it."""
    print(json.dumps(row, default=str), flush=True)
    return row


# -- local S3 with a request counter --------------------------------------------------------------------------------
class CountingS3:
    """A running moto S3 whose requests are counted server-side."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.delta_options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": KEY,
                              "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(self.endpoint + COUNTS_PATH, timeout=30) as response:
            return json.loads(response.read())

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        """Yield a dict that holds, after the block, the requests received during it (plus reads/writes)."""
        out: dict[str, int] = {}
        before = self.counts()
        yield out
        after = self.counts()
        out.update({k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)})
        out["reads"] = sum(out.get(k, 0) for k in READS)
        out["writes"] = sum(out.get(k, 0) for k in WRITES)


@contextlib.contextmanager
def counting_s3() -> Iterator[CountingS3]:
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    s3 = CountingS3(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                s3.counts()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench_scale expects the moto S3 server to start, but it did not") from None
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                     region_name=REGION).create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- catalog growth ---------------------------------------------------------------------------------------------------
def batch_records(k: int, batch: int) -> list[dict]:
    """The ``k``-th batch of synthetic sample rows (bench_catalog's realistic columns)."""
    from bench_catalog import synthetic_rows

    return synthetic_rows(batch, start=k * batch, seed=k).to_pylist()


def place_files(root, records: list[dict]) -> None:
    """Create empty files at the rows' image/label URIs, so ``committed_ids`` finds each case's files."""
    fs, _ = root.filesystem()
    paths = [root.filesystem(r[k])[1] for r in records for k in ("image_uri", "label_uri") if r[k]]
    if root.is_remote:
        fs.pipe({p: b"" for p in paths})
    else:
        for p in paths:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Path(p).touch()


def log_listing(root) -> dict[str, float]:
    """Counts and bytes of the samples table: JSON commits, checkpoints, data files."""
    fs, table = root.filesystem("catalog/samples")
    fs.invalidate_cache()
    log = fs.ls(table + "/_delta_log", detail=True)
    data = [e for e in fs.ls(table, detail=True) if e["name"].endswith(".parquet")]
    commits = [e for e in log if e["name"].endswith(".json") and ".checkpoint" not in e["name"]]
    checkpoints = sorted((e for e in log if ".checkpoint." in e["name"]), key=lambda e: e["name"])
    return {"log_json_files": len(commits), "log_json_bytes": sum(e["size"] for e in commits),
            "checkpoints": len(checkpoints), "last_checkpoint_bytes": checkpoints[-1]["size"] if checkpoints else 0,
            "log_files": len(log), "data_files": len(data), "data_bytes": sum(e["size"] for e in data)}


def time_reads(root, s3: CountingS3 | None, *, repeat: int) -> dict[str, float]:
    """Median ms (and S3 requests of one call) of opening the samples table and of ``committed_ids``."""
    from deltalake import DeltaTable

    from factory.dataset import committed_ids

    quiet = logging.getLogger("bench_scale.quiet")
    quiet.disabled = True
    out: dict[str, float] = {}
    calls = {"open": lambda: DeltaTable(root.catalog().table_uri("samples"), storage_options=root.storage_options or None),
             "committed_ids": lambda: committed_ids(root, SPEC_ID, log=quiet)}
    for name, call in calls.items():
        times = []
        for i in range(repeat):
            with (s3.counting() if s3 and i == 0 else contextlib.nullcontext({})) as req:
                t0 = time.perf_counter()
                result = call()
                times.append(time.perf_counter() - t0)
            if s3 and i == 0:
                out[f"{name}_reads"], out[f"{name}_list"] = req["reads"], req.get("LIST", 0)
        out[f"{name}_ms"] = statistics.median(times) * 1000
        if name == "committed_ids":
            out["ids"] = len(result)
    return out


def grow(root, store: str, commits: int, batch: int, s3: CountingS3 | None, repeat: int) -> dict:
    """Commit ``commits`` batches through ``Catalog.append_samples``; emit per-block rows; return a summary."""
    cat = root.catalog()
    table_dir = None if root.is_remote else Path(cat.table_uri("samples"))
    per: list[dict] = []
    reads: list[dict] = []
    for k in range(commits):
        records = batch_records(k, batch)
        place_files(root, records)
        json_before = _local_log_bytes(table_dir)
        with (s3.counting() if s3 else contextlib.nullcontext({})) as req:
            t0 = time.perf_counter()
            version = cat.append_samples(records, commit_metadata={"spec_id": SPEC_ID, "bench": "scale"})
            ms = (time.perf_counter() - t0) * 1000
        row = {"version": version, "ms": ms, **req}
        if table_dir is not None:
            row["log_bytes_added"] = _local_log_bytes(table_dir) - json_before
            row["checkpoint"] = (table_dir / "_delta_log" / f"{version:020d}.checkpoint.parquet").exists()
        else:  # a checkpoint is two more PUTs: the checkpoint parquet and _last_checkpoint
            row["checkpoint"] = req.get("PUT", 0) > 1
        per.append(row)
        if row["checkpoint"] or (version + 2) % 100 == 0 or version in (0, commits - 1):
            reads.append(emit(bench="reads", store=store, version=version, checkpoint_at_version=row["checkpoint"],
                              **time_reads(root, s3, repeat=repeat)))
    blocks = _blocks(per, store, batch)
    listing = log_listing(root)
    summary = emit(bench="log", store=store, versions=len(per), batch=batch, **listing,
                   json_bytes_per_commit=listing["log_json_bytes"] / listing["log_json_files"],
                   data_bytes_per_file=listing["data_bytes"] / max(1, listing["data_files"]),
                   checkpoint_versions=[r["version"] for r in per if r["checkpoint"]])
    return {"per": per, "blocks": blocks, "reads": reads, "log": summary, "model": fit_commit_model(per, reads, store)}


def _local_log_bytes(table_dir: Path | None) -> int:
    if table_dir is None or not (table_dir / "_delta_log").exists():
        return 0
    return sum(p.stat().st_size for p in (table_dir / "_delta_log").iterdir() if p.is_file())


def _blocks(per: list[dict], store: str, batch: int) -> list[dict]:
    """Median commit per block of 10 versions (checkpoint commits apart); ratio against versions 1-10."""
    plain = [r for r in per if not r["checkpoint"] and r["version"] > 0]
    base = statistics.median(r["ms"] for r in plain[:10])
    out = []
    for start in range(0, per[-1]["version"] + 1, 10):
        rows = [r for r in plain if start <= r["version"] < start + 10]
        if not rows:
            continue
        block = {"bench": "commit", "store": store, "batch": batch, "versions": f"{rows[0]['version']}-{rows[-1]['version']}",
                 "median_ms": statistics.median(r["ms"] for r in rows), "ratio_vs_v1_10": 0.0}
        block["ratio_vs_v1_10"] = block["median_ms"] / base
        for key in ("reads", "writes", "GET", "HEAD", "LIST", "PUT", "PUT_IF_NONE_MATCH", "log_bytes_added"):
            if key in rows[0]:
                block[key] = statistics.mean(r.get(key, 0) for r in rows)
        out.append(emit(**block))
    for r in per:
        if r["checkpoint"]:
            out.append(emit(bench="commit", store=store, batch=batch, versions=f"{r['version']} (checkpoint)",
                            median_ms=r["ms"], ratio_vs_v1_10=r["ms"] / base,
                            **{k: r[k] for k in ("reads", "writes", "PUT", "log_bytes_added") if k in r}))
    return out


def fit_commit_model(per: list[dict], reads: list[dict], store: str) -> dict:
    """Least-squares fits that the projections use (extrapolated linearly beyond the measured range).

    * commit ms (and S3 reads) = a + b * j + c * F, with j the JSON commits replayed when the table is opened
      (versions since the last checkpoint) and F the data files in the table (the checkpoint grows with F);
    * checkpoint commit: extra ms over that fit = e * F (median over the checkpoints); checkpoint bytes per file;
    * S3 requests of committed_ids = g + h * F, over the reads taken at checkpoints (j = 0).
    """
    import numpy as np

    rows, last, extra = [], None, []
    for r in per:
        v = r["version"]
        j = v if last is None else v - 1 - last
        rows.append((j, v, r))
        if r["checkpoint"]:
            last = v
    plain = [(j, f, r) for j, f, r in rows if not r["checkpoint"] and f > 0]
    x = np.array([[1.0, j, f] for j, f, _ in plain])
    coef = lambda y: [float(c) for c in np.linalg.lstsq(x, np.array(y, dtype=float), rcond=None)[0]]  # noqa: E731
    model = {"store": store, "commit_ms": coef([r["ms"] for *_, r in plain]), "max_files_measured": per[-1]["version"]}
    if "reads" in per[0]:
        model["commit_reads"] = coef([r["reads"] for *_, r in plain])
    for j, f, r in rows:
        if r["checkpoint"]:
            a, b, c = model["commit_ms"]
            extra.append((f + 1, r["ms"] - (a + b * j + c * f), r.get("log_bytes_added", 0.0)))
    if extra:  # one parameter (through the origin): two or three checkpoints cannot carry a line fit
        model["checkpoint_extra_ms_per_file"] = float(np.median([e[1] / e[0] for e in extra]))
        if extra[0][2]:
            model["checkpoint_bytes_per_file"] = float(np.median([e[2] / e[0] for e in extra]))
    at_ckpt = [r for r in reads if r["checkpoint_at_version"] and "committed_ids_reads" in r]
    if len(at_ckpt) >= 2:  # S3 requests of committed_ids against the files it reads
        files = np.array([[1.0, r["version"] + 1] for r in at_ckpt])
        model["committed_ids_reads"] = [float(c) for c in np.linalg.lstsq(
            files, np.array([r["committed_ids_reads"] for r in at_ckpt], dtype=float), rcond=None)[0]]
    return emit(bench="model", **model)


def batch_probe(tmp: Path, sizes: list[int], commits: int = 10) -> list[dict]:
    """Median ``append_samples`` ms on a fresh local table for other records-per-commit (fixed cost per commit)."""
    from catalog.root import DatasetRoot

    rows = []
    for batch in sizes:
        cat = DatasetRoot.of(tmp / f"probe{batch}").catalog()
        times = []
        for k in range(commits):
            records = batch_records(k, batch)
            t0 = time.perf_counter()
            cat.append_samples(records, commit_metadata={"spec_id": SPEC_ID})
            times.append((time.perf_counter() - t0) * 1000)
        med = statistics.median(times[1:])
        rows.append(emit(bench="batch-probe", batch=batch, median_ms=med, ms_per_record=med / batch,
                         ratio_vs_first=med / rows[0]["median_ms"] if rows else 1.0))
    return rows


def project(results: dict, cases: int, batch: int, *, interval: int = 100, optimize_every: int | None = None,
            store: str = "local") -> dict:
    """Extrapolate the fitted costs to ``cases`` cases (rules in :func:`fit_commit_model`; see SCALE.md)."""
    model = results[store]["model"]
    probe = {r["batch"]: r["median_ms"] for r in results.get("probe", [])}
    a, b, c = model["commit_ms"]
    if batch in probe and results.get("probe"):  # the fixed cost of a commit of `batch` records, measured
        a += probe[batch] - probe[min(probe)]
    e = model.get("checkpoint_extra_ms_per_file", 0.0)
    commits = -(-cases // batch)
    total_ms, files, since, checkpoints, reads = 0.0, 0, 0, 0, 0.0
    ra, rb, rc = model.get("commit_reads", [0.0, 0.0, 0.0])
    for k in range(commits):
        total_ms += a + b * since + c * files
        reads += ra + rb * since + rc * files
        files += 1
        since += 1
        if optimize_every and (k + 1) % optimize_every == 0:
            files = 1  # z-order compacts every file into about one (measured: 300 -> 1) ...
            total_ms += (k + 1) * batch * results["optimize_ms_per_row"]  # ... and rewrites every row each time
        if (k + 1) % interval == 0:
            total_ms += e * files
            checkpoints, since = checkpoints + 1, 0
    ids_ms = committed_ids_cost(results, files, cases)
    return {"cases": cases, "batch": batch, "interval": interval, "optimize_every": optimize_every, "commits": commits,
            "data_files": files, "checkpoints": checkpoints,
            "checkpoint_mb": model.get("checkpoint_bytes_per_file", 0.0) * files / 1e6,
            "commit_hours": total_ms / 3.6e6, "last_commit_s": (a + b * (interval - 1) + c * files) / 1000,
            "committed_ids_s": ids_ms / 1000, "commit_reads": reads}


def committed_ids_cost(results: dict, files: int, rows: int) -> float:
    """ms of ``committed_ids`` for ``files`` data files holding ``rows`` rows: per file plus per row.

    Per row: the optimized copy (one file) of the grown table; per file: what the as-written table costs more.
    """
    variants = {r.get("variant"): r for r in results["variants"]}
    written, compact = variants["as written (checkpoint)"], variants["after optimize"]
    per_row = compact["committed_ids_ms"] / compact["ids"]
    per_file = max(0.0, (written["committed_ids_ms"] - compact["committed_ids_ms"])
                   / (results["local"]["log"]["data_files"] - compact["files_added"]))
    return per_file * files + per_row * rows


def checkpoint_and_optimize(root, repeat: int) -> list[dict]:
    """Reads on the grown local table: as left (baseline), with its checkpoints removed, after optimize."""
    from catalog.root import DatasetRoot

    src = Path(root.uri)
    rows = [emit(bench="reads-variant", variant="as written (checkpoint)", **time_reads(root, None, repeat=repeat))]
    bare = DatasetRoot.of(str(src) + "-nocheckpoint")
    shutil.copytree(src, bare.uri)
    for p in (Path(bare.uri) / "catalog/samples/_delta_log").iterdir():
        if ".checkpoint." in p.name or p.name == "_last_checkpoint":
            p.unlink()
    rows.append(emit(bench="reads-variant", variant="checkpoints removed", **time_reads(bare, None, repeat=repeat)))
    compact = DatasetRoot.of(str(src) + "-optimized")
    shutil.copytree(src, compact.uri)
    t0 = time.perf_counter()
    metrics = compact.catalog().optimize()
    optimize_ms = (time.perf_counter() - t0) * 1000
    rows.append(emit(bench="reads-variant", variant="after optimize", optimize_ms=optimize_ms,
                     files_removed=metrics.get("numFilesRemoved"), files_added=metrics.get("numFilesAdded"),
                     **time_reads(compact, None, repeat=repeat)))
    cat = compact.catalog()
    t0 = time.perf_counter()
    version = cat.append_samples(batch_records(10**6, 8), commit_metadata={"spec_id": SPEC_ID})
    rows.append(emit(bench="reads-variant", variant="commit after optimize", version=version,
                     commit_ms=(time.perf_counter() - t0) * 1000))
    cat.delta_table().create_checkpoint()  # do the removed files stay in the checkpoint (tombstones)?
    rows.append(emit(bench="reads-variant", variant="checkpoint after optimize", version=version,
                     last_checkpoint_bytes=log_listing(compact)["last_checkpoint_bytes"]))
    rows.append(committed_ids_parts(root, repeat))
    rows.append(commit_anatomy(root, 5))
    base = rows[0]
    for r in rows[1:3]:
        r["ratio_open"] = r["open_ms"] / base["open_ms"]
        r["ratio_committed_ids"] = r["committed_ids_ms"] / base["committed_ids_ms"]
    return rows


def committed_ids_parts(root, repeat: int) -> dict:
    """``committed_ids`` split into its table read and its file-existence check (``missing_files``)."""
    import pyarrow.compute as pc

    from factory.dataset import missing_files

    cat = root.catalog()
    read = lambda: cat.read_table("samples", columns=["sample_id", "status", "image_uri", "label_uri"],  # noqa: E731
                                  filter=pc.field("spec_id") == SPEC_ID).to_pylist()
    read_ms, rows = _median_ms(read, repeat)
    uris = [r[k] for r in rows if r["status"] == "passed" for k in ("image_uri", "label_uri")]
    check_ms, missing = _median_ms(lambda: missing_files(root, uris), repeat)
    resolve_ms, _ = _median_ms(lambda: [root.filesystem(u) for u in uris], repeat)  # what missing_files does per URI
    return emit(bench="committed-ids-parts", rows=len(rows), uris=len(uris), missing=len(missing),
                read_table_ms=read_ms, missing_files_ms=check_ms, missing_files_us_per_uri=check_ms * 1000 / len(uris),
                root_filesystem_per_uri_ms=resolve_ms)


def _median_ms(call, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def commit_anatomy(root, version: int) -> dict:
    """Bytes of each action kind in one ``append_samples`` JSON commit of the local table."""
    path = Path(root.catalog().table_uri("samples")) / "_delta_log" / f"{version:020d}.json"
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        kind = next(iter(json.loads(line)))
        sizes[kind] = sizes.get(kind, 0) + len(line) + 1
        counts[kind] = counts.get(kind, 0) + 1
    return emit(bench="commit-anatomy", version=version, bytes=sizes, actions=counts)


def settings_probe(tmp: Path) -> dict:
    """What the settings SCALE.md recommends do in delta-rs: checkpoint interval, stats columns, z-order scope."""
    from deltalake import write_deltalake

    from bench_catalog import synthetic_rows
    from catalog.root import DatasetRoot

    interval = tmp / "interval"
    for k in range(25):
        write_deltalake(str(interval), synthetic_rows(8, start=k * 8, seed=k), mode="append",
                        configuration={"delta.checkpointInterval": "10"} if k == 0 else None)
    add_bytes = {}
    for cols in (None, "4"):
        where = tmp / f"stats{cols}"
        write_deltalake(str(where), synthetic_rows(8, seed=1), mode="append",
                        configuration=None if cols is None else {"delta.dataSkippingNumIndexedCols": cols})
        first = (where / "_delta_log" / f"{0:020d}.json").read_text().splitlines()
        add_bytes[str(cols or "default")] = sum(len(line) for line in first if line.startswith('{"add"'))
    cat = DatasetRoot.of(tmp / "zorder").catalog()
    for k in range(20):
        cat.append_samples(batch_records(k, 8), commit_metadata={"spec_id": SPEC_ID})
    first = cat.optimize()
    cat.append_samples(batch_records(20, 8), commit_metadata={"spec_id": SPEC_ID})
    second = cat.optimize()
    return emit(bench="settings", checkpoint_interval_10_checkpoints=sorted(
                    int(p.name[:20]) for p in (interval / "_delta_log").glob("*.checkpoint.parquet")),
                add_action_bytes_by_indexed_cols=add_bytes,
                zorder_first_files=[first["numFilesRemoved"], first["numFilesAdded"]],
                zorder_second_files=[second["numFilesRemoved"], second["numFilesAdded"]])


# -- one case through the library on S3 -------------------------------------------------------------------------------
def make_spec(root: str, cases: int, batch: int, seed: int = 1, generation_batch: int | None = None):
    from bench_orchestration import stub_spec

    extra = "" if generation_batch is None else f", generation_batch: {generation_batch}"
    return stub_spec(root, name="scale", cases=cases, seed=seed,
                     runtime=f'batch_size: {batch}, max_workers: 1, generator: "sleep:0"{extra}')


def cases_on_s3(s3: CountingS3, cases: int, batch: int) -> dict:
    """``run_case`` (two NIfTI writes) and batch commits on S3: requests per case and per commit."""
    from catalog.root import DatasetRoot
    from factory import dataset
    from factory.case import SleepGenerator, run_case
    from factory.plan import plan_dataset

    root = DatasetRoot.of(f"s3://{BUCKET}/cases", s3.delta_options)
    plan = plan_dataset(make_spec(root.uri, cases, batch))
    gen, pending, case_rows, commit_rows = SleepGenerator(0.0), [], [], []
    for case in plan.cases:
        with s3.counting() as req:
            t0 = time.perf_counter()
            pending.append(run_case(case, gen, root=root, code_version="bench"))
        case_rows.append({"ms": (time.perf_counter() - t0) * 1000, **req})
        if len(pending) >= batch:
            with s3.counting() as req:
                t0 = time.perf_counter()
                dataset.commit(root, pending, metadata={"spec_id": plan.spec_id})
            commit_rows.append({"ms": (time.perf_counter() - t0) * 1000, **req})
            pending = []
    with s3.counting() as req:
        done = dataset.committed_ids(root, plan.spec_id)
    keys = ("reads", "writes", "GET", "HEAD", "LIST", "PUT", "PUT_IF_NONE_MATCH")
    mean = lambda rows, k: statistics.mean(r.get(k, 0) for r in rows)  # noqa: E731
    return emit(bench="case-s3", cases=cases, batch=batch, committed=len(done),
                case_ms=statistics.median(r["ms"] for r in case_rows),
                **{f"case_{k}": mean(case_rows, k) for k in keys},
                commit_ms=statistics.median(r["ms"] for r in commit_rows),
                **{f"commit_{k}": mean(commit_rows, k) for k in keys},
                committed_ids_reads=req["reads"], committed_ids_LIST=req.get("LIST", 0))


# -- the Prefect flow ----------------------------------------------------------------------------------------------
def flow_costs(tmp: Path, sizes: list[int], batch: int, repeat: int, generation_batch: int) -> list[dict]:
    """Task runs, states and events per flow run, and ms per case of the flow over the plain loop.

    Each loop and flow runs ``repeat`` times on fresh roots (the fastest counts: other work on the
    cores only ever adds time). With ``generation_batch`` > 1 the largest size runs once more with that
    many cases per generation task.
    """
    from bench_orchestration import baseline_loop

    from flows.generate import run_generate

    t0 = time.perf_counter()
    run_generate(make_spec(str(tmp / "warm"), 1, batch, seed=0))
    emit(bench="flow-cold-start", seconds=time.perf_counter() - t0)
    rows, runs = [], 0

    def timed_flow(k: int, gen_batch: int | None) -> tuple[float, float]:
        nonlocal runs
        runs += 1
        t0, c0 = time.perf_counter(), cpu_seconds()
        summary = run_generate(make_spec(str(tmp / f"flow{runs}"), k, batch, seed=k, generation_batch=gen_batch))
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        if summary["n_passed"] != k:
            raise RuntimeError(f"bench_scale expects {k} passed cases, but got {summary['n_passed']}")
        return seconds, cpu

    for k in sizes:
        loops, flows = [], []
        for i in range(repeat):
            root = str(tmp / f"loop{k}-{i}")
            t0, c0 = time.perf_counter(), cpu_seconds()
            baseline_loop(make_spec(root, k, batch, seed=k), root, 0.0, batch)
            loops.append((time.perf_counter() - t0, cpu_seconds() - c0))
            flows.append(timed_flow(k, None))
        (loop_s, loop_cpu), (flow_s, flow_cpu) = min(loops), min(flows)
        rows.append(emit(bench="flow", cases=k, batch=batch, loop_s=loop_s, flow_s=flow_s, loop_cpu_s=loop_cpu,
                         flow_cpu_s=flow_cpu, loop_runs=loops, flow_runs=flows, **count_flow_run(),
                         ratio_flow_vs_loop=flow_s / loop_s, overhead_ms_per_case=(flow_s - loop_s) / k * 1000,
                         cpu_overhead_ms_per_case=(flow_cpu - loop_cpu) / k * 1000))
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        dk = b["cases"] - a["cases"]
        rows.append(emit(bench="flow-marginal", from_cases=a["cases"], to_cases=b["cases"],
                         loop_ms_per_case=(b["loop_s"] - a["loop_s"]) / dk * 1000,
                         flow_ms_per_case=(b["flow_s"] - a["flow_s"]) / dk * 1000,
                         overhead_ms_per_case=((b["flow_s"] - a["flow_s"]) - (b["loop_s"] - a["loop_s"])) / dk * 1000,
                         cpu_overhead_ms_per_case=((b["flow_cpu_s"] - a["flow_cpu_s"])
                                                   - (b["loop_cpu_s"] - a["loop_cpu_s"])) / dk * 1000,
                         task_runs_per_case=(b["task_runs"] - a["task_runs"]) / dk,
                         states_per_case=(b["task_run_states"] - a["task_run_states"]) / dk,
                         events_per_case=(b["events"] - a["events"]) / dk))
    if generation_batch > 1:
        k, base = sizes[-1], rows[len(sizes) - 1]
        flow_s, flow_cpu = timed_flow(k, generation_batch)
        rows.append(emit(bench="flow-generation-batch", cases=k, batch=batch, generation_batch=generation_batch,
                         flow_s=flow_s, flow_cpu_s=flow_cpu, **count_flow_run(),
                         ratio_vs_generation_batch_1=flow_s / base["flow_s"],
                         cpu_ratio_vs_generation_batch_1=flow_cpu / base["flow_cpu_s"]))
    return rows


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (the ephemeral Prefect server)."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def count_flow_run(settle_s: float = 30.0) -> dict:
    """Task runs (by name), their states and the events (by name) of the newest generate-dataset flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.events.filters import EventAnyResourceFilter, EventFilter

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["generate-dataset"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        by_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        deadline, seen = time.monotonic() + settle_s, []
        while True:  # task runs and events reach the database through the server's recorder and persister (batched)
            tasks = []
            while len(page := client.read_task_runs(flow_run_filter=by_run, offset=len(tasks), limit=200)) > 0:
                tasks += page
            # a fresh filter each time: its `occurred.until` defaults to the moment it is built
            flt = EventFilter(any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{run.id}"]))
            events = client.read_events(filter=flt, limit=50)
            seen.append((len(tasks), events.total))
            if seen[-3:] == [seen[-1]] * 3 or time.monotonic() > deadline:
                break
            time.sleep(2.5)
        by_event: dict[str, int] = {}
        while True:
            for e in events.events:
                by_event[e.event] = by_event.get(e.event, 0) + 1
            if not events.next_page:
                break
            events = client.read_events_page(events.next_page)
        states = sum(len(client.read_task_run_states(t.id)) for t in tasks)
        names: dict[str, int] = {}
        for t in tasks:
            names[t.name.rsplit("-", 1)[0]] = names.get(t.name.rsplit("-", 1)[0], 0) + 1
        flow_states = len(client.read_flow_run_states(run.id))
    return {"task_runs": len(tasks), "task_run_states": states, "flow_run_states": flow_states,
            "events": seen[-1][1], "task_runs_by_name": names, "events_by_name": by_event}


# -- summary ----------------------------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    print("\nsummary (medians; ratios against the baseline named in each line)")
    for store in ("local", "s3"):
        grown = results.get(store)
        if not grown:
            continue
        blocks = [b for b in grown["blocks"] if "checkpoint" not in b["versions"]]
        print(f"\n[{store}] append_samples, {grown['log']['batch']} records per commit")
        print(f"  {'versions':>20s} {'ms':>8s} {'x v1-10':>8s} {'reads':>6s} {'writes':>6s} {'log B':>7s}")
        starts = lambda b: int(b["versions"].split("-")[0])  # noqa: E731
        shown = [b for i, b in enumerate(blocks) if i == 0 or starts(b) % 100 in (0, 90) or b is blocks[-1]]
        for b in shown:
            print(f"  {b['versions']:>20s} {b['median_ms']:8.1f} {b['ratio_vs_v1_10']:8.2f} {b.get('reads', 0):6.1f} "
                  f"{b.get('writes', 0):6.1f} {b.get('log_bytes_added', 0):7.0f}")
        for b in grown["blocks"]:
            if "checkpoint" in b["versions"]:
                print(f"  {b['versions']:>20s} {b['median_ms']:8.1f} {b['ratio_vs_v1_10']:8.2f} {b.get('reads', 0):6.1f} "
                      f"{b.get('writes', 0):6.1f} {b.get('log_bytes_added', 0):7.0f}")
        log = grown["log"]
        print(f"  log after {log['versions']} commits: {log['log_json_files']} JSON commits, "
              f"{log['log_json_bytes'] / 1e3:.0f} kB ({log['json_bytes_per_commit']:.0f} B/commit), "
              f"{log['checkpoints']} checkpoints at versions {log['checkpoint_versions']} "
              f"(last {log['last_checkpoint_bytes'] / 1e3:.1f} kB); {log['data_files']} data files, "
              f"{log['data_bytes_per_file'] / 1e3:.1f} kB each")
        print(f"  reads: {'version':>8s} {'ckpt':>5s} {'open ms':>8s} {'ids ms':>8s} {'open rd':>8s} {'ids rd':>7s}")
        for r in grown["reads"]:
            print(f"         {r['version']:8d} {str(r['checkpoint_at_version']):>5s} {r['open_ms']:8.1f} "
                  f"{r['committed_ids_ms']:8.1f} {r.get('open_reads', 0):8.0f} {r.get('committed_ids_reads', 0):7.0f}")
    for r in results.get("variants", []):
        if r["bench"] == "committed-ids-parts":
            print(f"  local committed_ids parts ({r['rows']} rows): read_table {r['read_table_ms']:.1f} ms, "
                  f"missing_files {r['missing_files_ms']:.1f} ms ({r['uris']} URIs, {r['missing_files_us_per_uri']:.0f} us each; "
                  f"of which root.filesystem per URI {r['root_filesystem_per_uri_ms']:.1f} ms)")
            continue
        if r["bench"] == "commit-anatomy":
            print(f"  local JSON commit {r['version']} bytes by action: {r['bytes']} counts {r['actions']}")
            continue
        if "last_checkpoint_bytes" in r:
            print(f"  local {r['variant']:>26s}: {r['last_checkpoint_bytes'] / 1e3:.1f} kB (version {r['version']})")
            continue
        extra = "".join(f" {k}={r[k]:.2f}" for k in ("ratio_open", "ratio_committed_ids") if k in r)
        if "open_ms" in r:
            print(f"  local {r['variant']:>26s}: open {r['open_ms']:6.1f} ms, committed_ids {r['committed_ids_ms']:6.1f} ms"
                  f"{extra}{' (optimize ' + format(r['optimize_ms'], '.0f') + ' ms)' if 'optimize_ms' in r else ''}")
        else:
            print(f"  local {r['variant']:>26s}: {r['commit_ms']:.1f} ms (version {r['version']})")
    for r in results.get("probe", []):
        print(f"  local fresh table, {r['batch']:4d} records per commit: {r['median_ms']:6.1f} ms per commit, "
              f"{r['ms_per_record']:6.2f} ms per record (x{r['ratio_vs_first']:.2f} the commit of {results['probe'][0]['batch']})")
    st = results.get("settings")
    if st:
        print(f"  settings: delta.checkpointInterval=10 -> checkpoints at {st['checkpoint_interval_10_checkpoints']}; "
              f"add action bytes by delta.dataSkippingNumIndexedCols {st['add_action_bytes_by_indexed_cols']}; "
              f"z-order files removed/added: first {st['zorder_first_files']}, second {st['zorder_second_files']}")
    case = results.get("case")
    if case:
        print(f"\n[s3] per case (run_case, 2 NIfTI): {case['case_ms']:.0f} ms, reads {case['case_reads']:.1f} "
              f"(GET {case['case_GET']:.1f}, HEAD {case['case_HEAD']:.1f}, LIST {case['case_LIST']:.1f}), "
              f"writes {case['case_writes']:.1f}; per commit of {case['batch']}: {case['commit_ms']:.0f} ms, "
              f"reads {case['commit_reads']:.1f}, writes {case['commit_writes']:.1f}")
    for r in results.get("flow", []):
        if r["bench"] == "flow":
            print(f"\n[prefect] {r['cases']} cases: loop {r['loop_s']:.1f} s, flow {r['flow_s']:.1f} s "
                  f"(x{r['ratio_flow_vs_loop']:.2f} vs loop, {r['overhead_ms_per_case']:.1f} ms/case); CPU loop "
                  f"{r['loop_cpu_s']:.1f} s, flow {r['flow_cpu_s']:.1f} s ({r['cpu_overhead_ms_per_case']:.1f} ms/case); "
                  f"{r['task_runs']} task runs {r['task_runs_by_name']}, {r['task_run_states']} task-run states, "
                  f"{r['events']} events")
        elif r["bench"] == "flow-marginal":
            print(f"[prefect] per added case ({r['from_cases']}->{r['to_cases']}): flow {r['flow_ms_per_case']:.1f} ms, "
                  f"loop {r['loop_ms_per_case']:.1f} ms, overhead {r['overhead_ms_per_case']:.1f} ms wall, "
                  f"{r['cpu_overhead_ms_per_case']:.1f} ms CPU; "
                  f"{r['task_runs_per_case']:.2f} task runs, {r['states_per_case']:.2f} states, "
                  f"{r['events_per_case']:.2f} events")
        else:
            print(f"[prefect] {r['cases']} cases with generation_batch {r['generation_batch']}: flow {r['flow_s']:.1f} s "
                  f"(x{r['ratio_vs_generation_batch_1']:.2f} vs generation_batch 1; CPU x"
                  f"{r['cpu_ratio_vs_generation_batch_1']:.2f}); {r['task_runs']} task runs, "
                  f"{r['events']} events")


SCENARIOS = (  # (records per commit, checkpoint interval, optimize every N commits)
    (8, 100, None), (64, 100, None), (64, 100, 200), (512, 100, None))


def print_projections(results: dict) -> None:
    """Projected totals (EXTRAPOLATED from the fits above, linear in versions and files; see SCALE.md)."""
    print("\nprojection (extrapolated, not measured): commit model a + b*JSON-since-checkpoint + c*files, "
          "fitted per store above")
    for store in ("local", "s3"):
        if store in results:
            print(f"  [{store}] fit: {results[store]['model']}")
    print(f"  {'cases':>8s} {'batch':>5s} {'opt/N':>6s} {'commits':>8s} {'files':>7s} {'ckpts':>6s} {'ckpt MB':>8s} "
          f"{'commit h local':>14s} {'commit h s3':>11s} {'last commit s3':>14s} {'cases/s':>7s} {'S3 rd/case':>10s} "
          f"{'ids s':>7s}")
    for cases in (10**4, 10**5, 10**6):
        for batch, interval, every in SCENARIOS:
            p = project(results, cases, batch, interval=interval, optimize_every=every)
            q = project(results, cases, batch, interval=interval, optimize_every=every, store="s3") \
                if "s3" in results else None
            row = emit(bench="projection", **p, s3_commit_hours=q and q["commit_hours"],
                       s3_last_commit_s=q and q["last_commit_s"], s3_commit_reads_per_case=q and q["commit_reads"] / cases)
            print(f"  {cases:8d} {batch:5d} {str(every or '-'):>6s} {p['commits']:8d} {p['data_files']:7d} "
                  f"{p['checkpoints']:6d} {p['checkpoint_mb']:8.1f} {p['commit_hours']:14.2f} "
                  f"{(row['s3_commit_hours'] or 0):11.2f} {(row['s3_last_commit_s'] or 0):14.2f} "
                  f"{batch / (row['s3_last_commit_s'] or p['last_commit_s']):7.2f} "
                  f"{(row['s3_commit_reads_per_case'] or 0):10.1f} {p['committed_ids_s']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 1.5 minutes)")
    parser.add_argument("--batch", type=int, default=8, help="records per commit (runtime.batch_size)")
    parser.add_argument("--local-commits", type=int, default=300)
    parser.add_argument("--s3-commits", type=int, default=200)
    parser.add_argument("--s3-cases", type=int, default=16, help="cases through run_case on S3")
    parser.add_argument("--flow-cases", default="8,40", help="comma-separated case counts for flow runs")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each read timing (median)")
    parser.add_argument("--flow-repeat", type=int, default=2, help="runs of each loop and flow (fastest counts)")
    parser.add_argument("--generation-batch", type=int, default=8,
                        help="cases per generation task for one more flow run (runtime.generation_batch; 1 skips)")
    parser.add_argument("--probe-batches", type=lambda t: [int(x) for x in t.split(",")], default=[8, 64, 512],
                        help="records per commit to time on a fresh table (fixed cost per commit)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: local,s3,flow")
    args = parser.parse_args(argv)
    if args.quick:
        args.local_commits, args.s3_commits, args.s3_cases, args.flow_cases = 110, 0, 8, "8,24"
        args.flow_repeat, args.repeat, args.probe_batches = 1, 1, [8, 64]
    skip = set(filter(None, args.skip.split(",")))
    logging.getLogger("catalog").setLevel(logging.WARNING)
    from catalog.root import DatasetRoot

    results: dict = {}
    print(f"# bench_scale: python {sys.version.split()[0]}, {os.cpu_count()} cores, batch {args.batch}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        if "local" not in skip and args.local_commits:
            root = DatasetRoot.of(Path(tmp) / "local")
            results["local"] = grow(root, "local", args.local_commits, args.batch, None, args.repeat)
            results["variants"] = checkpoint_and_optimize(root, args.repeat)
            opt = next(r for r in results["variants"] if r.get("variant") == "after optimize")
            results["optimize_ms_per_row"] = opt["optimize_ms"] / opt["ids"]
            results["probe"] = batch_probe(Path(tmp), args.probe_batches)
            results["settings"] = settings_probe(Path(tmp))
        if "s3" not in skip and (args.s3_commits or args.s3_cases):
            with counting_s3() as s3:
                if args.s3_cases:
                    results["case"] = cases_on_s3(s3, args.s3_cases, args.batch)
                if args.s3_commits:
                    root = DatasetRoot.of(f"s3://{BUCKET}/grow", s3.delta_options)
                    results["s3"] = grow(root, "s3", args.s3_commits, args.batch, s3, 1)
        if "flow" not in skip and args.flow_cases:
            results["flow"] = flow_costs(Path(tmp), [int(k) for k in args.flow_cases.split(",")], args.batch,
                                         args.flow_repeat, args.generation_batch)
    print_table(results)
    if "local" in results:
        print_projections(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
