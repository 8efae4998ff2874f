"""nnU-Net v2 backend of the utility comparison: raw dataset, labels, trainer choice, env; slow: a real run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from maisi_core.errors import CheckpointError, ConfigError, LabelMapError
from maisi_core.evaluation import utility_nnunet as un
from maisi_core.evaluation.utility import LabeledCase, UtilityConfig



def _has_nnunet() -> bool:
    try:
        un.check_nnunet_installed()
    except un.NnUNetNotInstalledError:
        return False
    return True


HAS_NNUNET = _has_nnunet()
needs_nnunet = pytest.mark.skipif(not HAS_NNUNET, reason="nnunetv2 is not installed (pip install 'ctfactory[nnunet]')")

LIVER, SPLEEN, BODY = 1, 3, 200
SPACING_MM = 6.0
EPOCHS = 2  # slow test: 2 epochs x 25 iterations of two 16^3 patches


def make_phantom(case_id: str, seed: int, size: int = 32) -> LabeledCase:
    """A (size,)*3 case at 6 mm: body 200 (~0 HU) holding a liver sphere (~60 HU) and a spleen sphere (~140 HU)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros((size,) * 3, dtype=np.uint8)
    label[2:-2, 2:-2, 2:-2] = BODY
    image = np.full((size,) * 3, -1000.0, dtype=np.float32)
    image[label == BODY] = 0.0
    for sid, hu, lo, hi in ((LIVER, 60.0, 0.25, 0.4), (SPLEEN, 140.0, 0.6, 0.75)):
        centre = rng.uniform(lo * size, hi * size, size=3)
        radius = rng.uniform(0.11 * size, 0.17 * size)
        inside = np.linalg.norm(grid - centre, axis=-1) <= radius
        label[inside] = sid
        image[inside] = hu
    image += rng.normal(0.0, 10.0, size=image.shape).astype(np.float32)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = (-90.0, -80.0, 10.0)
    return LabeledCase(case_id, image, label, affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


# ----------------------------------------------------------------------------------------- labels


def test_build_label_table_is_consecutive_over_sorted_ids():
    assert un.build_label_table([28, 3, 1, 3]) == {1: 1, 2: 3, 3: 28}


@pytest.mark.parametrize("structures", [[], [0, 1], [-1]])
def test_build_label_table_rejects_bad_structures(structures):
    with pytest.raises(LabelMapError) as exc:
        un.build_label_table(structures)
    assert str(exc.value) == ("NnUNetBackend expects scored MAISI IDs in 1..65535, at least one, but got "
                              f"structures={structures}.")


def test_labels_round_trip_and_unscored_ids_become_background():
    table = un.build_label_table([3, 28])
    label = np.array([[[0, 1, 3, 28, 200]]], dtype=np.uint8)
    consecutive = un.to_nnunet_labels(label, table)
    assert consecutive.dtype == np.uint8 and consecutive.tolist() == [[[0, 0, 1, 2, 0]]]
    assert un.to_maisi_labels(consecutive, table).tolist() == [[[0, 0, 3, 28, 0]]]


def test_to_maisi_labels_rejects_labels_outside_the_table():
    with pytest.raises(un.NnUNetRunError) as exc:
        un.to_maisi_labels(np.array([0, 3]), {1: 1, 2: 3})
    assert str(exc.value) == "NnUNetBackend expects predicted labels in 0..2, but got range=(0, 3)."


def test_read_prediction_maps_back_and_checks_the_file(tmp_path):
    case = make_phantom("a", seed=0, size=8)
    table = {1: LIVER, 2: SPLEEN}
    with pytest.raises(un.NnUNetRunError) as exc:
        un.read_prediction(tmp_path, case, table)
    assert str(exc.value) == f"nnUNetv2_predict expects to write a.nii.gz, but got no such file in {tmp_path}."
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 2, np.uint8), case.affine), str(tmp_path / "a.nii.gz"))
    assert set(np.unique(un.read_prediction(tmp_path, case, table))) == {SPLEEN}
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), case.affine), str(tmp_path / "a.nii.gz"))
    with pytest.raises(un.NnUNetRunError, match=r"expects the case's shape, but got shape=\(8, 8, 4\)"):
        un.read_prediction(tmp_path, case, table)


