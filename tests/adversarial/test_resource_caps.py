"""Finding 10: what one spec may plan is capped (cases and voxels over all cohorts), and planning is linear.

On 3874b3d ``count: 1000000`` (then the allowed maximum) took check-spec 113 s and 4.1 GB, no cap applied
across cohorts, and a spec planning petabytes was accepted. Headers and gzip streams that declare or
inflate past the caps are covered in tests/test_io.py and tests/adversarial/test_bad_inputs.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.cli import main
from factory.errors import SpecError
from factory.plan import MAX_PLANNED_CASES, CaseRequest, plan_dataset
from factory.spec import parse_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


def _demo(tmp_path: Path, *counts: int) -> Path:
    text = (SPECS / "demo.yaml").read_text()
    for count in counts:
        text = text.replace("count: 3", f"count: {count}", 1)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_a_million_cases_is_refused_at_once(tmp_path, capsys):
    path = _demo(tmp_path, 1_000_000, 3)
    t0 = time.perf_counter()
    assert main(["check-spec", str(path)]) == 2
    assert time.perf_counter() - t0 < 30  # 113 s on 3874b3d; the cap is checked before any case is built
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ctfactory check-spec: {path}:13: cohorts: plan_dataset expects at most 100,000 cases per spec "
                   "(all cohorts), but got cases=1,000,003. Split the dataset into several specs, or raise the cap "
                   "with CTFACTORY_MAX_CASES."]


def test_the_case_cap_counts_every_cohort(tmp_path):
    with pytest.raises(SpecError, match=r"at most 100,000 cases per spec \(all cohorts\), but got cases=120,000"):
        plan_dataset(parse_spec(_demo(tmp_path, 60_000, 60_000).read_text()))


def test_the_voxel_cap_counts_every_cohort(tmp_path):
    text = (SPECS / "chest_tumor.yaml").read_text().replace("count: 200", "count: 12000")
    text = text.replace("[512, 512, 128]", "[512, 512, 768]")
    with pytest.raises(SpecError, match=r"at most 2,000,000,000,000 voxels per spec .* but got "
                                        r"voxels=2,415,919,104,000\. "):
        plan_dataset(parse_spec(text))


def test_operator_sets_the_caps_through_the_environment(tmp_path, monkeypatch):
    spec = parse_spec(_demo(tmp_path, 3, 3).read_text())
    monkeypatch.setenv("CTFACTORY_MAX_CASES", "5")
    with pytest.raises(SpecError, match="but got cases=6. .* CTFACTORY_MAX_CASES"):
        plan_dataset(spec)
    monkeypatch.setenv("CTFACTORY_MAX_CASES", "many")
    with pytest.raises(SpecError, match="expects CTFACTORY_MAX_CASES to be a positive number, but got "
                                        "CTFACTORY_MAX_CASES='many'"):
        plan_dataset(spec)
    monkeypatch.delenv("CTFACTORY_MAX_CASES")
    monkeypatch.setenv("CTFACTORY_MAX_VOXELS", "1e6")
    with pytest.raises(SpecError, match=r"at most 1,000,000 voxels per spec"):
        plan_dataset(spec)


def test_planning_the_maximum_count_is_linear_and_fast(tmp_path):
    """1.6 s for 100,000 cases on the 2-core box (measured); the bound only catches a quadratic regression."""
    half = MAX_PLANNED_CASES // 2
    spec = parse_spec(_demo(tmp_path, half, half).read_text())
    t0 = time.perf_counter()
    plan = plan_dataset(spec)
    elapsed = time.perf_counter() - t0
    assert len(plan.cases) == MAX_PLANNED_CASES and elapsed < 30
    assert len({c.sample_id for c in plan.cases}) == MAX_PLANNED_CASES
    for case in (plan.cases[1], plan.cases[half + 7]):  # copies hold exactly what validation would give
        assert CaseRequest.model_validate(case.model_dump()) == case
    first, second = plan.cases[0], plan.cases[1]
    assert second.qc is first.qc and second.mask_source is first.mask_source  # shared, not one copy per case
    assert (second.case_index, second.cohort, second.seed != first.seed) == (1, "chest_nodules", True)
