"""Relative paths in a spec resolve against the spec file's folder (issue 12, item 6), never the shell's.

The spec is hashed as written, so the same file gives the same ``spec_id`` wherever it is checked out.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factory.errors import SpecError
from factory.plan import plan_dataset
from factory.preflight import check_mask_sources
from factory.spec import load_spec, parse_spec, spec_id
from maisi_core.errors import MaskSourceError

SPEC = """\
name: paths
version: "1"
model: {model}
output_root: {out}
cohorts:
  - name: a
    count: 2
    body_region: abdomen
    output_size: [32, 32, 32]
    spacing_mm: [4.0, 4.0, 4.0]
    mask_source: {{type: user, path: {masks}, label_mapping: {{1: liver}}, unmapped: background, add_body: true}}
{extra}"""


def _mask(path: Path) -> None:
    data = np.zeros((32, 32, 32), np.uint8)
    data[8:24, 8:24, 8:24] = 1
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), path)


def _project(root: Path, *, model: str = "preset:tiny", out: str = "./out", masks: str = "./masks",
             extra: str = "") -> Path:
    (root / "specs" / "masks").mkdir(parents=True)
    _mask(root / "specs" / "masks" / "m0.nii.gz")
    spec = root / "specs" / "spec.yaml"
    spec.write_text(SPEC.format(model=model, out=out, masks=masks, extra=extra))
    return spec


def test_relative_paths_resolve_against_the_spec_folder_not_the_current_one(tmp_path, monkeypatch):
    spec_file = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the user runs `ctfactory run ../specs/spec.yaml` from another folder
    spec = load_spec(os.path.relpath(spec_file))
    assert spec.base_dir == str(spec_file.parent.resolve())
    assert spec.output_uri == str(spec_file.parent.resolve() / "out")
    check_mask_sources(spec)  # finds ./masks next to the spec, not in ./elsewhere
    plan = plan_dataset(spec)
    assert {c.mask_source.path for c in plan.cases} == {str(spec_file.parent.resolve() / "masks")}


def test_same_spec_file_gives_the_same_spec_id_wherever_it_lies(tmp_path):
    first = load_spec(_project(tmp_path / "one"))
    second = load_spec(_project(tmp_path / "two" / "deeper"))
    assert first.base_dir != second.base_dir
    assert spec_id(first) == spec_id(second)
    assert spec_id(first) == spec_id(parse_spec(_project(tmp_path / "three").read_text()))


def test_uris_and_absolute_paths_are_left_alone(tmp_path):
    spec = load_spec(_project(tmp_path, out="s3://bucket/ds", masks=str(tmp_path / "specs" / "masks")))
    assert spec.output_uri == "s3://bucket/ds"
    assert spec.resolve_path(str(tmp_path / "x")) == str(tmp_path / "x")
    assert spec.model_location == "preset:tiny"


def test_a_packaged_model_name_stays_a_name_and_a_model_folder_resolves(tmp_path):
    assert load_spec(_project(tmp_path / "a", model="default")).model_location == "default"
    spec = load_spec(_project(tmp_path / "b", model="../models/mine"))
    assert spec.model_location == str((tmp_path / "b" / "models" / "mine").resolve())


def test_base_dir_in_the_spec_resolves_against_the_spec_folder(tmp_path):
    spec_file = _project(tmp_path, masks="./specs/masks", extra="base_dir: ..\n")
    spec = load_spec(spec_file)
    assert spec.base_dir == str(tmp_path.resolve())
    check_mask_sources(spec)


def test_a_spec_parsed_from_text_keeps_paths_relative_to_the_current_folder(tmp_path, monkeypatch):
    spec_file = _project(tmp_path)
    monkeypatch.chdir(spec_file.parent)
    spec = parse_spec(spec_file.read_text())
    assert spec.base_dir is None and spec.output_uri == "./out"
    check_mask_sources(spec)


def test_missing_relative_mask_folder_names_the_resolved_path_and_the_rule(tmp_path, monkeypatch):
    spec_file = _project(tmp_path, masks="./nowhere")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MaskSourceError) as info:
        check_mask_sources(load_spec(spec_file))
    message = str(info.value)
    assert message.startswith("cohorts[0].mask_source (a) expects an existing NIfTI file or folder")
    assert str(spec_file.parent.resolve() / "nowhere") in message
    assert "read from the spec file's folder" in message


def test_missing_mask_generator_checkpoint_is_refused(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC.replace(
        "{{type: user, path: {masks}, label_mapping: {{1: liver}}, unmapped: background, add_body: true}}",
        "{{type: maisi_mask_generator, preset: official, autoencoder_path: ./ae.pt, diffusion_path: ./diff.pt}}")
        .format(model="preset:tiny", out="./out", extra=""))
    (tmp_path / "ae.pt").write_bytes(b"")
    with pytest.raises(MaskSourceError, match="diffusion_path to be an existing checkpoint file"):
        check_mask_sources(load_spec(spec_file))


def test_check_spec_from_another_folder_shows_the_resolved_output_root(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    spec_file = _project(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["check-spec", "../specs/spec.yaml"]) == 0
    assert f"output_root {spec_file.parent.resolve() / 'out'}\n" in capsys.readouterr().out


def test_base_dir_typo_is_a_spec_error_with_a_suggestion(tmp_path):
    with pytest.raises(SpecError, match="Did you mean 'base_dir'"):
        parse_spec(_project(tmp_path).read_text() + "bse_dir: x\n")
