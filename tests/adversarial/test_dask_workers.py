"""Scale-out through Dask (issue 16, item 3): a worker that dies loses no committed case and no row is doubled;
each worker process loads the model once.

Both tests run ``ctfactory run --dask-local 2`` in a child process (a temporary LocalCluster of two worker
processes). Dask reruns the task of a worker that died on another worker, so the dead worker's cases are
either finished there or, at worst, left for the next run, which completes them with the same seeds.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import psutil
import pytest

from _child import child_env, flows_argv, wait_for
from _specs import tiny_spec_text
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from factory.plan import plan_dataset
from factory.spec import load_spec


def _dask_workers(run: subprocess.Popen) -> list[psutil.Process]:
    """The LocalCluster's worker processes: the run's children started by multiprocessing's spawn."""
    return [p for p in psutil.Process(run.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())]


def _check_rows(root: Path, spec_file: Path) -> list[dict]:
    rows = open_catalog(root).read_table().to_pylist()
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a case was recorded twice: {sorted(ids)}"
    assert set(ids) <= {c.sample_id for c in plan_dataset(load_spec(spec_file)).cases}
    for row in rows:
        assert hashlib.sha256((root / row["image_uri"]).read_bytes()).hexdigest() == row["image_sha256"]
    return rows


@pytest.mark.slow
def test_a_dask_worker_killed_mid_run_loses_no_case_and_doubles_no_row(tmp_path):
    root = tmp_path / "ds"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(tiny_spec_text(root, name="killed-worker", seed=12, count=6, steps=1,
                                        runtime="{batch_size: 1, generator: 'sleep:3', threads: 1}"))
    env = child_env(tmp_path / "prefect")
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen(flows_argv("run", spec_file, "--dask-local", "2", "--no-progress"), env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any((root / "images").glob("*.nii.gz")) if (root / "images").is_dir() else False,
                 240, "the first written case")
        workers = wait_for(lambda: _dask_workers(run), 30, "the Dask worker processes")
        committed_before = open_catalog(root).read_table().num_rows if (root / "catalog").is_dir() else 0
        workers[0].kill()  # mid-run: the other cases are still sleeping on both workers
        code = run.wait(300)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert "lose" in output or "Restarting worker" in output, output[-3000:]  # Dask saw the worker die
    assert code in (0, 1), output[-3000:]
    rows = _check_rows(root, spec_file)
    assert len(rows) >= committed_before
    if code == 0:
        assert len(rows) == 6
    again = subprocess.run(flows_argv("run", spec_file, "--dask-local", "2", "--no-progress"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"skipped (already committed) {len(rows)}" in again.stdout
    assert len(_check_rows(root, spec_file)) == 6
    assert verify_catalog(open_catalog(root)).ok


@pytest.mark.slow
def test_each_dask_worker_loads_the_model_once(tmp_path):
    root = tmp_path / "ds"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(tiny_spec_text(root, name="load-once", seed=13, count=6, steps=1,
                                        runtime="{batch_size: 6, generation_batch: 1, threads: 1}"))
    done = subprocess.run(flows_argv("run", spec_file, "--dask-local", "2", "--no-progress"),
                          env=child_env(tmp_path / "prefect"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = _check_rows(root, spec_file)
    assert len(rows) == 6 and {r["generation_batch"] for r in rows} == {1}  # six tasks of one case
    loads = [r for r in rows if "model_load" in dict(r["timings_s"])]
    assert 1 <= len(loads) <= 2, [dict(r["timings_s"]) for r in rows]  # once per worker process, not per case
