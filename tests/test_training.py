"""Training loops (tiny preset, 32³ phantoms), checkpoints/resume, fine-tuning, ``models train``, default model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from maisi_core import io, presets
from maisi_core.errors import CheckpointError, ConfigError, TrainingDataError, TrainingDataNotFoundError
from maisi_core.training.pipeline import TrainingConfig, train_pipeline
from maisi_core.training.data import (
    PhantomCorpusConfig,
    find_nifti_pairs,
    fit_to_grid,
    generate_phantom_case,
    generate_phantom_corpus,
    hu_to_unit,
    load_nifti_corpus,
)

TINY_GRID = {"output_size_vox": (32, 32, 32), "spacing_xy_mm": (11.0, 13.0), "spacing_z_mm": (11.0, 13.0)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_cases():
    return generate_phantom_corpus(PhantomCorpusConfig(num_cases=4, **TINY_GRID), seed=3)


def _weights(model_dir, comp):
    return load_file(str(model_dir / comp / "model.safetensors"))


def _log(ckpt):
    return [json.loads(line) for line in (ckpt / "loss_log.jsonl").read_text().splitlines()]


def test_hu_to_unit_clips_and_scales():
    out = hu_to_unit(np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_phantom_corpus_is_seeded_and_on_grid(tiny_cases):
    again = generate_phantom_corpus(PhantomCorpusConfig(num_cases=4, **TINY_GRID), seed=3)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.label_map, b.label_map)
               for a, b in zip(tiny_cases, again, strict=True))
    case = tiny_cases[0]
    assert case.image.shape == case.label_map.shape == (32, 32, 32)
    assert case.image.dtype == np.float32 and 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert 200 in np.unique(case.label_map)


def test_phantom_corpus_workers_draw_the_same_cases(tiny_cases):
    pooled = generate_phantom_corpus(PhantomCorpusConfig(num_cases=4, **TINY_GRID), seed=3, workers=2)
    assert [c.name for c in pooled] == [c.name for c in tiny_cases]
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.label_map, b.label_map)
               and a.spacing_mm == b.spacing_mm for a, b in zip(tiny_cases, pooled, strict=True))
    with pytest.raises(TrainingDataError, match=r"^generate_phantom_corpus expects workers >= 1, but got workers=0\.$"):
        generate_phantom_corpus(PhantomCorpusConfig(num_cases=1, **TINY_GRID), seed=3, workers=0)


def test_train_pipeline_tiny_all_stages_finite_and_vae_improves(tmp_path, tiny_cases):
    cfg = TrainingConfig(steps_vae=8, steps_unet=3, steps_controlnet=3, batch_vae=2, vae_patch_vox=16, lr_vae=3e-3)
    seen = []
    result = train_pipeline(presets.tiny(), tiny_cases, out_dir=tmp_path / "m", checkpoint_dir=tmp_path / "ck",
                            training=cfg, callback=seen.append)
    log = _log(tmp_path / "ck")
    assert [r["stage"] for r in log] == ["vae"] * 8 + ["unet"] * 3 + ["controlnet"] * 3
    assert all(math.isfinite(r["loss"]) for r in log)
    vae = [r["l1"] for r in log if r["stage"] == "vae"]
    assert np.mean(vae[-3:]) < np.mean(vae[:3])
    assert len(seen) == 14 and seen[-1].stage == "controlnet" and seen[-1].step == seen[-1].total_steps == 3
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["training"]["stages"]["unet"]["steps"] == 3
    assert index["scale_factor"] == pytest.approx(result.scale_factor) and result.scale_factor > 0


def test_controlnet_starts_from_unet_weights(tmp_path, tiny_cases):
    cfg = TrainingConfig(stages=("controlnet",), steps_controlnet=1, lr_controlnet=1e-12)
    train_pipeline(presets.tiny(), tiny_cases[:2], out_dir=tmp_path / "m", checkpoint_dir=tmp_path / "ck", training=cfg)
    unet, cnet = _weights(tmp_path / "m", "unet"), _weights(tmp_path / "m", "controlnet")
    key = "conv_in.conv.weight"
    torch.testing.assert_close(cnet[key], unet[key], atol=1e-9, rtol=0)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_cases):
    cfg = TrainingConfig(stages=("unet", "controlnet"), steps_unet=3, steps_controlnet=4, checkpoint_every=2)
    train_pipeline(presets.tiny(), tiny_cases, out_dir=tmp_path / "a", checkpoint_dir=tmp_path / "cka", training=cfg)

    class Crash(RuntimeError):
        pass

    def crash(progress):
        if progress.stage == "controlnet" and progress.step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train_pipeline(presets.tiny(), tiny_cases, out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "ckb",
                       training=cfg, callback=crash)
    progress = json.loads((tmp_path / "ckb" / "controlnet" / "progress.json").read_text())
    assert progress["step"] == 2 and not progress["done"]
    with pytest.raises(CheckpointError, match=r"^train_pipeline expects an empty checkpoint folder unless resume=True"):
        train_pipeline(presets.tiny(), tiny_cases, out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "ckb", training=cfg)
    train_pipeline(presets.tiny(), tiny_cases, out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "ckb",
                   training=cfg, resume=True)
    for comp in ("unet", "controlnet"):
        a, b = _weights(tmp_path / "a", comp), _weights(tmp_path / "b", comp)
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _log(tmp_path / "cka")]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _log(tmp_path / "ckb")]


def test_resume_with_other_seed_is_refused(tmp_path, tiny_cases):
    cfg = TrainingConfig(stages=("unet",), steps_unet=1)
    train_pipeline(presets.tiny(), tiny_cases[:2], out_dir=tmp_path / "a", checkpoint_dir=tmp_path / "ck", training=cfg)
    with pytest.raises(CheckpointError, match=r"^train_pipeline expects a checkpoint of the same run to resume, "
                                              r"but got fingerprint=\{'batches': \[4, 4, 2\], "
                                              r"'init_from': 'preset:tiny', .*'seed': 0, 'vae_decoder_only': False\}"):
        train_pipeline(presets.tiny(), tiny_cases[:2], out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "ck",
                       training=TrainingConfig(stages=("unet",), steps_unet=1, seed=1), resume=True)


def _write_pairs(folder, n=2, layout="nnunet"):
    for i in range(n):
        case = generate_phantom_case(100 + i, output_size_vox=(28, 28, 36), spacing_mm=(13.0, 13.0, 11.0),
                                     regions=("chest", "abdomen"))
        hu = case.image * 2000.0 - 1000.0
        affine = np.diag([13.0, 13.0, 11.0, 1.0])
        if layout == "nnunet":
            io.save_image(folder / "imagesTr" / f"case{i}_0000.nii.gz", hu, affine)
            io.save_label(folder / "labelsTr" / f"case{i}.nii.gz", case.label_map, affine)
        else:
            io.save_image(folder / f"case{i}_image.nii.gz", hu, affine)
            io.save_label(folder / f"case{i}_label.nii.gz", case.label_map, affine)


def test_load_nifti_corpus_resamples_and_pads(tmp_path):
    _write_pairs(tmp_path, layout="flat")
    cases = load_nifti_corpus(tmp_path, output_size_vox=(32, 32, 32), spacing_mm=(12.0, 12.0, 12.0))
    assert [c.name for c in cases] == ["case0_image", "case1_image"]
    assert cases[0].image.shape == cases[0].label_map.shape == (32, 32, 32)
    assert cases[0].spacing_mm == (12.0, 12.0, 12.0) and 200 in np.unique(cases[0].label_map)
    img, lab = fit_to_grid(np.zeros((4, 4, 4)), np.ones((4, 4, 4), np.uint8), (1, 1, 1),
                           target_spacing_mm=(1, 1, 1), output_size_vox=(6, 2, 4))
    assert img.shape == (6, 2, 4) and img[0, 0, 0] == -1000.0 and lab[1:5].all() and not lab[0].any()


def test_finetune_from_model_dir_on_nifti_pairs_changes_weights(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "base")
    _write_pairs(tmp_path / "data")
    cases = load_nifti_corpus(tmp_path / "data", output_size_vox=(32, 32, 32), spacing_mm=(12.0, 12.0, 12.0))
    cfg = TrainingConfig(steps_vae=2, steps_unet=2, steps_controlnet=2, batch_vae=1, vae_patch_vox=16)
    result = train_pipeline(tmp_path / "base", cases, out_dir=tmp_path / "ft", checkpoint_dir=tmp_path / "ck",
                            training=cfg)
    assert result.summary["init_from"].startswith("model:tiny@")
    for comp in ("vae", "unet", "controlnet"):
        a, b = _weights(tmp_path / "base", comp), _weights(tmp_path / "ft", comp)
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), comp


def test_finetune_selected_stage_keeps_the_others(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "base")
    _write_pairs(tmp_path / "data")
    cases = load_nifti_corpus(tmp_path / "data", output_size_vox=(32, 32, 32), spacing_mm=(12.0, 12.0, 12.0))
    train_pipeline(tmp_path / "base", cases, out_dir=tmp_path / "ft", checkpoint_dir=tmp_path / "ck",
                   training=TrainingConfig(stages=("controlnet",), steps_controlnet=2))
    for comp, changed in (("vae", False), ("unet", False), ("controlnet", True)):
        a, b = _weights(tmp_path / "base", comp), _weights(tmp_path / "ft", comp)
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, comp


def test_cli_models_train_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["models", "train", "--preset", "tiny", "--out", str(out), "--steps-vae", "2", "--steps-unet", "2",
               "--steps-controlnet", "2", "--phantom-cases", "2", "--device", "cpu", "--seed", "5"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    assert (tmp_path / "m.checkpoints" / "loss_log.jsonl").is_file()
    from maisi_core import MaisiPipeline

    pipe = MaisiPipeline.from_pretrained(out, device="cpu")
    assert pipe.config.name == "tiny" and pipe.scale_factor > 0


def test_cli_models_train_batch_patch_and_checkpoint_flags_reach_the_run(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["models", "train", "--preset", "tiny", "--out", str(out), "--steps-vae", "3", "--steps-unet", "1",
               "--steps-controlnet", "1", "--phantom-cases", "2", "--device", "cpu", "--batch-vae", "3",
               "--batch-unet", "2", "--batch-controlnet", "1", "--vae-patch-vox", "16", "--checkpoint-every", "2",
               "--corpus-workers", "2", "--max-minutes", "30", "--anneal-to-budget", "--tumor-loss-weight", "25",
               "--tumor-probability", "1", "--lr-vae", "2e-4", "--lr-controlnet", "1e-4",
               "--thin-loss-weight", "4"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "model_index.json").read_text())["training"]["config"]
    assert config["anneal_to_budget"] is True and config["max_minutes"] == 30
    assert (config["batch_vae"], config["batch_unet"], config["batch_controlnet"]) == (3, 2, 1)
    assert (config["vae_patch_vox"], config["checkpoint_every"]) == (16, 2)
    assert (config["tumor_loss_weight"], config["lr_vae"], config["lr_unet"], config["lr_controlnet"]) == (
        25.0, 2e-4, 5e-4, 1e-4)
    assert config["thin_loss_weight"] == 4.0
    rc = main(["models", "train", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--vae-patch-vox", "0"])
    assert rc == 2 and "TrainingConfig expects vae_patch_vox >= 1, but got vae_patch_vox=0." in capsys.readouterr().err


def test_cli_models_train_fine_tunes_with_data_folder(tmp_path, tiny_pipe, capsys):
    tiny_pipe.save_pretrained(tmp_path / "base")
    _write_pairs(tmp_path / "data")
    rc = main(["models", "train", "--from", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--out",
               str(tmp_path / "ft"), "--stages", "controlnet", "--steps-controlnet", "1", "--device", "cpu"])
    assert rc == 0
    index = json.loads((tmp_path / "ft" / "model_index.json").read_text())
    assert index["training"]["data"].startswith("NIfTI pairs from")


def test_cli_models_train_unknown_stage_is_exit_2(tmp_path, capsys):
    rc = main(["models", "train", "--preset", "tiny", "--out", str(tmp_path / "m"), "--stages", "vae,contrlnet"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "ctfactory models: TrainingConfig expects stages from ['vae', 'unet', 'controlnet'], but got "
        "stage='contrlnet'. Did you mean 'controlnet'?\n"
    )


def test_cli_models_train_missing_data_folder_is_exit_2(tmp_path, capsys):
    rc = main(["models", "train", "--preset", "tiny", "--out", str(tmp_path / "m"), "--data", str(tmp_path / "no")])
    assert rc == 2
    assert capsys.readouterr().err.startswith(
        "ctfactory models: find_nifti_pairs expects an existing folder of NIfTI image/label pairs, but got folder="
    )


def test_find_nifti_pairs_errors(tmp_path):
    with pytest.raises(TrainingDataNotFoundError, match=r"^find_nifti_pairs expects an existing folder .* which does "
                                                        r"not exist\. Give imagesTr/"):
        find_nifti_pairs(tmp_path / "missing")
    with pytest.raises(TrainingDataError, match=r"^find_nifti_pairs expects at least one image/label pair, but got none"):
        find_nifti_pairs(tmp_path)
    _write_pairs(tmp_path, n=1)
    (tmp_path / "labelsTr" / "case0.nii.gz").rename(tmp_path / "labelsTr" / "other.nii.gz")
    with pytest.raises(TrainingDataError, match=r"^find_nifti_pairs expects every image to have a label of the same "
                                                r"name, but got unmatched=\['case0', 'other'\]"):
        find_nifti_pairs(tmp_path)


def test_training_config_errors():
    with pytest.raises(ConfigError, match=r"^TrainingConfig expects stages from \['vae', 'unet', 'controlnet'\], but got "
                                          r"stage='unett'\. Did you mean 'unet'\?$"):
        TrainingConfig(stages=("unett",))
    with pytest.raises(ConfigError, match=r"^TrainingConfig expects diffusion_loss in \['l1', 'mse'\], but got "
                                          r"diffusion_loss='l2'\."):
        TrainingConfig(diffusion_loss="l2")
    with pytest.raises(ConfigError, match=r"^TrainingConfig expects steps_vae >= 0, but got steps_vae=-1\.$"):
        TrainingConfig(steps_vae=-1)
    with pytest.raises(ConfigError, match=r"^TrainingConfig expects tumor_loss_weight >= 1, but got "
                                          r"tumor_loss_weight=0\.5\.$"):
        TrainingConfig(tumor_loss_weight=0.5)
    with pytest.raises(TrainingDataError, match=r"^PhantomCorpusConfig expects 0 <= tumor_probability <= 1, but "
                                                r"got tumor_probability=1\.5\.$"):
        PhantomCorpusConfig(tumor_probability=1.5)


def test_tumor_loss_weight_weights_latent_voxels_covering_a_tumour():
    from maisi_core.training.losses import roi_weights as _roi_weights

    lab = np.full((1, 8, 8, 8), 200, np.uint8)
    lab[0, 0:4, 0:4, 0:4] = 1  # liver: latent voxel (0, 0, 0) at factor 4
    lab[0, 5, 5, 5] = 23  # one tumour voxel: latent voxel (1, 1, 1)
    assert _roi_weights(lab, 4, TrainingConfig()) is None
    w = _roi_weights(lab, 4, TrainingConfig(roi_loss_weight=2.0, tumor_loss_weight=30.0))
    assert w.shape == (1, 1, 2, 2, 2)
    assert float(w[0, 0, 0, 0, 0]) == 2.0 and float(w[0, 0, 1, 1, 1]) == 60.0 and float(w[0, 0, 1, 0, 0]) == 1.0
    w = _roi_weights(lab, 1, TrainingConfig(tumor_loss_weight=30.0))  # VAE: per voxel
    assert float(w[0, 0, 5, 5, 5]) == 30.0 and float(w.sum()) == 511 + 30
    lab[0, 7, 0, 0] = 121  # spinal cord, a thin structure: latent voxel (1, 0, 0)
    w = _roi_weights(lab, 4, TrainingConfig(thin_loss_weight=10.0))
    assert float(w[0, 0, 1, 0, 0]) == 10.0 and float(w[0, 0, 1, 1, 1]) == 1.0


def test_train_pipeline_refuses_mixed_shapes(tmp_path, tiny_cases):
    odd = generate_phantom_corpus(PhantomCorpusConfig(num_cases=1, output_size_vox=(48, 32, 32)), seed=0)
    with pytest.raises(TrainingDataError, match=r"^train_pipeline expects every image and label map of one shape "
                                                r"\(32, 32, 32\), but got other shapes in cases=\['phantom-0'\]"):
        train_pipeline(presets.tiny(), [tiny_cases[0], *odd], out_dir=tmp_path / "m", checkpoint_dir=tmp_path / "ck")


def test_default_preset_is_registered_and_small():
    from maisi_core import MaisiPipeline
    from maisi_core.engine.networks import count_parameters

    cfg = presets.get_preset("default")
    assert cfg.size_multiple_vox == 16 and cfg.scheduler.default_num_inference_steps == 25
    pipe = MaisiPipeline.from_config(cfg, device="meta")
    n = sum(count_parameters(m) for m in (pipe.vae, pipe.unet, pipe.controlnet))
    assert n * 4 < 25e6


def _default_case(seed, tumor_id=None):
    return generate_phantom_case(seed, output_size_vox=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0),
                                 regions=("chest", "abdomen"), tumor_id=tumor_id)


@pytest.mark.slow
def test_default_model_generates_a_qc_passing_case():
    """Case 0 of benchmarks/eval_default_model.py (the model passes QC on only part of the cases; see its card)."""
    from maisi_core import MaisiPipeline
    from maisi_core.evaluation import qc
    from maisi_core.engine.model_dir import packaged_model_path

    if packaged_model_path("default") is None:
        pytest.skip("no packaged default model in this checkout")
    pipe = MaisiPipeline.from_pretrained("default", device="cpu")
    case = _default_case(10_000_000, tumor_id=26)
    out = pipe.generate(case.label_map, spacing_mm=case.spacing_mm, seed=0)
    assert out.image.shape == (64, 64, 64)
    result = qc.check_case(out.image, case.label_map)
    assert result.passed, result.summary()


def test_vae_decoder_only_keeps_encoder_and_scale_factor(tmp_path, tiny_pipe, tiny_cases):
    tiny_pipe.save_pretrained(tmp_path / "base")
    cfg = TrainingConfig(stages=("vae",), steps_vae=2, batch_vae=1, vae_patch_vox=16, vae_decoder_only=True)
    result = train_pipeline(tmp_path / "base", tiny_cases, out_dir=tmp_path / "ft", checkpoint_dir=tmp_path / "ck",
                            training=cfg)
    a, b = _weights(tmp_path / "base", "vae"), _weights(tmp_path / "ft", "vae")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert result.scale_factor == tiny_pipe.scale_factor


def test_roi_loss_weight_applies_to_every_stage(tmp_path, tiny_cases):
    """Same seeds and data, weight 1 vs 4: every stage's first loss changes (it did not if a stage ignored it)."""
    first = {}
    for weight in (1.0, 4.0):
        cfg = TrainingConfig(steps_vae=2, steps_unet=2, steps_controlnet=2, batch_vae=1, vae_patch_vox=16,
                             roi_loss_weight=weight)
        run = tmp_path / f"w{weight:g}"
        train_pipeline(presets.tiny(), tiny_cases[:2], out_dir=run / "m", checkpoint_dir=run / "ck", training=cfg)
        log = _log(run / "ck")
        assert len(log) == 6 and all(math.isfinite(r["loss"]) for r in log)
        first[weight] = {r["stage"]: r["loss"] for r in reversed(log)}  # each stage's first step wins
    assert set(first[1.0]) == {"vae", "unet", "controlnet"}
    for stage in first[1.0]:
        assert first[4.0][stage] != pytest.approx(first[1.0][stage], rel=1e-4), stage


def test_lr_decays_with_the_spent_time_budget_too():
    from maisi_core.training.loop import lr_factor as _lr_factor

    assert _lr_factor(0, 1000, 20) == pytest.approx(1 / 20)
    assert _lr_factor(50, 1000, 20) > 0.99  # early by steps, no budget: near the peak
    assert _lr_factor(50, 1000, 20, time_progress=1.0) == pytest.approx(0.1)  # budget spent: annealed
    assert _lr_factor(50, 1000, 20, time_progress=0.5) == pytest.approx(0.55)
    assert _lr_factor(990, 1000, 20, time_progress=0.1) < 0.11  # steps ahead of time: steps rule