# ----------------------------------------------------------------------------------------- raw dataset


def test_write_raw_dataset_layout_and_dataset_json(tmp_path):
    cases = [make_phantom(f"case_{i}", seed=i, size=16) for i in range(2)]
    table = un.build_label_table([SPLEEN, LIVER])
    folder = un.write_raw_dataset(cases, tmp_path, table=table, dataset_id=7)
    assert folder == tmp_path / "Dataset007_Utility"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["case_0_0000.nii.gz", "case_1_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["case_0.nii.gz", "case_1.nii.gz"]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 2
    assert list(meta["labels"].values()) == [0, 1, 2]
    assert meta["maisi_label_ids"] == {"1": LIVER, "2": SPLEEN}
    lab = nib.load(str(folder / "labelsTr" / "case_0.nii.gz"))
    img = nib.load(str(folder / "imagesTr" / "case_0_0000.nii.gz"))
    np.testing.assert_allclose(lab.affine, cases[0].affine)
    np.testing.assert_allclose(img.affine, cases[0].affine)
    data = np.asarray(lab.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1, 2}
    np.testing.assert_array_equal(un.to_maisi_labels(data, table),
                                  np.where(cases[0].label == BODY, 0, cases[0].label))
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.clip(np.rint(cases[0].image), -1024, 3071))  # CT range


@pytest.mark.parametrize("case_id", ["../x", "a b", "_x", "x_0000"])
def test_check_case_ids_rejects_unsafe_names(case_id):
    case = make_phantom("ok", seed=0, size=8)
    with pytest.raises(ConfigError) as exc:
        un.check_case_ids([LabeledCase(case_id, case.image, case.label, case.affine)])
    assert str(exc.value) == ("NnUNetBackend expects case IDs of letters, digits, '_', '.' and '-' (not ending in "
                              f"'_0000'), but got case_id={case_id!r}.")


def test_check_case_ids_rejects_duplicates():
    case = make_phantom("a", seed=0, size=8)
    with pytest.raises(ConfigError, match=r"expects unique case IDs, but got case_id='a' twice\."):
        un.check_case_ids([case, case])


# ----------------------------------------------------------------------------------------- trainer choice


@pytest.mark.parametrize("epochs, steps, expected", [
    (1, 1, (1, 1, 1, 1)), (2, 25, (2, 25, 5, 1)), (20, 25, (20, 25, 5, 2)), (200, 250, (200, 250, 50, 20)),
    (1000, 250, (1000, 250, 50, 50)),
])
def test_training_schedule_runs_the_exact_budget(epochs, steps, expected):
    config = UtilityConfig(segmenter="nnunet", epochs=epochs, steps_per_epoch=steps)
    schedule = un.TrainingSchedule.from_config(config)
    assert (schedule.epochs, schedule.iterations_per_epoch, schedule.val_iterations_per_epoch,
            schedule.save_every) == expected
    assert schedule.to_dict() == {"epochs": expected[0], "iterations_per_epoch": expected[1],
                                  "val_iterations_per_epoch": expected[2], "save_every": expected[3]}


# ----------------------------------------------------------------------------------------- environment


def test_build_nnunet_env_points_under_the_workdir(tmp_path):
    layout = un.NnUNetLayout(tmp_path / "nnunet", 500)
    assert un.build_nnunet_env(layout, device="cpu", data_workers=0) == {
        "nnUNet_raw": str(tmp_path / "nnunet" / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "nnunet" / "preprocessed"),
        "nnUNet_results": str(tmp_path / "nnunet" / "results"), "nnUNet_compile": "f",
        "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
    }


