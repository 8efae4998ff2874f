"""The downstream-utility flow, its application layer and ``ctfactory utility`` (tiny data, seconds on a CPU).

Most tests use a recording test double of the segmenter backend (resumable, deterministic, and able to
crash once at a chosen epoch); one test runs the real MONAI backend end to end on the tiny preset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from _catalog_cases import make_failed_record, make_record
from catalog.errors import CatalogPathError
from catalog.root import DatasetRoot
from factory import utility as fu
from factory.errors import ValidationInputError
from maisi_core.errors import TrainingDataError
from maisi_core.evaluation import utility as mu
from maisi_core.io import affine_from_spacing, save_image, save_label

SPACING = (6.0, 6.0, 6.0)
SIZE = 24


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (24, 24, 24) body (200) with a liver (1) and a spleen (3) whose places vary with ``seed``; HU image."""
    rng = np.random.default_rng(seed)
    label = np.zeros((SIZE,) * 3, dtype=np.uint8)
    label[3:-3, 3:-3, 3:-3] = 200
    a, b = (int(v) for v in rng.integers(0, 3, 2))
    label[5 + a:12 + a, 5:13, 6:16] = 1
    label[14:18, 12 + b:17 + b, 8:14] = 3
    hu = np.where(label == 0, -1000.0, 40.0) + 30.0 * (label == 1) - 10.0 * (label == 3)
    return (hu + rng.normal(0.0, 10.0, label.shape)).astype(np.float32), label


def _write_pair(image_path: Path, label_path: Path, seed: int) -> None:
    image, label = _volume(seed)
    affine = affine_from_spacing(SPACING)
    save_image(str(image_path), image, affine, overwrite=True)
    save_label(str(label_path), label, affine, overwrite=True)


