"""Downstream utility: config, folders, arms, MONAI segmenters (determinism, resume), scores and summary."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from maisi_core import io
from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom
from maisi_core.engine.geometry import affine_from_spacing
from maisi_core.errors import (
    CheckpointError,
    ConfigError,
    MaisiError,
    TrainingDataError,
    TrainingDataNotFoundError,
    UnmappedLabelError,
    WeightsNotFoundError,
)
from maisi_core.evaluation.utility import (
    Arm,
    ArmScores,
    LabeledCase,
    SegmenterBackend,
    UtilityConfig,
    UtilitySummary,
    backend_for,
    fingerprint,
    load_labeled_folder,
    make_arms,
    resolve_structures,
    score_cases,
    summarise,
)
from maisi_core.evaluation.utility_data import from_work_grid, to_work_grid

SPACING = (6.0, 6.0, 6.0)
SIZE = (32, 32, 32)
STRUCTURES = (1, 3, 5, 14)  # liver, spleen, right and left kidney: all in every 32³ abdomen phantom at 6 mm


class Interrupt(RuntimeError):
    """Raised by a test callback to stop a fit after an epoch."""


def phantom_case(seed: int, prefix: str) -> LabeledCase:
    phantom = generate_phantom(PhantomConfig(("abdomen",), SIZE, SPACING), seed=seed)
    hu = synthesize_ct(phantom.label_map, SPACING, seed=seed)
    return LabeledCase(f"{prefix}{seed:03d}", hu, phantom.label_map, affine_from_spacing(SPACING, SIZE))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # training on a shared machine


@pytest.fixture(scope="module")
def real_cases() -> list[LabeledCase]:
    return [phantom_case(s, "real_") for s in range(6)]


@pytest.fixture(scope="module")
def synth_cases() -> list[LabeledCase]:
    return [phantom_case(s, "synth_") for s in range(100, 104)]


@pytest.fixture(scope="module")
def tiny() -> UtilityConfig:
    return UtilityConfig.tiny()


@pytest.fixture(scope="module")
def segresnet_fit(tmp_path_factory, real_cases, tiny):
    """One uninterrupted tiny SegResNet fit on four real cases: its workdir and its predictions on two."""
    workdir = tmp_path_factory.mktemp("segresnet")
    backend = backend_for("segresnet")
    backend.fit(real_cases[:4], tiny, workdir, structures=STRUCTURES)
    return workdir, backend.predict(real_cases[4:], tiny, workdir)


# ----------------------------------------------------------------------------------------- config


def test_config_presets_round_trip_through_json():
    for cfg in (UtilityConfig(), UtilityConfig.tiny(), UtilityConfig.full(), UtilityConfig(structures=(5, 1, 1))):
        back = UtilityConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
    assert UtilityConfig(structures=(5, 1, 1)).structures == (1, 5)
    assert UtilityConfig.tiny().patch_size == (16, 16, 16) and UtilityConfig.tiny().epochs == 2


def test_config_rejects_bad_values_with_house_messages():
    with pytest.raises(ConfigError) as err:
        UtilityConfig(segmenter="segresnt")
    assert str(err.value) == ("UtilityConfig expects segmenter in ['segresnet', 'dynunet', 'nnunet'], but got "
                              "segmenter='segresnt'. Did you mean 'segresnet'?")
    with pytest.raises(ConfigError) as err:
        UtilityConfig(patch_size=(32, 30, 32))
    assert str(err.value) == ("UtilityConfig expects patch_size as three multiples of 8, but got "
                              "patch_size=(32, 30, 32). Try (32, 32, 32).")
    with pytest.raises(ConfigError, match=r"^UtilityConfig expects structures that are MAISI IDs other than 0, "
                                          r"but got structures=\[0\]"):
        UtilityConfig(structures=(0, 1))
    with pytest.raises(ConfigError, match=r"^UtilityConfig expects epochs >= 1, but got epochs=0\.$"):
        UtilityConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"unknown keys=\['epoch'\]\. Did you mean 'epochs'\?$"):
        UtilityConfig.from_dict({"epoch": 3})


def test_resolve_structures_takes_real_ids_without_background_and_body(real_cases):
    found = resolve_structures(UtilityConfig(), real_cases[:1])
    assert set(STRUCTURES) <= set(found) and 0 not in found and 200 not in found
    assert resolve_structures(UtilityConfig(structures=(3, 1)), real_cases) == (1, 3)


# ----------------------------------------------------------------------------------------- data


def _write_case(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, *,
                images: str = "imagesTr", labels: str = "labelsTr", suffix: str = "_0000") -> None:
    io.save_image(folder / images / f"{case_id}{suffix}.nii.gz", image, affine)
    io.save_label(folder / labels / f"{case_id}.nii.gz", label, affine)


def test_load_labeled_folder_reads_nnunet_layout_sorted(tmp_path, real_cases):
    for case in reversed(real_cases[:3]):
        _write_case(tmp_path, case.case_id, case.image, case.label, case.affine)
    loaded = load_labeled_folder(tmp_path)
    assert [c.case_id for c in loaded] == [c.case_id for c in real_cases[:3]]
    for got, want in zip(loaded, real_cases):
        np.testing.assert_array_equal(got.label, want.label)
        np.testing.assert_allclose(got.image, np.clip(np.rint(want.image), -1024, 3071))
        np.testing.assert_allclose(got.affine, want.affine)
        assert got.image.dtype == np.float32


def test_load_labeled_folder_maps_labels_and_refuses_unmapped(tmp_path):
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[1:4, 1:4, 1:4], label[5:7, 5:7, 5:7], label[0, 7, 7] = 1, 2, 9
    image, affine = np.zeros((8, 8, 8), np.float32), affine_from_spacing((2.0, 2.0, 2.0), (8, 8, 8))
    _write_case(tmp_path, "a", image, label, affine, images="images", labels="labels", suffix="")
    with pytest.raises(UnmappedLabelError) as err:
        load_labeled_folder(tmp_path, label_mapping={1: 1, 2: "spleen"})
    assert str(err.value) == ("load_labeled_folder expects every source label to be mapped to a MAISI ID, but got "
                              "unmapped ids=[9]. Add them to the mapping, or pass unmapped='background' or "
                              "unmapped='body'.")
    (case,) = load_labeled_folder(tmp_path, label_mapping={1: 1, 2: "spleen"}, unmapped="background")
    assert sorted(np.unique(case.label).tolist()) == [0, 1, 3]
    assert case.label[0, 7, 7] == 0 and case.label[6, 6, 6] == 3


def test_load_labeled_folder_honours_ctfactory_maisi_label_ids(tmp_path):
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[1:4, 1:4, 1:4], label[5:7, 5:7, 5:7] = 1, 2
    _write_case(tmp_path, "x", np.zeros((8, 8, 8), np.float32), label, affine_from_spacing((2.0,) * 3, (8, 8, 8)))
    (tmp_path / "dataset.json").write_text(json.dumps({"maisi_label_ids": {"1": 5, "2": 26}}))
    (case,) = load_labeled_folder(tmp_path)
    assert case.label[2, 2, 2] == 5 and case.label[6, 6, 6] == 26


def test_load_labeled_folder_reads_totalsegmentator_names_from_dataset_json(tmp_path):
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[1:4, 1:4, 1:4], label[5:7, 5:7, 5:7] = 1, 2
    _write_case(tmp_path, "ts", np.zeros((8, 8, 8), np.float32), label, affine_from_spacing((2.0,) * 3, (8, 8, 8)))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney_left": 1, "spleen": 2}}))
    (case,) = load_labeled_folder(tmp_path, label_mapping="totalsegmentator")
    assert case.label[2, 2, 2] == 14 and case.label[6, 6, 6] == 3


def test_load_labeled_folder_refuses_missing_unmatched_and_ambiguous(tmp_path):
    with pytest.raises(TrainingDataNotFoundError, match=r"^load_labeled_folder expects an existing folder"):
        load_labeled_folder(tmp_path / "nope")
    affine = affine_from_spacing((2.0,) * 3, (4, 4, 4))
    _write_case(tmp_path, "a", np.zeros((4, 4, 4)), np.zeros((4, 4, 4), np.uint8), affine)
    io.save_image(tmp_path / "imagesTr" / "b_0000.nii.gz", np.zeros((4, 4, 4)), affine)
    with pytest.raises(TrainingDataError) as err:
        load_labeled_folder(tmp_path)
    assert str(err.value) == (f"load_labeled_folder expects every image to have a label of the same case name, "
                              f"but got unmatched=['b'] in folder={str(tmp_path)!r}. Rename or remove them.")
    (tmp_path / "imagesTr" / "b_0000.nii.gz").unlink()
    _write_case(tmp_path, "c", np.zeros((4, 4, 4)), np.zeros((4, 4, 4), np.uint8), affine,
                images="imagesTs", labels="labelsTs")
    with pytest.raises(TrainingDataError, match=r"Pass split='Tr' or split='Ts'\.$"):
        load_labeled_folder(tmp_path)
    assert [c.case_id for c in load_labeled_folder(tmp_path, split="Ts")] == ["c"]
    io.save_image(tmp_path / "imagesTs" / "c_0001.nii.gz", np.zeros((4, 4, 4)), affine)
    with pytest.raises(TrainingDataError, match=r"^load_labeled_folder expects single-channel CT images .* "
                                                r"files=\['c_0001\.nii\.gz'\]"):
        load_labeled_folder(tmp_path, split="Ts")


def test_load_labeled_folder_keeps_numbered_case_names_without_suffix(tmp_path):
    affine = affine_from_spacing((2.0,) * 3, (4, 4, 4))
    _write_case(tmp_path, "case_0012", np.zeros((4, 4, 4)), np.zeros((4, 4, 4), np.uint8), affine,
                images="images", labels="labels", suffix="")
    assert [c.case_id for c in load_labeled_folder(tmp_path)] == ["case_0012"]


def test_fingerprint_identifies_data_not_order(real_cases):
    a = fingerprint(real_cases[:3])
    assert a == fingerprint(list(reversed(real_cases[:3]))) and len(a) == 64
    changed = real_cases[0].label.copy()
    changed[0, 0, 0] = 1 if changed[0, 0, 0] != 1 else 3
    other = LabeledCase(real_cases[0].case_id, real_cases[0].image, changed, real_cases[0].affine)
    assert fingerprint([other, *real_cases[1:3]]) != a


def test_work_grid_round_trip_keeps_shape_and_labels_of_flipped_finer_case():
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[2:6, 2:8, 0:4], label[8:12, 0:4, 4:8] = 1, 3
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])  # L-R flipped at 3 mm: blocks of 2 voxels map 1:1 to 6 mm voxels
    case = LabeledCase("f", np.zeros(label.shape, np.float32), label, affine)
    image, work = to_work_grid(case, SPACING)
    assert work.shape == image.shape == (6, 5, 4)
    np.testing.assert_array_equal(from_work_grid(work, case), label)


# ----------------------------------------------------------------------------------------- arms


def test_make_arms_draws_nested_seeded_sets():
    real, synth = [f"r{i}" for i in range(4)], [f"s{i}" for i in range(10)]
    arms = make_arms(real, synth, [1, 2], synthetic_only=True, seed=3)
    assert [a.name for a in arms] == ["real", "real+synth_1to1", "real+synth_1to2", "synth_only"]
    assert arms[0] == Arm("real", tuple(real), (), None)
    assert len(arms[1].synthetic_ids) == 4 and len(arms[2].synthetic_ids) == 8
    assert set(arms[1].synthetic_ids) <= set(arms[2].synthetic_ids)
    assert arms[3].ratio == math.inf and arms[3].real_ids == () and arms[3].synthetic_ids == tuple(synth)
    assert make_arms(real, synth, [1, 2], synthetic_only=True, seed=3) == arms
    assert make_arms(real, synth, [0.5], synthetic_only=False, seed=3)[1].name == "real+synth_1to0.5"


def test_make_arms_refuses_too_few_synthetic_and_shared_ids():
    with pytest.raises(TrainingDataError) as err:
        make_arms(["a", "b"], ["s1", "s2", "s3"], [2], synthetic_only=False, seed=0)
    assert str(err.value) == ("make_arms expects at least 4 synthetic cases for ratio=2.0 (2 real cases), but got 3. "
                              "Generate more or use ratios up to 1.5.")
    with pytest.raises(TrainingDataError, match=r"^make_arms expects real and synthetic case ids to differ"):
        make_arms(["a"], ["a"], [1], synthetic_only=False, seed=0)
    with pytest.raises(ConfigError, match=r"^make_arms expects distinct positive finite ratios"):
        make_arms(["a"], ["s"], [1, 1], synthetic_only=False, seed=0)


# ----------------------------------------------------------------------------------------- backends


def test_backend_for_names_and_refusals():
    assert isinstance(backend_for("segresnet"), SegmenterBackend)
    assert backend_for("dynunet").name == "dynunet"
    with pytest.raises(ConfigError) as err:
        backend_for("unet")
    assert str(err.value).startswith("backend_for expects a segmenter in ['segresnet', 'dynunet', 'nnunet'], "
                                     "but got name='unet'.")
    if importlib.util.find_spec("nnunetv2") is None:
        with pytest.raises(ImportError, match=r"^NnUNetBackend expects the nnunetv2 package") as err:
            backend_for("nnunet")
        assert isinstance(err.value, MaisiError)
    else:
        assert backend_for("nnunet").name == "nnunet"


def test_utility_module_imports_without_torch():
    code = "import sys, maisi_core.evaluation.utility; print('torch' in sys.modules or 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_segresnet_fit_is_deterministic_and_predicts_on_case_grid(tmp_path, segresnet_fit, real_cases, tiny):
    workdir, pred = segresnet_fit
    assert (workdir / "model.safetensors").is_file() and json.loads((workdir / "progress.json").read_text())["done"]
    assert all(pred[c.case_id].shape == c.label.shape for c in real_cases[4:])
    assert set(np.unique(np.concatenate([p.ravel() for p in pred.values()]))) <= {0, *STRUCTURES}
    again = backend_for("segresnet")
    again.fit(real_cases[:4], tiny, tmp_path, structures=STRUCTURES)
    assert (tmp_path / "model.safetensors").read_bytes() == (workdir / "model.safetensors").read_bytes()
    pred2 = again.predict(real_cases[4:], tiny, tmp_path)
    for case in real_cases[4:]:
        np.testing.assert_array_equal(pred2[case.case_id], pred[case.case_id])
    s1, s2 = (score_cases(p, real_cases[4:], STRUCTURES, tiny) for p in (pred, pred2))
    assert s1 == s2


def test_fit_resumes_after_interrupt_to_the_same_weights(tmp_path, segresnet_fit, real_cases, tiny):
    def stop_after_first(epoch: int, loss: float) -> None:
        assert math.isfinite(loss)
        if epoch == 1:
            raise Interrupt("stopped after epoch 1")

    backend = backend_for("segresnet")
    with pytest.raises(Interrupt):
        backend.fit(real_cases[:4], tiny, tmp_path, structures=STRUCTURES, callback=stop_after_first)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["epoch"] == 1 and not progress["done"] and not (tmp_path / "model.safetensors").exists()
    seen = []
    backend.fit(real_cases[:4], tiny, tmp_path, structures=STRUCTURES, callback=lambda e, _: seen.append(e))
    assert seen == [2]  # only the second epoch ran
    assert (tmp_path / "model.safetensors").read_bytes() == (segresnet_fit[0] / "model.safetensors").read_bytes()
    backend.fit(real_cases[:4], tiny, tmp_path, structures=STRUCTURES, callback=lambda e, _: seen.append(e))
    assert seen == [2]  # a finished fit is not run again


def test_fit_refuses_workdir_of_another_fit_and_predict_needs_a_fit(tmp_path, segresnet_fit, real_cases, tiny):
    workdir, _ = segresnet_fit
    with pytest.raises(CheckpointError, match=r"^MonaiBackend\.fit expects a workdir of the same fit to resume"):
        backend_for("segresnet").fit(real_cases[:4], replace(tiny, seed=1), workdir, structures=STRUCTURES)
    with pytest.raises(WeightsNotFoundError, match=r"^MonaiBackend\.predict expects a finished fit in workdir"):
        backend_for("segresnet").predict(real_cases[4:], tiny, tmp_path)
    with pytest.raises(CheckpointError, match=r"^MonaiBackend\.predict expects the patch_size the model was trained"):
        backend_for("segresnet").predict(real_cases[4:], replace(tiny, patch_size=(32, 32, 32)), workdir)


def test_dynunet_fits_and_predicts(tmp_path, real_cases, tiny):
    backend, cfg = backend_for("dynunet"), replace(tiny, segmenter="dynunet")
    with pytest.raises(ConfigError, match=r"^MonaiBackend\.fit expects config\.segmenter to name this backend"):
        backend.fit(real_cases[:2], tiny, tmp_path, structures=(1, 3))
    backend.fit(real_cases[:2], cfg, tmp_path, structures=(1, 3))
    full = real_cases[4]
    small = LabeledCase("small", full.image[10:22, :, 4:14], full.label[10:22, :, 4:14], full.affine)
    pred = backend.predict([full, small], cfg, tmp_path)  # "small" is (12, 32, 10): under the 16³ patch
    assert pred[full.case_id].shape == SIZE and pred["small"].shape == (12, 32, 10)
    assert set(np.unique(pred[full.case_id]).tolist()) <= {0, 1, 3}


# ----------------------------------------------------------------------------------------- scores


def test_score_cases_rules_for_present_and_absent_structures(tiny):
    truth = np.zeros((16, 16, 16), dtype=np.uint8)
    truth[2:8, 2:8, 2:8], truth[10:14, 10:14, 10:14] = 1, 3
    case = LabeledCase("t", np.zeros(truth.shape, np.float32), truth, affine_from_spacing((2.0,) * 3, truth.shape))
    pred = truth.copy()
    pred[10:14, 10:14, 10:14] = 0  # spleen missed
    pred[2:8, 2:8, 2:5] = 0  # half the liver
    pred[0:2, 14:16, 0:2] = 5  # a kidney that is not there
    scores = score_cases({"t": pred}, [case], (1, 3, 5, 14), replace(tiny, nsd_tolerance_mm=2.0), arm="a")
    assert scores.arm == "a"
    assert set(scores.dice["t"]) == {1, 3, 5}  # 14: absent from truth and prediction, excluded
    assert scores.dice["t"][1] == pytest.approx(2 * 108 / (216 + 108))
    assert scores.dice["t"][3] == 0.0 and scores.dice["t"][5] == 0.0
    assert scores.surface_dice["t"][3] == 0.0 and 0.0 < scores.surface_dice["t"][1] < 1.0
    assert score_cases({"t": pred}, [case], (1,), tiny).surface_dice["t"][1] == 1.0  # the cut is within 6 mm
    perfect = score_cases({"t": truth}, [case], (1, 3), tiny)
    assert perfect.dice["t"] == {1: 1.0, 3: 1.0} and perfect.surface_dice["t"] == {1: 1.0, 3: 1.0}
    assert ArmScores.from_dict(json.loads(json.dumps(scores.to_dict()))) == scores
    with pytest.raises(TrainingDataError, match=r"^score_cases expects a prediction for every test case"):
        score_cases({}, [case], (1,), tiny)


def test_summarise_bootstraps_and_pairs_deltas_against_real():
    base = ArmScores("real", {f"c{i}": {1: 0.5 + 0.05 * i, 3: 0.4} for i in range(6)},
                     {f"c{i}": {1: 0.6, 3: 0.5} for i in range(6)})
    better = ArmScores("mix", {f"c{i}": {1: 0.6 + 0.05 * i, 3: 0.4} for i in range(6)},
                       {f"c{i}": {1: 0.7, 3: 0.5} for i in range(6)})
    summary = summarise({"real": base, "real+synth_1to1": better}, bootstrap=500, seed=0)
    rows = {(r["arm"], r["structure"]): r for r in summary.rows}
    assert len(summary.rows) == 6
    real_liver, mix_liver = rows[("real", 1)], rows[("real+synth_1to1", 1)]
    assert real_liver["name"] == "liver" and real_liver["n_cases"] == 6
    assert real_liver["delta_dice"] is None and real_liver["delta_dice_ci"] is None
    assert real_liver["dice_ci"][0] <= real_liver["dice"] <= real_liver["dice_ci"][1]
    assert real_liver["dice_ci"][0] < real_liver["dice_ci"][1]
    assert mix_liver["delta_dice"] == pytest.approx(0.1)
    assert mix_liver["delta_dice_ci"] == pytest.approx((0.1, 0.1))  # paired: every case gains exactly 0.1
    assert rows[("real+synth_1to1", 3)]["delta_dice"] == pytest.approx(0.0)
    assert summary.mean_delta() == {"real+synth_1to1": pytest.approx(0.05)}
    back = UtilitySummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert back == summary
    assert summarise({"real": base, "real+synth_1to1": better}, bootstrap=500, seed=0) == summary
    with pytest.raises(ConfigError, match=r"^summarise expects the baseline among the arms \['mix'\]"):
        summarise({"mix": better}, bootstrap=10, seed=0)


def test_utility_end_to_end_on_tiny_arms(tmp_path, real_cases, synth_cases, tiny):
    cases = {c.case_id: c for c in [*real_cases[:4], *synth_cases]}
    arms = make_arms([c.case_id for c in real_cases[:2]], [c.case_id for c in synth_cases], [1],
                     synthetic_only=True, seed=0)
    cfg = replace(tiny, structures=STRUCTURES)
    backend, scores = backend_for(cfg.segmenter), {}
    for arm in arms:
        train = [cases[i] for i in (*arm.real_ids, *arm.synthetic_ids)]
        backend.fit(train, cfg, tmp_path / arm.name, structures=cfg.structures)
        pred = backend.predict(real_cases[4:], cfg, tmp_path / arm.name)
        scores[arm.name] = score_cases(pred, real_cases[4:], cfg.structures, cfg, arm=arm.name)
    summary = summarise(scores, bootstrap=cfg.bootstrap, seed=cfg.seed)
    assert {r["arm"] for r in summary.rows} == {"real", "real+synth_1to1", "synth_only"}
    assert set(summary.mean_delta()) == {"real+synth_1to1", "synth_only"}
    mean_rows = [r for r in summary.rows if r["structure"] == "mean"]
    assert all(0.0 <= r["dice"] <= 1.0 and r["n_cases"] == 2 for r in mean_rows)
