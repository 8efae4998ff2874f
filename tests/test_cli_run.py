"""``ctfactory check-spec`` (and argument errors of ``run``/``submit``): exit codes and output."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main

SPECS = Path(__file__).resolve().parent.parent / "specs"


def test_check_spec_ok_prints_plan(capsys):
    assert main(["check-spec", str(SPECS / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset demo v0.2.0  spec_id ")
    assert "chest_nodules    3      chest+abdomen  lung_tumor  64x64x64" in out
    assert "total            6" in out


def test_check_spec_placeholder_model_notes_weights(capsys):
    assert main(["check-spec", str(SPECS / "chest_tumor.yaml")]) == 0
    out = capsys.readouterr().out
    assert "16 GB (decode preset 16g)" in out
    assert "note: model directory /models/maisi_ct_rflow is not on this machine" in out


def test_check_spec_bad_exit_2_with_every_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nversion: '1'\nmodel: preset:tiny\noutput_root: /o\ncohorts:\n"
                   "  - name: a\n    count: -1\n    body_region: chset\n")
    assert main(["check-spec", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctfactory check-spec: 2 problems in the dataset spec:\n")
    assert f"{bad}:7: cohorts[0].count expects a value greater than or equal to 1, but got count=-1." in err
    assert f"{bad}:8: cohorts[0].body_region expects one of" in err
    assert "DatasetSpec" not in err and "Cohort." not in err  # the spec's vocabulary, not class names
    assert "Did you mean 'chest'?" in err


def test_check_spec_geometry_error_exit_2(tmp_path, capsys):
    bad = tmp_path / "geo.yaml"
    bad.write_text((SPECS / "demo.yaml").read_text().replace("[64, 64, 64]", "[64, 64, 60]", 1))
    assert main(["check-spec", str(bad)]) == 2
    assert f"{bad}:20: cohorts[0].output_size on model default expects each output size divisible by 16 (VAE and UNet downsampling), " \
           "but got output_size_vox=[64, 64, 60]. Next valid: [64, 64, 64]." in capsys.readouterr().err


def test_run_bad_storage_option_and_missing_file(tmp_path, capsys):
    assert main(["run", str(SPECS / "demo.yaml"), "--storage-option", "novalue"]) == 2
    assert "--storage-option expects KEY=VALUE, but got 'novalue'." in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "load_spec expects an existing YAML file" in capsys.readouterr().err


def test_submit_without_api_url(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["submit", str(SPECS / "demo.yaml")]) == 2
    assert "submit expects PREFECT_API_URL to point at the Prefect server" in capsys.readouterr().err


def test_run_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--out", "--device", "--dask-address", "--dask-local", "--storage-option"):
        assert flag in out


def test_missing_mask_folder_stops_check_spec_and_run_before_any_case(tmp_path, capsys):
    """Issue 12: the run used to retry the same error 3x per case and store six permanent failures."""
    spec = tmp_path / "spec.yaml"
    spec.write_text((SPECS / "user_masks.yaml").read_text().replace("path: ./user_masks\n", "path: ./no-such-folder\n")
                    .replace("output_root: ../ctfactory-user-masks", "output_root: ./out"))
    assert "output_root: ./out" in spec.read_text()
    for command in (["check-spec", str(spec)], ["run", str(spec), "--no-progress"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"ctfactory {command[0]}: cohorts[0].mask_source (totalseg) expects an existing NIfTI file "
                       f"or folder, but got path={str(tmp_path / 'no-such-folder')!r}, which does not exist. Fix "
                       "mask_source.path. Relative paths in a spec are read from the spec file's folder."]
    assert not (tmp_path / "out").exists()
