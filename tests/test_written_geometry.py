"""The QC reads back what a case wrote: a file whose header lost the geometry fails and is not published.

Issue 13: the old affine check compared the mask's affine with itself (the generator passes it through),
so it could never fail in the factory.
"""

from __future__ import annotations

import numpy as np
import pytest

import maisi_core.io as mio
from _specs import tiny_spec
from catalog.root import DatasetRoot
from factory.case import SleepGenerator, run_case
from factory.plan import plan_dataset
from maisi_core.evaluation.qc import check_written_geometry


def _request(tmp_path, retries: int = 1):
    spec = tiny_spec(tmp_path, name="geo", qc=f"{{organ_hu_check: false, max_retries: {retries}}}")
    return plan_dataset(spec).cases[0]


def test_a_clean_case_passes_and_its_files_declare_the_planned_geometry(tmp_path):
    record = run_case(_request(tmp_path), SleepGenerator(0.0), root=DatasetRoot.of(tmp_path))
    assert record.status == "passed", record.failure_reason
    shape, affine = mio.check_nifti_header(tmp_path / record.label_uri)
    assert shape == (32, 32, 32) and np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 8.0)


@pytest.mark.parametrize("damage", ["shift", "spacing"])
def test_a_label_written_with_a_wrong_affine_fails_and_nothing_is_published(tmp_path, monkeypatch, damage):
    real = mio.save_label

    def broken_save_label(uri, array, affine, **kw):  # a writer that mangles the geometry
        bad = np.array(affine, float)
        if damage == "shift":
            bad[:3, 3] += 5.0
        else:
            bad[:3, :3] *= 0.5
        return real(uri, array, bad, **kw)

    monkeypatch.setattr(mio, "save_label", broken_save_label)
    record = run_case(_request(tmp_path), SleepGenerator(0.0), root=DatasetRoot.of(tmp_path))
    assert record.status == "failed"
    expected = "written label: affine differs" if damage == "shift" else "written label: voxel size"
    assert any(expected in f for f in record.qc_failures), record.qc_failures
    assert not list(tmp_path.glob("images/*")) and not list(tmp_path.glob("labels/*"))


def test_check_written_geometry_names_each_difference():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    ok = ((16, 16, 8), affine)
    assert check_written_geometry(ok, ok, shape=(16, 16, 8), affine=affine, spacing_mm=(2, 2, 3)) == []
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])  # a writer that turned RAS into LPS-like x
    failures = check_written_geometry(ok, ((16, 16, 8), flipped), shape=(16, 16, 8), affine=affine,
                                      spacing_mm=(2, 2, 3))
    assert [f.check for f in failures] == ["written_affine"]
    wrong = check_written_geometry(((16, 16, 9), affine), ok, shape=(16, 16, 8), affine=affine, spacing_mm=(2, 2, 2))
    assert {f.check for f in wrong} == {"written_shape", "written_spacing"}
