"""Planning: deterministic expansion, geometry checked against the model's rules, paths inside the root."""

from __future__ import annotations

import pytest

from factory.errors import OutputPathError, SpecError
from factory.plan import (
    REGION_DEFAULTS,
    case_paths,
    estimate_gpu_memory_gb,
    format_plan,
    make_sample_id,
    plan_dataset,
)
from factory.spec import parse_spec, spec_id

SPEC = """\
name: demo
version: "1"
model: preset:tiny
output_root: /tmp/out
seed: 3
cohorts:
  - name: chest
    count: 3
    body_region: chest
    pathology: {type: lung_tumor, size_mm: [10, 20]}
    output_size: [32, 32, 32]
    spacing_mm: [8, 8, 8]
    num_inference_steps: 2
  - name: belly
    count: 2
    body_region: [abdomen]
"""


def test_plan_expands_cohorts_deterministically():
    spec = parse_spec(SPEC)
    plan = plan_dataset(spec)
    assert plan.spec_id == spec_id(spec)
    assert [c.sample_id for c in plan.cases] == [f"demo-chest-{i:05d}-{plan.spec_id[:8]}" for i in range(3)] + [
        f"demo-belly-{i:05d}-{plan.spec_id[:8]}" for i in range(2)]
    assert plan_dataset(parse_spec(SPEC)).cases == plan.cases
    first = plan.cases[0]
    assert first.tumor_label == 23 and first.tumor_size_mm == (10.0, 20.0) and first.num_inference_steps == 2
    assert first.image_uri == f"images/{first.sample_id}.nii.gz"
    assert first.label_uri == f"labels/{first.sample_id}.nii.gz"
    belly = plan.cases[-1]
    assert (belly.output_size, belly.spacing_mm) == REGION_DEFAULTS["abdomen"]
    assert belly.num_inference_steps == 30  # the tiny preset's default
    assert len({c.seed for c in plan.cases}) == 5
    assert plan.total_voxels == 3 * 32**3 + 2 * 512 * 512 * 128


def test_plan_checks_geometry_against_model_rules():
    text = SPEC.replace("model: preset:tiny", "model: {ref: /no/such/model, preset: maisi_ct_rflow}")
    with pytest.raises(SpecError) as info:
        plan_dataset(parse_spec(text, source="s.yaml"))
    assert str(info.value) == ("s.yaml:11: cohorts[0].output_size on model maisi_ct_rflow expects "
                               "output_size x and y in [256, 384, 512], but got output_size_vox=[32, 32, 32].")


def test_plan_reports_every_cohort_geometry_error():
    text = SPEC.replace("[32, 32, 32]", "[40, 40, 40]") + "    output_size: [24, 32, 32]\n"
    with pytest.raises(SpecError) as info:
        plan_dataset(parse_spec(text, source="s.yaml"))
    assert [(i.path, i.line) for i in info.value.issues] == [("cohorts[0].output_size", 11),
                                                             ("cohorts[1].output_size", 17)]
    assert "expects each output size divisible by 16" in str(info.value)


def test_plan_unknown_model_directory():
    text = SPEC.replace("model: preset:tiny", "model: /no/such/model")
    with pytest.raises(SpecError, match=r"<string>:3: model: load_pipeline expects 'preset:NAME', 'default' "
                                        r"or a model directory with model_index.json, but got "
                                        r"model='/no/such/model'"):
        plan_dataset(parse_spec(text))
    with pytest.raises(SpecError, match=r"get_preset expects one of .*, but got name='tiny2'\. Did you mean 'tiny'\?"):
        plan_dataset(parse_spec(SPEC.replace("preset:tiny", "preset:tiny2")))


def test_plan_paths_stay_inside_root(tmp_path):
    from catalog.errors import CatalogPathError
    from catalog.root import DatasetRoot

    assert DatasetRoot.of(tmp_path).resolve("images/a.nii.gz") == str(tmp_path / "images" / "a.nii.gz")
    assert DatasetRoot.of("s3://b/root/").resolve("images/a.nii.gz") == "s3://b/root/images/a.nii.gz"
    for bad in ("../x.nii.gz", "images/../../x", "/etc/passwd", "s3://other/x", ".."):
        with pytest.raises(CatalogPathError, match=r"DatasetRoot expects a (relative path inside the output "
                                                   r"root|path that stays inside)"):
            DatasetRoot.of(tmp_path).resolve(bad)
    with pytest.raises(OutputPathError, match=r"case_paths expects a safe sample_id, but got sample_id='\.\./x'\."):
        case_paths("../x")
    with pytest.raises(OutputPathError, match=r"make_sample_id expects letters, digits"):
        make_sample_id("a/b", "c", 0, "0" * 16)


def test_plan_memory_estimate_and_table():
    from maisi_core.engine.presets import maisi_ct_rflow, tiny

    assert estimate_gpu_memory_gb(maisi_ct_rflow(), (512, 512, 128), None) == (16.0, "decode preset 16g")
    assert estimate_gpu_memory_gb(maisi_ct_rflow(), (512, 512, 512), None) == (24.0, "decode preset 24g")
    assert estimate_gpu_memory_gb(maisi_ct_rflow(), (512, 512, 768), None) == (80.0, "decode preset 80g")
    assert estimate_gpu_memory_gb(maisi_ct_rflow(), (256, 256, 128), "32g") == (32.0, "decode preset 32g")
    assert estimate_gpu_memory_gb(tiny(), (32, 32, 32), None)[1] == "whole-volume decode, rough"
    spec = parse_spec(SPEC)
    text = format_plan(spec, plan_dataset(spec))
    assert "chest   3      chest    lung_tumor  32x32x32" in text
    assert text.splitlines()[-1].startswith("total   5")


def test_plan_reads_geometry_from_a_model_directory(tmp_path, tiny_pipe):
    # regression: the planner read only model_index.json and failed on real model directories
    tiny_pipe.save_pretrained(tmp_path / "model")
    plan = plan_dataset(parse_spec(SPEC.replace("model: preset:tiny", f"model: {tmp_path / 'model'}")))
    assert len(plan.cases) == 5
    bad = SPEC.replace("model: preset:tiny", f"model: {tmp_path / 'model'}").replace("[32, 32, 32]", "[40, 40, 40]")
    with pytest.raises(SpecError, match=r"expects each output size divisible by 16"):
        plan_dataset(parse_spec(bad))
