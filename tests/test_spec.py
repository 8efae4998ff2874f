"""Dataset specs: validation messages (file, YAML path, line, rule, hint), examples, spec_id, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.errors import SpecError
from factory.plan import attempt_seed, case_seed, make_sample_id
from factory.spec import json_schema, load_spec, parse_spec, spec_id, validate_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"

BASE = """\
name: demo
version: "1"
model: preset:tiny
output_root: /tmp/out
cohorts:
  - name: a
    count: 2
    body_region: chest
"""

# (replacement of the cohort block or extra top-level text, expected line, path, message fragment)
BROKEN = [
    ("outptu_root: /x\n", 9, "outptu_root", "expects only the fields ['base_dir', 'cohorts', 'description', 'model', "
     "'name', 'output_root', 'runtime', 'schedule', 'seed', 'version'], but got outptu_root='/x'. "
     "Did you mean 'output_root'?"),
    ("    pathology: {type: lung_tumour, size_mm: [5, 10]}\n", 9, "cohorts[0].pathology.type",
     "expects type in ['lung_tumor', 'hepatic_tumor', 'pancreatic_tumor', 'colon_tumor', 'bone_lesion'], but got "
     "type='lung_tumour'. Did you mean 'lung_tumor'?"),
    ("    pathology: {type: lung_tumor, size_mm: [20, 10]}\n", 9, "cohorts[0].pathology",
     "Tumor expects size_mm [min, max] with 0 < min <= max <= 300, but got size_mm=[20.0, 10.0]."),
    ("    pathology: {type: hepatic_tumor, size_mm: [5, 10]}\n", 6, "cohorts[0]",
     "Cohort expects a body_region containing the hepatic_tumor's host (abdomen), but got body_region=['chest']."),
    ("    mask_source: {type: foldr}\n", 9, "cohorts[0].mask_source",
     "expects type in ['phantom', 'folder', 'user', 'maisi_mask_generator'], but got type='foldr'. "
     "Did you mean 'folder'?"),
    ("    mask_source: {type: user, path: /m}\n", 9, "cohorts[0].mask_source.label_mapping",
     "cohorts[0].mask_source expects the field 'label_mapping', but got none. Add it."),
    ("    qc: {thresholds_hu: {livr: [0, 100]}}\n", 9, "cohorts[0].qc",
     "QCSettings expects thresholds_hu organs from ['bone', 'brain', 'kidney', 'liver', 'lung', 'pancreas', "
     "'spleen'], but got organ='livr'. Did you mean 'liver'?"),
    ("    count: 3\n", 9, "cohorts[0].count", "expects each key once per mapping, but got key='count' again "
     "(first on line 7)."),
    ("    num_inference_steps: 0\n", 9, "cohorts[0].num_inference_steps",
     "expects a value greater than or equal to 1, but got num_inference_steps=0."),
    ("    output_size: [32, 32]\n", 9, "cohorts[0].output_size",
     "expects more items in cohorts[0].output_size, but got no item [2]."),
    ("schedule: {cron: '0 2 *'}\n", 9, "schedule",
     "Schedule expects a five-field cron expression (minute hour day month weekday), but got cron='0 2 *' (not five fields)."),
    ("schedule: {cron: '0 2 * * *', interval_minutes: 5}\n", 9, "schedule",
     "Schedule expects exactly one of cron or interval_minutes"),
    ("runtime: {device: gpu}\n", 9, "runtime.device", "expects a string matching pattern"),
    ("    colour: red\n", 9, "cohorts[0].colour", "but got colour='red'."),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("extra", "line", "path", "fragment"), BROKEN, ids=[b[2] + str(i) for i, b in enumerate(BROKEN)])
def test_spec_broken_rejected_with_location(tmp_path, extra, line, path, fragment):
    file = _write(tmp_path, BASE + extra)
    with pytest.raises(SpecError) as info:
        load_spec(file)
    msg = str(info.value)
    where = f"{file}:{line}: "
    (issue,) = [text[len(where):] for text in msg.splitlines() if text.startswith(where)]
    subject = issue.split(" expects ", 1)[0]  # the spec's own path says who, never a class name
    assert subject in (path, "spec") or path.startswith((subject + ".", subject + "[")) or subject.startswith(path + " on ")
    assert fragment.replace("Tumor expects", "expects").replace("Cohort expects", "expects") \
        .replace("QCSettings expects", "expects").replace("Schedule expects", "expects") in msg


def test_spec_region_did_you_mean(tmp_path):
    file = _write(tmp_path, BASE.replace("body_region: chest", "body_region: [thorx]"))
    with pytest.raises(SpecError, match=r"spec\.yaml:8: cohorts\[0\]\.body_region expects one "
                                         r"of \[.*\], but got region='thorx'\. Did you mean 'thorax'\?"):
        load_spec(file)


def test_spec_reports_every_error_at_once(tmp_path):
    text = BASE.replace("count: 2", "count: 0").replace("model: preset:tiny", "modle: preset:tiny")
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, text + "seed: -1\n"))
    err = info.value
    assert str(err).startswith("3 problems in the dataset spec:")  # no "model missing" next to "modle"
    assert [i.path for i in err.issues] == ["modle", "cohorts[0].count", "seed"]
    assert [i.line for i in err.issues] == [3, 7, 9]
    assert "spec expects only the fields [" in str(err) and "Did you mean 'model'?" in str(err)


def test_spec_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(SpecError, match=r"spec\.yaml:3: spec expects valid YAML, but got a syntax error"):
        load_spec(_write(tmp_path, "name: a\nversion: '1'\nmodel: x: y\n"))


def test_spec_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"spec expects a mapping at the top level, but got list\."):
        load_spec(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(SpecError, match=r"load_spec expects an existing YAML file, but got path='.*nope.yaml'\."):
        load_spec(tmp_path / "nope.yaml")


def test_spec_safe_loader_refuses_python_tags(tmp_path):
    with pytest.raises(SpecError, match="spec expects valid YAML, but got a syntax error"):
        load_spec(_write(tmp_path, BASE + "x: !!python/object/apply:os.system ['true']\n"))


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_spec_examples_parse(path):
    spec = load_spec(path)
    assert spec.cohorts and len(spec_id(spec)) == 16


def test_spec_examples_cover_the_four_kinds():
    assert {p.name for p in SPECS.glob("*.yaml")} >= {"demo.yaml", "chest_tumor.yaml", "benchmark_mixed.yaml",
                                                       "user_masks.yaml"}


def test_spec_schema_file_up_to_date():
    stored = json.loads((SPECS / "schema.json").read_text())
    assert stored == json.loads(json.dumps(json_schema())), (
        "specs/schema.json is stale: run python -c \"from factory.spec import write_json_schema; "
        "write_json_schema('specs/schema.json')\"")


def test_spec_id_stable_under_reordering_comments_and_runtime():
    a = parse_spec(BASE)
    b = parse_spec("# a comment\ncohorts:\n  - body_region: [thorax]  # alias\n    count: 2\n    name: a\n"
                   "output_root: s3://elsewhere\nmodel: {ref: 'preset:tiny'}\nversion: '1'\nname: demo\n"
                   "runtime: {batch_size: 3}\nschedule: {interval_minutes: 5}\n")
    assert spec_id(a) == spec_id(b)
    assert spec_id(a) != spec_id(parse_spec(BASE.replace("count: 2", "count: 3")))
    assert spec_id(a) != spec_id(parse_spec(BASE + "seed: 1\n"))


def test_spec_validate_dict_without_file():
    with pytest.raises(SpecError, match=r"^<dict>: spec expects the field 'cohorts', but got none\. Add it\."):
        validate_spec({"name": "x", "version": "1", "model": "preset:tiny", "output_root": "/o"})


def test_sample_id_and_seed_determinism():
    sid = "0123456789abcdef"
    assert make_sample_id("demo", "chest", 7, sid) == "demo-chest-00007-01234567"
    s = case_seed(sid, 0, "chest", 7)
    assert s == case_seed(sid, 0, "chest", 7) and 0 <= s < 2**31
    assert len({case_seed(sid, 0, "chest", i) for i in range(100)}) == 100
    assert case_seed(sid, 1, "chest", 7) != s and case_seed(sid, 0, "abdomen", 7) != s
    assert attempt_seed(s, 0) == s and attempt_seed(s, 1) != s and attempt_seed(s, 1) == attempt_seed(s, 1)
