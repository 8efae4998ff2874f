"""Adversarial inputs to ``ctfactory run``: every bad mask, model or output root gets its own one-line error.

Each case is a finding of the outside adversarial run on 3874b3d (issue 11, findings 8 and 9): there a bad
input crashed every case, and the run ended under Prefect tracebacks with "Catalog expects a samples table
… Append rows first", which buried the cause. Now an input that every case needs is refused before any
case (exit 2, one line naming the file and the cause); a file that only breaks when it is read in full
(a truncated gzip stream, float labels) fails its case, which is recorded as failed with the reason, and
the run's last line says so. Nothing is written outside the output root.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flows.cli import main

SPEC = """\
name: adv
version: "1"
model: {model}
output_root: {out}
seed: 0
cohorts:
  - name: c
    count: 2
    body_region: abdomen
    output_size: {size}
    spacing_mm: {spacing}
    num_inference_steps: 2
{mask}    qc: {{organ_hu_check: false, max_retries: 0}}
runtime: {{device: cpu}}
"""
USER_MASK = """    mask_source:
      type: user
      path: {path}
      label_mapping: maisi
"""


def _mask_array() -> np.ndarray:
    a = np.zeros((32, 32, 32), np.int16)
    a[4:28, 4:28, 4:28] = 200
    a[8:20, 8:20, 8:20] = 1
    return a


def _nifti_bytes(array: np.ndarray, srow: np.ndarray | None = None) -> bytes:
    img = nib.Nifti1Image(array, np.diag([4.0, 4.0, 4.0, 1.0]))
    raw = bytearray(img.to_bytes())
    if srow is not None:  # write a broken sform straight into the header, as a careless writer would
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
        header["qform_code"], header["sform_code"] = 0, 1
        header["srow_x"], header["srow_y"], header["srow_z"] = srow[0], srow[1], srow[2]
        raw[:348] = header.binaryblock
    return bytes(raw)


def _make_masks(base: Path) -> dict[str, Path]:
    good = gzip.compress(_nifti_bytes(_mask_array()))
    corrupt = bytearray(good)
    corrupt[40:60] = bytes(20)
    nan = np.diag([4.0, 4.0, 4.0, 1.0])
    nan[0, 0] = np.nan
    payloads = {
        "corrupt": bytes(corrupt),
        "truncated": good[: len(good) // 2],
        "float": gzip.compress(_nifti_bytes(_mask_array().astype(np.float32) + 0.5)),
        "4d": gzip.compress(_nifti_bytes(np.stack([_mask_array()] * 2, -1))),
        "empty": b"",
        "singular": gzip.compress(_nifti_bytes(_mask_array(), np.zeros((4, 4)))),
        "nan": gzip.compress(_nifti_bytes(_mask_array(), nan)),
        "huge": gzip.compress(_huge_header()),
    }
    out = {}
    for name, payload in payloads.items():
        (base / name).mkdir(parents=True)
        (base / name / "m.nii.gz").write_bytes(payload)
        out[name] = base / name / "m.nii.gz"
    (base / "loop").mkdir()
    os.symlink(base / "loop" / "m.nii.gz", base / "loop" / "m.nii.gz")
    out["loop"] = base / "loop" / "m.nii.gz"
    out["missing"] = base / "nowhere"
    return out


def _huge_header() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    return header.binaryblock + b"\0" * 4


def _make_models(base: Path) -> dict[str, Path]:
    from maisi_core.digest import sha256_file
    from maisi_core.engine.model_dir import _digest_of, packaged_model_path

    src = packaged_model_path("default")
    base.mkdir(parents=True)
    (base / "outside.json").write_text("{}")

    def variant(name, edit, reindex=True):
        d = base / name
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.png", "*.md"))
        index = json.loads((d / "model_index.json").read_text())
        edit(d, index)
        if reindex:  # a consistent index, so the damage is found by the load itself, not the digest
            index["files"] = {k: sha256_file(d / k) for k in index["files"]}
            index["digest"] = _digest_of(index["files"])
        (d / "model_index.json").write_text(json.dumps(index))
        return d

    def write(rel, data):
        return lambda d, index: (d / rel).write_bytes(data)

    def no_pipeline_config(d, index):
        index.pop("pipeline_config")

    def string_channels(d, index):
        cfg = json.loads((d / "unet/config.json").read_text())
        cfg["in_channels"] = "four"
        (d / "unet/config.json").write_text(json.dumps(cfg))

    def wrong_shapes(d, index):
        cfg = json.loads((d / "unet/config.json").read_text())
        cfg["num_channels"] = [2 * c for c in cfg["num_channels"]]
        (d / "unet/config.json").write_text(json.dumps(cfg))

    def linked_config(d, index):
        (d / "vae/config.json").unlink()
        os.symlink(base / "outside.json", d / "vae/config.json")

    def altered(d, index):
        weights = d / "vae/model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))

    return {
        "random_weights": variant("random_weights", write("vae/model.safetensors", os.urandom(4096))),
        "huge_safetensors_header": variant("huge_safetensors_header",
                                           write("vae/model.safetensors", struct.pack("<Q", 2**62) + b"{}")),
        "digest_mismatch": variant("digest_mismatch", altered, reindex=False),
        "no_pipeline_config": variant("no_pipeline_config", no_pipeline_config),
        "string_channels": variant("string_channels", string_channels),
        "wrong_shapes": variant("wrong_shapes", wrong_shapes),
        "linked_config": variant("linked_config", linked_config, reindex=False),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("adversarial-inputs")
    return {"masks": _make_masks(base / "masks"), "models": _make_models(base / "models")}


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def _run(tmp_path: Path, capsys, *, model="preset:tiny", mask: Path | None = None, out: Path | None = None,
         size="[32, 32, 32]", spacing="[4.0, 4.0, 4.0]") -> tuple[int, list[str], Path]:
    root = out or tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model=model, out=root, size=size, spacing=spacing,
                                mask=USER_MASK.format(path=mask) if mask else ""))
    before = _tree(tmp_path) - {"spec.yaml"}
    code = main(["run", str(spec), "--no-progress"])
    err = capsys.readouterr().err
    after = _tree(tmp_path) - {"spec.yaml"}
    written_outside = {p for p in after - before if not (tmp_path / p).resolve().is_relative_to(root.resolve())
                       and p != "out"}
    assert not written_outside, f"files written outside the output root: {sorted(written_outside)}"
    assert "Traceback" not in err, err
    return code, err.strip().splitlines(), root


# findings 8 and 10: refused before any case, exit 2, one line naming the file and the cause.
MASK_REFUSED = {
    "corrupt": "expects a valid gzip stream, but got a corrupt one",
    "4d": "expects a 3D volume (X, Y, Z), but got shape=(32, 32, 32, 2)",
    "empty": "expects a NIfTI-1 file, but got 0 bytes, less than a header",
    "singular": "expects a finite, invertible voxel-to-world affine",
    "nan": "expects a finite, invertible voxel-to-world affine",
    "loop": "a symbolic link that does not resolve (a loop or a missing target)",
    "huge": "expects a volume of at most 2147483648 bytes, but got a header declaring shape=(4096, 4096, 4096)",
    "missing": "expects an existing NIfTI file or folder, but got path=",
}


@pytest.mark.parametrize("name", sorted(MASK_REFUSED))
def test_bad_user_mask_is_refused_before_any_case(name, inputs, tmp_path, capsys):
    code, lines, root = _run(tmp_path, capsys, mask=inputs["masks"][name])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("ctfactory run: cohorts[0].mask_source (c) ")
    assert MASK_REFUSED[name] in lines[0] and str(inputs["masks"][name]) in lines[0]
    assert not root.exists()  # refused before anything was written


# Broken deep inside the file (found only when a case reads it): the case is refused, not recorded, and the
# run ends with exit 2 and the cause as its last line. Fixing the file and running again generates it.
MASK_FAILS_CASE = {
    "truncated": "mask: load_label expects a complete gzip stream, but got a truncated one",
    "float": "mask: load_label expects integer label IDs, but got the data of",
}


_OUR_FRAMES = ("/flows/", "/maisi_core/", "/catalog/")


def _own_lines(stderr: str) -> list[str]:
    """The lines ``ctfactory run`` wrote itself.

    Prefect's ephemeral server is a child process sharing this stderr; at shutdown it sometimes logs its
    own asyncio and database teardown (a Prefect server issue, not ours, and not the run's outcome). Those
    lines are left out; ours all start with ``ctfactory run:``.
    """
    return [line for line in stderr.splitlines() if line.startswith("ctfactory run:")]


@pytest.mark.slow
def test_mask_broken_inside_refuses_its_case_and_records_nothing(inputs, tmp_path):
    """A real ``ctfactory run`` process (its own stderr and ephemeral Prefect): the last line is the cause."""
    import subprocess
    import sys

    from catalog.store import open_catalog

    root = tmp_path / "out"
    masks = tmp_path / "masks"
    cohorts = []
    for name in sorted(MASK_FAILS_CASE):
        (masks / name).mkdir(parents=True)
        shutil.copy(inputs["masks"][name], masks / name / "m.nii.gz")
        cohorts.append(SPEC.format(model="preset:tiny", out=root, size="[32, 32, 32]", spacing="[4.0, 4.0, 4.0]",
                                   mask=USER_MASK.format(path=masks / name)).split("cohorts:\n")[1]
                       .split("runtime:")[0].replace("name: c", f"name: {name}").replace("count: 2", "count: 1"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.split("cohorts:")[0].format(model="preset:tiny", out=root) + "cohorts:\n"
                    + "".join(cohorts) + "runtime: {device: cpu}\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows", "run", str(spec), "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    ours = _own_lines(done.stderr)
    last = ours[-1]
    assert done.stderr.strip().splitlines()[-1] == last  # the cause is the very last line
    assert not any(frame in done.stderr for frame in _OUR_FRAMES), done.stderr[-3000:]  # no traceback of ours
    assert last.startswith("ctfactory run: generate_dataset expects usable inputs, but got 2 case(s) with an "
                           "unusable input, first adv-")
    assert any(reason in last for reason in MASK_FAILS_CASE.values()) and str(masks) in last
    assert not open_catalog(root).exists("samples") and not (root / "images").exists()  # nothing recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "prefect", "spec.yaml"]

    for name in MASK_FAILS_CASE:  # the user fixes the files; the next run generates both cases
        (masks / name / "m.nii.gz").write_bytes(gzip.compress(_nifti_bytes(_mask_array())))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert open_catalog(root).read_table("samples").num_rows == 2


MODEL_REFUSED = {
    "random_weights": "load_model_dir[vae] expects a safetensors weights file, but got model.safetensors that cannot be read",
    "huge_safetensors_header": "load_model_dir[vae] expects a safetensors weights file, but got model.safetensors that cannot be read",
    "digest_mismatch": "load_model_dir expects vae/model.safetensors to have sha256",
    "no_pipeline_config": "load_model_dir expects model_index.json to hold 'pipeline_config'",
    "string_channels": "but got unet.in_channels=four",
    "wrong_shapes": "load_model_dir[unet] expects weights of the configured architecture",
    "linked_config": "expects every file of model_index.json inside the model directory, but got file='vae/config.json'",
}


@pytest.mark.parametrize("name", sorted(MODEL_REFUSED))
def test_bad_model_directory_is_refused_before_any_case(name, inputs, tmp_path, capsys):
    code, lines, root = _run(tmp_path, capsys, model=inputs["models"][name], size="[64, 64, 64]",
                             spacing="[6.0, 6.0, 6.0]")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("ctfactory run: ") and MODEL_REFUSED[name] in lines[0]
    assert not root.exists()


def test_output_root_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, lines, _ = _run(tmp_path, capsys, out=target)
    assert code == 2 and lines == [f"ctfactory run: run expects the output root to be a folder, but got "
                                   f"output_root={str(target)!r}, which is a file. Pass --out DIR or change output_root."]
    assert target.read_text() == "keep me"


def test_output_root_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    code, lines, _ = _run(tmp_path, capsys, out=tmp_path / "a-file" / "ds")
    assert code == 2 and "lie under folders" in lines[0] and len(lines) == 1


@pytest.mark.parametrize("payload, expected", [
    (b"", "with an empty file"),
    (b"\x74\x36\x7e\x99" + bytes(200), "expects a torch checkpoint (a zip archive or a pickle), but got"),
    (b"PK\x03\x04garbage", "that cannot be read (PytorchStreamReader failed"),
])
def test_random_bytes_as_a_pt_checkpoint_are_one_line(payload, expected, tmp_path):
    from maisi_core.errors import WeightsError
    from maisi_core.engine.weights import load_torch_checkpoint

    path = tmp_path / "model.pt"
    path.write_bytes(payload)
    with pytest.raises(WeightsError) as info:
        load_torch_checkpoint(path)
    assert expected in str(info.value) and "model.pt" in str(info.value)
