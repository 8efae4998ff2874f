"""``ctfactory run --retry-failed`` (issue 12): recorded failures get new attempt seeds, their rows are replaced in
one commit, and the failed rows stay readable in earlier versions."""

from __future__ import annotations

import pytest

from _specs import UNREACHABLE_QC, tiny_spec
from catalog.root import DatasetRoot
from catalog.store import open_catalog
from factory.case import SleepGenerator, run_case
from factory.plan import attempt_seed, plan_dataset


def _spec(root, qc="{organ_hu_check: false, max_retries: 1}"):
    return tiny_spec(root, name="retry", seed=4, count=2, steps=2, qc=qc, runtime="{device: cpu}")


def test_a_failure_retried_on_later_seeds_replaces_its_row_and_keeps_history(tmp_path):
    from maisi_core.errors import MaskSourceError
    from factory.case import make_case_mask

    request = plan_dataset(_spec(tmp_path)).cases[0]
    early = {attempt_seed(request.seed, k) for k in range(2)}

    def mask_fn(req, seed):  # the first two attempt seeds cannot place a mask; later ones can
        if seed in early:
            raise MaskSourceError("no room for the mask on this seed")
        return make_case_mask(req, seed)

    cat = open_catalog(tmp_path)
    failed = run_case(request, SleepGenerator(0.0), root=DatasetRoot.of(tmp_path), make_mask_fn=mask_fn)
    assert (failed.status, failed.attempt) == ("failed", 1)
    first = cat.append_samples([failed])
    again = run_case(request.model_copy(update={"first_attempt": failed.attempt + 1}), SleepGenerator(0.0),
                     root=DatasetRoot.of(tmp_path), make_mask_fn=mask_fn)
    assert (again.status, again.attempt, again.seed) == ("passed", 2, attempt_seed(request.seed, 2))
    with pytest.raises(Exception, match="different"):  # a plain append refuses to change a committed row
        cat.append_samples([again])
    version = cat.replace_failed_samples([again])
    rows = cat.read_table("samples").to_pylist()
    assert [(r["sample_id"], r["status"], r["attempt"]) for r in rows] == [(request.sample_id, "passed", 2)]
    old = cat.read_table("samples", as_of=first).to_pylist()
    assert [(r["status"], r["attempt"]) for r in old] == [("failed", 1)]  # provenance: the failure is kept
    assert version > first and (tmp_path / again.image_uri).is_file()
    assert cat.replace_failed_samples([again]) == version  # no longer failed: nothing to replace


def test_run_retry_failed_through_the_flow(prefect_backend, tmp_path):
    from flows.generate import run_generate

    spec = _spec(tmp_path / "ds", qc=UNREACHABLE_QC)
    first = run_generate(spec)
    assert (first["n_failed"], first["generated"]) == (2, 2)
    cat = open_catalog(tmp_path / "ds")
    before = cat.version
    assert run_generate(spec)["generated"] == 0  # failures count as done without the flag
    again = run_generate(spec, retry_failed=True)
    assert (again["retried"], again["generated"], again["n_samples"], again["n_failed"]) == (2, 2, 2, 2)
    rows = cat.read_table("samples").to_pylist()
    assert sorted(r["attempt"] for r in rows) == [3, 3]  # attempts 2 and 3: new seeds, not the old ones
    assert cat.version > before and len({r["sample_id"] for r in rows}) == 2
    assert sorted(r["attempt"] for r in cat.read_table("samples", as_of=before).to_pylist()) == [1, 1]