def write_real_folder(folder: Path, n: int, *, first_seed: int = 100, prefix: str = "real") -> Path:
    """An nnU-Net-style folder of ``n`` labelled cases."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{prefix}_{i:03d}"
        _write_pair(folder / "imagesTr" / f"{name}_0000.nii.gz", folder / "labelsTr" / f"{name}.nii.gz",
                    first_seed + i)
    return folder


def write_catalog(root: Path, n: int, *, passing: bool = True) -> Path:
    """A dataset root with ``n`` synthetic cases (files, samples rows) and one datasets row."""
    from catalog.store import open_catalog

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"synth_{i:03d}"
        if passing:
            _write_pair(root / "images" / f"{name}.nii.gz", root / "labels" / f"{name}.nii.gz", 500 + i)
            records.append(make_record(i, sample_id=name, image_uri=f"images/{name}.nii.gz",
                                       label_uri=f"labels/{name}.nii.gz", output_size=(SIZE,) * 3,
                                       spacing_mm=SPACING))
        else:
            records.append(make_failed_record(i, sample_id=name, output_size=(SIZE,) * 3, spacing_mm=SPACING))
    cat = open_catalog(root)
    cat.append_samples(records)
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec_id": "spec-abc123", "n_samples": n,
                        "metrics": {"fd_radiomics": 1.5}, "fd_radiomics": 1.5, "licence": "CC-BY-4.0"})
    return root


class FakeBackend:
    """A resumable, deterministic stand-in for a segmenter: "learns" how many voxels to miss from its training size.

    ``fit`` keeps ``fake.json`` (epochs done) in the workdir and resumes from it; ``crash_at`` makes the arm
    whose workdir is named like the key raise once, after the epochs before it were saved.
    """

    name = "fake"

    def __init__(self) -> None:
        self.epochs_run: list[tuple[str, int]] = []
        self.crash_at: dict[str, int] = {}

    def fit(self, train, config, workdir, *, structures):
        ckpt = Path(workdir) / "fake.json"
        state = json.loads(ckpt.read_text()) if ckpt.exists() else {"epoch": 0, "n_train": len(train)}
        for epoch in range(state["epoch"], config.epochs):
            if self.crash_at.get(Path(workdir).name) == epoch:
                del self.crash_at[Path(workdir).name]
                raise RuntimeError(f"simulated crash at epoch {epoch}")
            self.epochs_run.append((Path(workdir).name, epoch))
            state["epoch"] = epoch + 1
            ckpt.write_text(json.dumps(state))

    def predict(self, cases, config, workdir):
        state = json.loads((Path(workdir) / "fake.json").read_text())
        miss = max(0, 6 - state["n_train"])  # more training cases, fewer slices missed
        out = {}
        for case in cases:
            pred = case.label.copy()
            pred[:, :, : 8 + miss] = np.where(pred[:, :, : 8 + miss] == 1, 200, pred[:, :, : 8 + miss])
            out[case.case_id] = pred
        return out


@pytest.fixture()
def fake(monkeypatch) -> FakeBackend:
    backend = FakeBackend()
    monkeypatch.setattr(mu, "backend_for", lambda name: backend)
    return backend


@pytest.fixture()
def setup(tmp_path):
    real = write_real_folder(tmp_path / "real", 6)
    root = write_catalog(tmp_path / "root", 4)
    return real, root


def _request(real: Path, **changes) -> fu.UtilityRequest:
    config = dataclasses.replace(mu.UtilityConfig.tiny(), epochs=3, bootstrap=50)
    values = {"real": str(real), "ratios": (1.0,), "config": config.to_dict(), **changes}
    return fu.UtilityRequest(**values)


# -- application layer ------------------------------------------------------------------------------

def test_plan_utility_splits_real_without_overlap_and_draws_arms(setup):
    real, root = setup
    plan = fu.plan_utility(DatasetRoot.of(root), _request(real, ratios=(0.5, 1.0), synthetic_only=True))
    assert set(plan.train_ids).isdisjoint(plan.test_ids)
    assert len(plan.test_ids) == 2 and len(plan.train_ids) == 4  # round(0.25 * 6)
    assert [a.name for a in plan.arms] == ["real", "real+synth_1to0.5", "real+synth_1to1", "synth_only"]
    assert all(set(a.real_ids) <= set(plan.train_ids) for a in plan.arms)
    assert plan.structures == (1, 3)
    assert plan.test_source.startswith("held-out split of --real: 2 of 6 cases")
    again = fu.plan_utility(DatasetRoot.of(root), _request(real, ratios=(0.5, 1.0), synthetic_only=True))
    assert again == plan and len(plan.key) == 12


def test_plan_utility_key_changes_with_the_budget(setup):
    real, root = setup
    a = fu.plan_utility(DatasetRoot.of(root), _request(real))
    config = dataclasses.replace(mu.UtilityConfig.tiny(), epochs=4)
    b = fu.plan_utility(DatasetRoot.of(root), _request(real, config=config.to_dict()))
    c = fu.plan_utility(DatasetRoot.of(root), _request(real, config={**config.to_dict(), "epochs": 3,
                                                                       "bootstrap": 7, "device": "cpu"}))
    assert a.key != b.key
    assert a.key == c.key  # bootstrap and device do not change the weights' folder


def test_arm_workdir_stays_inside_the_root(setup, tmp_path):
    real, root = setup
    plan = fu.plan_utility(DatasetRoot.of(root), _request(real))
    path = fu.arm_workdir(DatasetRoot.of(root), plan, "real")
    assert path == root.resolve() / "utility" / str(plan.samples_version) / plan.key / "real" and path.is_dir()
    with pytest.raises(ValidationInputError, match=r"expects an arm name of letters, digits and '_.\+-', but got "
                                                    r"arm_name='\.\./\.\./escape'"):
        fu.arm_workdir(DatasetRoot.of(root), plan, "../../escape")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "utility").rename(tmp_path / "moved")
    (root / "utility").symlink_to(outside)  # a link inside the root that points out of it
    with pytest.raises(CatalogPathError, match="expects a path that stays inside"):
        fu.arm_workdir(DatasetRoot.of(root), plan, "real")
    with pytest.raises(ValidationInputError, match="expects a local dataset root"):
        fu.arm_workdir(DatasetRoot.of("s3://bucket/ds"), plan, "real")


def test_plan_utility_refuses_a_catalog_without_passing_cases(tmp_path):
    real = write_real_folder(tmp_path / "real", 4)
    root = write_catalog(tmp_path / "root", 3, passing=False)
    with pytest.raises(ValidationInputError, match=r"expects passing cases in the catalog, but got none at samples "
                                                    r"version=0\. Generate cases that pass QC first\."):
        fu.plan_utility(DatasetRoot.of(root), _request(real))


def test_plan_utility_refuses_empty_and_mismatched_real_folders(setup, tmp_path):
    _, root = setup
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "labelsTr").mkdir(parents=True)
    with pytest.raises(TrainingDataError, match="expects at least one image/label pair, but got none"):
        fu.plan_utility(DatasetRoot.of(root), _request(empty))
    mismatched = write_real_folder(tmp_path / "mismatched", 3)
    (mismatched / "labelsTr" / "real_001.nii.gz").unlink()
    with pytest.raises(TrainingDataError, match=r"unmatched=\['real_001'\]"):
        fu.plan_utility(DatasetRoot.of(root), _request(mismatched))
    with pytest.raises(ValidationInputError, match="expects --real to be a folder, but got --real="):
        fu.plan_utility(DatasetRoot.of(root), _request(tmp_path / "missing"))


def test_plan_utility_refuses_test_cases_that_are_also_training_cases(setup):
    real, root = setup
    with pytest.raises(ValidationInputError, match=r"expects --test cases that are not in --real, but got 6 shared"):
        fu.plan_utility(DatasetRoot.of(root), _request(real, test=str(real)))


def test_utility_request_refuses_bad_ratios_and_split_fractions(setup):
    real, _ = setup
    with pytest.raises(ValueError, match=r"expects distinct finite ratios > 0, but got ratios=\[0\.0\]"):
        _request(real, ratios=(0.0,))
    with pytest.raises(ValueError, match="test_fraction"):
        _request(real, test_fraction=0.5)


def test_split_test_is_seeded_and_needs_three_cases():
    ids = [f"c{i}" for i in range(20)]
    train, test = fu.split_test(ids, fraction=0.25, seed=3)
    assert (train, test) == fu.split_test(list(reversed(ids)), fraction=0.25, seed=3)
    assert len(test) == 5 and set(train) | set(test) == set(ids) and not set(train) & set(test)
    assert fu.split_test(ids, fraction=0.25, seed=4)[1] != test
    with pytest.raises(ValidationInputError, match="expects at least 3 real cases to split off a test set"):
        fu.split_test(["a", "b"], fraction=0.25, seed=0)


# -- the flow ----------------------------------------------------------------------------------------

def _run(real: Path, root: Path, **changes):
    from flows.utility import run_utility

    return run_utility(_request(real, **changes), str(root), publish=True)


def test_flow_records_a_datasets_row_and_prints_the_table(setup, fake, prefect_backend):
    from catalog.store import open_catalog

    real, root = setup
    out = _run(real, root)
    summary = out["summary"]
    assert {(r["arm"], r["structure"]) for r in summary.rows} == {
        (a, s) for a in ("real", "real+synth_1to1") for s in (1, 3, "mean")}
    rows = open_catalog(root).read_table("datasets").to_pylist()
    assert len(rows) == 2 and out["datasets_version"] == 1
    row = max(rows, key=lambda r: r["created_at"])
    assert row["utility_segmenter"] == "segresnet"
    assert json.loads(row["utility_budget"])["epochs"] == 3
    assert json.loads(row["utility_arms"]) == [{"name": "real", "ratio": None, "n_real": 4, "n_synthetic": 0},
                                               {"name": "real+synth_1to1", "ratio": 1.0, "n_real": 4,
                                                "n_synthetic": 4}]
    assert row["utility_real_fingerprint"] == mu.fingerprint(mu.load_labeled_folder(real))
    assert row["utility_test"].startswith("held-out split of --real")
    assert mu.UtilitySummary.from_dict(json.loads(row["utility_results"])).rows == summary.rows
    delta = dict(row["utility_mean_dice_delta"])
    assert set(delta) == {"real+synth_1to1"} and delta["real+synth_1to1"] > 0  # 8 training cases miss fewer voxels
    assert row["fd_radiomics"] == 1.5 and row["licence"] == "CC-BY-4.0"  # the rest of the row is copied
    assert "Downstream utility" in (root / "dataset_card.html").read_text()
    table = fu.format_table(summary)
    assert table.splitlines()[0].split() [:3] == ["arm", "structure", "n"]
    assert "real+synth_1to1  liver (1)" in table and "mean" in table


def test_flow_rerun_trains_nothing_and_adds_no_row(setup, fake, prefect_backend):
    real, root = setup
    first = _run(real, root)
    trained = len(fake.epochs_run)
    second = _run(real, root)
    assert len(fake.epochs_run) == trained == 2 * 3
    assert second["datasets_version"] is None
    assert second["summary"].rows == first["summary"].rows


def test_flow_resumes_a_crashed_arm_from_its_checkpoint(setup, fake, prefect_backend, tmp_path):
    real, root = setup
    fake.crash_at["real+synth_1to1"] = 1
    with pytest.raises(fu.ArmsCrashedError, match=r"1 crashed arm\(s\), first real\+synth_1to1: RuntimeError: "
                                                  r"simulated crash at epoch 1"):
        _run(real, root)
    assert ("real", 2) in fake.epochs_run and ("real+synth_1to1", 0) in fake.epochs_run
    fake.epochs_run.clear()
    resumed = _run(real, root)
    assert fake.epochs_run == [("real+synth_1to1", 1), ("real+synth_1to1", 2)]  # from the checkpoint, not epoch 0
    clean_root = write_catalog(tmp_path / "clean", 4)
    assert _run(real, clean_root)["summary"].rows == resumed["summary"].rows


def test_flow_scores_an_ood_set_separately(setup, fake, prefect_backend, tmp_path):
    from catalog.store import open_catalog

    real, root = setup
    ood = write_real_folder(tmp_path / "ood", 3, first_seed=900, prefix="ood")
    out = _run(real, root, ood=str(ood))
    assert out["ood"] is not None and {r["n_cases"] for r in out["ood"].rows} == {3}
    row = max(open_catalog(root).read_table("datasets").to_pylist(), key=lambda r: r["created_at"])
    assert json.loads(row["utility_results"])["ood"]["rows"] == json.loads(json.dumps(out["ood"].to_dict()["rows"]))


# -- the command -------------------------------------------------------------------------------------

def test_cli_utility_refuses_bad_input_with_exit_2(setup, tmp_path, capsys):
    from flows.cli import main

    real, root = setup
    bare = write_catalog(tmp_path / "bare", 3, passing=False)
    assert main(["utility", str(bare), "--real", str(real), "--preset", "tiny", "--device", "cpu"]) == 2
    assert "expects passing cases in the catalog" in capsys.readouterr().err
    assert main(["utility", str(root), "--real", str(real), "--preset", "tiny", "--ratios", "3"]) == 2
    assert "make_arms expects at least 12 synthetic cases for ratio=3.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["utility", str(root), "--real", str(real), "--ratios", "one"])
    assert "--ratios expects numbers separated by commas" in capsys.readouterr().err


def test_cli_utility_runs_the_real_backend_end_to_end(setup, prefect_backend, capsys, tmp_path):
    """The real MONAI SegResNet, tiny preset: prints the table, records the row; retraining gives the same weights."""
    from catalog.store import open_catalog
    from flows.cli import main

    real, root = setup
    assert main(["utility", str(root), "--real", str(real), "--preset", "tiny", "--device", "cpu",
                 "--bootstrap", "50", "--no-card"]) == 0
    out = capsys.readouterr().out
    assert "ΔDice vs real [95% CI]" in out and "real+synth_1to1  mean" in out and "datasets version 1" in out
    assert "On the held-out real test set (2 cases): real+synth_1to1 changes mean Dice by" in out
    row = max(open_catalog(root).read_table("datasets").to_pylist(), key=lambda r: r["created_at"])
    assert json.loads(row["utility_budget"]) == dataclasses.replace(mu.UtilityConfig.tiny(), bootstrap=50).to_dict()
    dice = [r["dice"] for r in json.loads(row["utility_results"])["rows"]]
    assert len(dice) == 6 and all(d is None or 0.0 <= d <= 1.0 for d in dice)
    request = _request(real, config=json.loads(row["utility_budget"]))
    plan = fu.plan_utility(DatasetRoot.of(root), request)
    kept = fu.run_arm(DatasetRoot.of(root), request, plan, plan.arms[0])  # the finished checkpoint
    fresh_root = DatasetRoot.of(write_catalog(tmp_path / "fresh", 4))
    retrained = fu.run_arm(fresh_root, request, fu.plan_utility(fresh_root, request), plan.arms[0])
    assert retrained.test.dice == kept.test.dice and retrained.test.surface_dice == kept.test.surface_dice
    weights = [fu.arm_workdir(r, p, "real") / "model.safetensors" for r, p in
               ((DatasetRoot.of(root), plan), (fresh_root, fu.plan_utility(fresh_root, request)))]
    assert weights[0].read_bytes() == weights[1].read_bytes()  # same seeds, same weights
