"""Finding 6: two ``ctfactory run`` processes of one spec on one root both succeed and record each case once.

On 3874b3d the later committer always died with RecordExistsError ("different timings_s"): records that
differ only in timing were treated as conflicts, and the catalog's existence check and append were not
one atomic step across processes (finding 5, tested at the catalog level in
tests/test_catalog_concurrency.py).
"""

from __future__ import annotations

import subprocess

import pytest

from _child import child_env, flows_argv
from _specs import tiny_spec_text
from catalog.store import open_catalog
from catalog.verify import verify_catalog


@pytest.mark.slow
def test_two_runs_of_one_spec_on_one_root_both_succeed(tmp_path):
    root = tmp_path / "ds"
    spec = tmp_path / "spec.yaml"
    spec.write_text(tiny_spec_text(root, name="twice", seed=9, count=4, steps=2,
                                   runtime="{device: cpu, batch_size: 1}"))
    runs = [subprocess.Popen(flows_argv("run", spec, "--no-progress"), env=child_env(tmp_path / f"prefect{k}"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
        assert "total                     4  passed 4  failed 0" in out
    cat = open_catalog(root)
    ids = cat.read_table("samples", columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == 4 and len(set(ids)) == 4  # each case recorded once
    report = verify_catalog(cat)
    assert report.ok and report.orphans == ()
    leftovers = [p.name for p in root.rglob("*.tmp")]
    assert leftovers == []