def test_build_nnunet_env_on_cuda_keeps_nnunet_workers_and_selects_the_gpu(tmp_path):
    layout = un.NnUNetLayout(tmp_path, 500)
    env = un.build_nnunet_env(layout, device="cuda:1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "nnUNet_n_proc_DA" not in env and "nnUNet_def_n_proc" not in env
    assert "nnUNet_n_proc_DA" not in un.build_nnunet_env(layout, device="cpu")
    assert un.build_nnunet_env(layout, device="cuda", data_workers=4)["nnUNet_n_proc_DA"] == "4"


def test_child_prelude_replaces_inherited_nnunet_settings_and_parent_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/elsewhere")
    monkeypatch.setenv("nnUNet_n_proc_DA", "12")
    before = dict(os.environ)
    env = un.build_nnunet_env(un.NnUNetLayout(tmp_path, 500), device="cpu")
    show = "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('nnUNet_')}))\n"
    out = subprocess.run([sys.executable, "-c", un._PRELUDE + show, json.dumps(env), "0"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == env
    assert dict(os.environ) == before


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_check_device_rejects_unknown_devices(device):
    with pytest.raises(ConfigError) as exc:
        un.check_device(device)
    assert str(exc.value) == (f"NnUNetBackend expects device in ['cpu', 'cuda', 'mps'] or 'cuda:N', "
                              f"but got device={device!r}.")


# ----------------------------------------------------------------------------------------- missing package


class _BlockNnUNet:
    """A meta-path finder that makes ``nnunetv2`` look uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name == "nnunetv2" or name.startswith("nnunetv2."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


def test_module_imports_without_nnunetv2_and_names_the_extra(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "nnunetv2" or n.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "maisi_core.evaluation.utility_nnunet")
    monkeypatch.setattr(sys, "meta_path", [_BlockNnUNet(), *sys.meta_path])
    fresh = importlib.import_module("maisi_core.evaluation.utility_nnunet")
    assert "nnunetv2" not in sys.modules
    backend = fresh.NnUNetBackend()
    assert backend.name == "nnunet"
    with pytest.raises(fresh.NnUNetNotInstalledError) as exc:
        backend.fit([make_phantom("a", 0, 8)], UtilityConfig(segmenter="nnunet"), tmp_path, structures=[LIVER])
    assert isinstance(exc.value, ImportError)
    assert str(exc.value) == ("NnUNetBackend expects the nnunetv2 package (the 'nnunet' extra), but got "
                              "nnunetv2=not installed. Install it with: pip install 'ctfactory[nnunet]'.")


@needs_nnunet
def test_backend_for_nnunet_is_this_backend():
    from maisi_core.evaluation.utility import SegmenterBackend, backend_for

    backend = backend_for("nnunet")
    assert isinstance(backend, un.NnUNetBackend) and isinstance(backend, SegmenterBackend)


# ----------------------------------------------------------------------------------------- plans and workdir


def _plans(transpose_forward, spacing):
    arch = {"n_stages": 2, "features_per_stage": [32, 64], "kernel_sizes": [[3, 3, 3]] * 2,
            "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [2, 2], "n_conv_per_stage_decoder": [2]}
    return {"transpose_forward": transpose_forward, "configurations": {"3d_fullres": {
        "patch_size": [8, 8, 8], "batch_size": 9, "spacing": spacing, "architecture": {"arch_kwargs": arch}}}}


@needs_nnunet
def test_pin_plans_sets_patch_batch_and_topology(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(_plans([0, 1, 2], [6.0, 6.0, 6.0])))
    info = un.pin_plans(path, patch_size_xyz=(32, 32, 16), batch_size=2)
    conf = json.loads(path.read_text())["configurations"]["3d_fullres"]
    assert conf["patch_size"] == [16, 32, 32]  # SimpleITK order (Z, Y, X)
    assert conf["batch_size"] == 2 and conf["ctfactory_planned"] == {"patch_size": [8, 8, 8], "batch_size": 9}
    arch = conf["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 4 and arch["features_per_stage"] == [32, 64, 128, 256]
    assert arch["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert info["pinned"] == {"patch_size": [16, 32, 32], "batch_size": 2, "n_stages": 4}


@needs_nnunet
def test_pin_plans_rejects_a_patch_nnunet_cannot_pool(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(_plans([0, 1, 2], [6.0, 6.0, 6.0])))
    with pytest.raises(ConfigError, match=r"expects patch_size divisible by nnU-Net's pooling, but got "
                                          r"patch_size=\(36, 36, 36\)\. Use multiples of 2\*\*k per axis"):
        un.pin_plans(path, patch_size_xyz=(36, 36, 36), batch_size=2)


def test_pin_plans_needs_a_3d_fullres_plan(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps({"configurations": {"2d": {}}}))
    with pytest.raises(un.NnUNetRunError) as exc:
        un.pin_plans(path, patch_size_xyz=(16, 16, 16), batch_size=2)
    assert str(exc.value) == (f"nnUNetv2_plan_and_preprocess expects to plan 3d_fullres, but got configurations="
                              f"['2d'] in {path}. The cases must be 3D volumes.")


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset_id": 0}, "NnUNetBackend expects dataset_id in 1..999, but got dataset_id=0."),
    ({"data_workers": -1}, "NnUNetBackend expects data_workers >= 0 or None, but got data_workers=-1."),
])
def test_backend_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        un.NnUNetBackend(**kwargs)
    assert str(exc.value) == message


@needs_nnunet
def test_fit_refuses_a_workdir_of_another_run(tmp_path):
    record = tmp_path / "nnunet" / "fit.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"data_sha256": "0" * 64}))
    cases = [make_phantom("a", 0, 8)]
    with pytest.raises(CheckpointError) as exc:
        un.NnUNetBackend().fit(cases, UtilityConfig(segmenter="nnunet"), tmp_path, structures=[LIVER])
    assert str(exc.value).startswith("NnUNetBackend.fit expects the workdir's run to match, but got "
                                     f"data_sha256='{'0' * 64}' there")


@needs_nnunet
def test_predict_before_fit_says_fit_first(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        un.NnUNetBackend().predict([make_phantom("a", 0, 8)], UtilityConfig(segmenter="nnunet"), tmp_path)
    assert str(exc.value) == (f"NnUNetBackend.predict expects a trained model in the workdir, but got "
                              f"workdir={str(tmp_path)!r} without checkpoint_final.pth. Call fit first.")


# ----------------------------------------------------------------------------------------- slow: a real run


@pytest.mark.slow
@needs_nnunet
def test_nnunet_plan_train_predict_resume_on_phantoms(tmp_path):
    """plan + preprocess -> train on the CPU -> predict -> resume after a lost final checkpoint."""
    train = [make_phantom(f"train_{i}", seed=i) for i in range(4)]
    test = [make_phantom(f"test_{i}", seed=100 + i) for i in range(2)]
    config = UtilityConfig(segmenter="nnunet", patch_size=(16, 16, 16), epochs=EPOCHS, steps_per_epoch=25,
                           batch_size=2, seed=0)
    backend = un.NnUNetBackend()
    start = time.perf_counter()
    backend.fit(train, config, tmp_path, structures=[LIVER, SPLEEN])
    fit_s = time.perf_counter() - start
    record = json.loads((tmp_path / "nnunet" / "fit.json").read_text())
    assert record["trainer"] == "nnUNetTrainer" and record["schedule"]["epochs"] == EPOCHS
    assert record["plans"]["pinned"] == {"patch_size": [16, 16, 16], "batch_size": 2, "n_stages": 3}
    plans = json.loads((tmp_path / "nnunet" / "preprocessed" / "Dataset500_Utility" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [SPACING_MM] * 3

    preds = backend.predict(test, config, tmp_path)
    assert sorted(preds) == ["test_0", "test_1"]
    for case in test:
        pred = preds[case.case_id]
        assert pred.shape == case.label.shape and set(np.unique(pred)) <= {0, LIVER, SPLEEN}
        assert dice(pred == LIVER, case.label == LIVER) > 0.5, case.case_id
        assert dice(pred == SPLEEN, case.label == SPLEEN) > 0.5, case.case_id

    final = un.NnUNetLayout(tmp_path / "nnunet", 500).trainer_folder("nnUNetTrainer") / "checkpoint_final.pth"
    final.unlink()  # as if the run crashed after its last checkpoint
    start = time.perf_counter()
    backend.fit(train, config, tmp_path, structures=[LIVER, SPLEEN])
    resume_s = time.perf_counter() - start
    assert final.is_file()
    assert '"resume": true' in (tmp_path / "nnunet" / "logs" / "train.log").read_text()
    print(f"nnU-Net fit {fit_s:.0f} s, resume {resume_s:.0f} s")
