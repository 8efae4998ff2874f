"""A sample row takes the case's identity fields from the request by one shared list (issue 13)."""

from __future__ import annotations

from _specs import tiny_spec
from catalog.root import DatasetRoot
from catalog.schema import CASE_FIELDS, SampleRecord
from factory.case import SleepGenerator, run_case
from factory.plan import CaseRequest, plan_dataset


def test_every_shared_field_exists_on_both_sides():
    assert set(CASE_FIELDS) <= set(CaseRequest.model_fields)
    assert set(CASE_FIELDS) <= {f.name for f in SampleRecord.__dataclass_fields__.values()}


def test_a_record_carries_the_request_values(tmp_path):
    spec = tiny_spec(tmp_path, name="fields", count=2, pathology="{type: lung_tumor, size_mm: [10, 20]}",
                     qc="{organ_hu_check: false, tumor_check: false}")
    request = plan_dataset(spec).cases[1]
    record = run_case(request, SleepGenerator(0.0), root=DatasetRoot.of(tmp_path))
    for name in CASE_FIELDS:
        assert getattr(record, name) == getattr(request, name), name
    assert record.tumor_label == 23 and record.case_index == 1
