"""Parity with NVIDIA's reference sampler (NV-Generate-CTMR): guidance, decode tiling, intensity mapping,
precision and DDPM step noise (issue 10, item 6)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog.root import DatasetRoot
from maisi_core import MaisiPipeline, presets
from maisi_core.anatomy import labels
from maisi_core.engine.config import DDPMSchedulerConfig
from maisi_core.engine.decoding import DECODE_PRESETS, decode_latents
from maisi_core.engine.pipeline import Conditioning, resolve_precision
from maisi_core.engine.schedulers import build_scheduler, plan_timesteps, scheduler_step
from test_pipeline import _tiny_ddpm

SPACING = (1.5, 1.5, 1.5)


def _with_tumour(label_map: np.ndarray, tumour: int = 26) -> np.ndarray:
    lm = label_map.copy()
    lm[9:11, 9:11, 9:11] = tumour  # inside the liver
    return lm


def _cond(pipe: MaisiPipeline, modality: int = 1) -> Conditioning:
    return pipe.prepare_conditioning(SPACING, modality=modality)




# -- 1. classifier-free guidance ------------------------------------------------------------------

def test_guidance_unconditional_branch_uses_modality_zero_with_a_mask(tiny_pipe, label_map):
    lm = _with_tumour(label_map)
    cond = _cond(tiny_pipe, modality=3)
    control, uncond = tiny_pipe.prepare_guidance(lm, cond, 2.0)
    assert uncond.class_labels.tolist() == [0] and cond.class_labels.tolist() == [3]
    assert torch.equal(uncond.spacing, cond.spacing)
    assert torch.equal(control, tiny_pipe.prepare_control(labels.remove_tumors(lm)))


def test_guidance_without_a_tumour_runs_with_the_same_mask(tiny_pipe, label_map):
    control, uncond = tiny_pipe.prepare_guidance(label_map, _cond(tiny_pipe), 1.5)
    assert control is None and uncond.class_labels.tolist() == [0]  # None: the conditional mask is reused
    guided = tiny_pipe.generate(label_map, spacing_mm=SPACING, seed=0, num_inference_steps=2, guidance_scale=1.5)
    assert guided.image.shape == (32, 32, 32) and np.isfinite(guided.image).all()


def test_guidance_denoise_runs_the_unconditional_branch_with_class_zero_and_no_tumour(tiny_pipe, label_map,
                                                                                      monkeypatch):
    import maisi_core.engine.pipeline as pipeline_module

    lm = _with_tumour(label_map)
    embedded, steps = [], []
    embed, residuals = pipeline_module.embed_control, pipeline_module.controlnet_residuals

    def spy_embed(controlnet, control):
        embedded.append((int(control[0, 1, 9, 9, 9]), int(control[0, 3, 9, 9, 9])))  # 26: bits 1, 3 and 4
        out = embed(controlnet, control)
        out.tag = len(embedded) - 1  # which mask this embedding came from
        return out

    def spy_residuals(controlnet, x, timesteps, *, control_embedding, class_labels=None):
        steps.append((int(class_labels[0]), control_embedding.tag))
        return residuals(controlnet, x, timesteps, control_embedding=control_embedding, class_labels=class_labels)

    monkeypatch.setattr(pipeline_module, "embed_control", spy_embed)
    monkeypatch.setattr(pipeline_module, "controlnet_residuals", spy_residuals)
    tiny_pipe.generate(lm, spacing_mm=SPACING, seed=0, num_inference_steps=2, guidance_scale=2.0)
    assert embedded == [(1, 1), (0, 0)]  # the tumour mask, then the same mask with the tumour removed: once each
    assert steps == [(1, 0), (0, 1)] * 2  # per step: CT class with the tumour mask, class 0 without it


def test_guidance_on_a_body_region_model_drops_only_the_tumours(label_map):
    pipe = MaisiPipeline.from_config(_tiny_ddpm(), device="cpu")
    lm = _with_tumour(label_map, 24)
    cond = pipe.prepare_conditioning(SPACING, label_map=lm)
    control, uncond = pipe.prepare_guidance(lm, cond, 2.0)
    assert uncond is cond and control is not None


def test_remove_tumors_follows_upstream_remap_including_kidney_cysts(label_map):
    lm = label_map.copy()
    lm[4:6, 4:6, 4:6] = 116  # left kidney cyst
    lm[6:8, 4:6, 4:6] = 117  # right kidney cyst
    lm[9:10, 9:10, 9:10] = 26
    lm[10:11, 9:10, 9:10] = 24
    lm[11:12, 9:10, 9:10] = 27
    out = labels.remove_tumors(lm)
    assert (out[4:6, 4:6, 4:6] == 14).all() and (out[6:8, 4:6, 4:6] == 5).all()
    assert (out[9, 9, 9], out[10, 9, 9], out[11, 9, 9]) == (1, 4, 62)
    assert labels.remove_tumors(label_map).tolist() == label_map.tolist()  # nothing to remove: unchanged


def test_remove_tumors_fills_a_lung_tumour_with_the_majority_neighbouring_lobe():
    lm = np.full((24, 24, 24), 200, dtype=np.uint8)
    lm[4:20, 4:20, 4:11] = 29  # a wide lobe under the tumour: 36 ring voxels
    lm[11:13, 11:13, 13:20] = 30  # a narrow lobe on top of it: 4 ring voxels, but nearest to some tumour voxels
    lm[10:14, 10:14, 11:13] = 23
    out = labels.remove_tumors(lm)
    assert (out[10:14, 10:14, 11:13] == 29).all()  # one label, the ring's majority, for the whole tumour


def test_remove_tumors_falls_back_to_the_most_frequent_lobe_when_none_touches_the_tumour():
    lm = np.full((24, 24, 24), 200, dtype=np.uint8)
    lm[0:4, 0:4, 0:4] = 28  # small lobe, closest to the tumour
    lm[16:24, 16:24, 16:24] = 31  # large lobe, far away
    lm[6:8, 6:8, 6:8] = 23
    out = labels.remove_tumors(lm)
    assert (out[6:8, 6:8, 6:8] == 31).all()


def test_remove_tumors_fills_a_bone_lesion_with_the_majority_neighbouring_bone():
    # upstream leaves 128 in place without pseudo labels; the documented difference fills it like a lung tumour
    lm = np.full((24, 24, 24), 200, dtype=np.uint8)
    lm[4:20, 4:20, 4:10] = 33  # vertebra L5, wide, below
    lm[10:12, 10:12, 12:13] = 63  # a narrow rib slab touching the top
    lm[10:12, 10:12, 10:12] = 128
    out = labels.remove_tumors(lm)
    assert (out[10:12, 10:12, 10:12] == 33).all()


# -- 2. decode tiling -------------------------------------------------------------------------------

def _counting_decoder(calls: list):
    def decode(z: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(z.shape[2:]))
        return z[:, :1]
    return decode


def test_decode_skips_the_window_when_the_latent_has_fewer_voxels_than_it():
    calls: list = []
    z = torch.zeros(1, 4, 64, 64, 32)  # 256x256x128 image; more than 48 on two axes
    out = decode_latents(_counting_decoder(calls), z, roi_latent=DECODE_PRESETS["16g"].roi_latent, overlap=0.6666)
    assert calls == [(64, 64, 32)] and out.shape == (1, 1, 64, 64, 32)


def test_decode_tiles_by_total_voxels_with_the_window_capped_per_axis():
    calls: list = []
    z = torch.zeros(1, 4, 16, 16, 8)  # 2048 voxels > 8*8*16
    decode_latents(_counting_decoder(calls), z, roi_latent=(8, 8, 16), overlap=0.5)
    assert len(calls) > 1 and set(calls) == {(8, 8, 8)}
    calls.clear()
    decode_latents(_counting_decoder(calls), torch.zeros(1, 4, 16, 16, 4), roi_latent=(8, 8, 16), overlap=0.5)
    assert calls == [(16, 16, 4)]  # 1024 voxels = one window


def test_official_presets_decode_with_upstream_inference_window_and_memory_presets_are_unchanged():
    for cfg in (presets.maisi_ct_rflow(), presets.maisi_ct_ddpm()):
        assert (cfg.decode_roi_latent, cfg.decode_overlap) == ((48, 48, 48), 0.6666)
    assert presets.tiny().decode_roi_latent is None and presets.default().decode_roi_latent is None
    assert {k: (p.roi_latent, p.overlap, p.num_splits) for k, p in DECODE_PRESETS.items()} == {
        "16g": ((48, 48, 64), 0.6666, 4), "24g": ((64, 64, 48), 0.4, 2),
        "32g": ((80, 80, 48), 0.4, 4), "80g": ((80, 80, 80), 0.4, 4),
    }


# -- 3. intensity mapping by modality ---------------------------------------------------------------

@pytest.mark.parametrize(("modality", "expected", "background"), [
    (None, [-1000.0, 0.0, 1000.0, 1000.0], -1000.0),  # the preset's CT code
    (0, [-1000.0, 0.0, 1000.0, 1000.0], -1000.0),
    (7, [-1000.0, 0.0, 1000.0, 1000.0], -1000.0),
    (8, [0.0, 500.0, 1000.0, 1500.0], 0.0),  # MR: lower clip only, [0, 1000], background 0
    (9, [0.0, 500.0, 1000.0, 1500.0], 0.0),
])
def test_postprocess_maps_ct_and_mr_codes_like_upstream(tiny_pipe, modality, expected, background):
    image = torch.tensor([-0.5, 0.5, 1.0, 1.5]).reshape(1, 1, 4, 1, 1)
    lm = np.array([1, 1, 1, 1], dtype=np.uint8).reshape(4, 1, 1)
    hu = tiny_pipe.postprocess(image, lm, modality)
    assert hu.ravel().tolist() == expected
    lm[0] = 0
    assert tiny_pipe.postprocess(image, lm, modality)[0, 0, 0] == background


def test_generate_with_an_mr_code_uses_the_mr_background(tiny_pipe, label_map):
    out = tiny_pipe.generate(label_map, spacing_mm=SPACING, seed=0, num_inference_steps=2, modality=9)
    assert (out.image[label_map == 0] == 0.0).all() and out.image.min() >= 0.0
    assert out.modality == "MR"
    assert tiny_pipe.generate(label_map, spacing_mm=SPACING, seed=0, num_inference_steps=2).modality == "CT"


def test_an_mr_model_maps_its_own_codes_with_its_config_and_ct_codes_with_the_ct_convention(tiny_pipe):
    """The config's range and background belong to the model's own family; the other family keeps its defaults."""
    mr_model = MaisiPipeline(tiny_pipe.config.replace(modality=9, intensity_range=(0.0, 500.0), background_value=-5.0),
                             tiny_pipe.vae, tiny_pipe.unet, tiny_pipe.controlnet, device="cpu")
    image = torch.tensor([0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 4, 1, 1)
    lm = np.array([0, 1, 1, 1], dtype=np.uint8).reshape(4, 1, 1)
    assert mr_model.postprocess(image, lm).ravel().tolist() == [-5.0, 250.0, 500.0, 750.0]
    assert mr_model.postprocess(image, lm, 1).ravel().tolist() == [-1000.0, 0.0, 1000.0, 1000.0]
    assert mr_model.intensity_convention(1).unit == "HU" and mr_model.intensity_convention().unit == "a.u."


# -- 4. precision -----------------------------------------------------------------------------------

def test_precision_auto_is_fp16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    from maisi_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"expects precision in \['auto', 'bf16', 'fp16', 'fp32'\], "
                                          r"but got precision='fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_pipeline_defaults_to_fp16_on_cuda_and_fp32_on_cpu():
    meta = MaisiPipeline.from_config(presets.tiny(), device="meta")
    on_cuda = MaisiPipeline(meta.config, meta.vae, meta.unet, meta.controlnet, device=torch.device("cuda"))
    assert on_cuda.precision == "fp16"
    assert MaisiPipeline.from_config(presets.tiny(), device="cpu").precision == "fp32"


def test_load_pipeline_caches_per_precision():
    from factory.models import load_pipeline

    fp32 = load_pipeline("preset:tiny", "cpu")
    bf16 = load_pipeline("preset:tiny", "cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and fp32 is not bf16
    assert load_pipeline("preset:tiny", "cpu", precision="fp32") is fp32


def test_runtime_precision_setting_and_cli_option():
    from flows.cli import build_parser
    from factory.spec import Runtime

    assert Runtime().precision == "auto" and Runtime(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="fp8")
    args = build_parser().parse_args(["run", "x.yaml", "--precision", "fp32"])
    assert args.precision == "fp32"


def test_sample_rows_record_the_precision_used(tmp_path):
    from factory.case import get_generator, run_case
    from factory.plan import plan_dataset
    from factory.spec import parse_spec

    spec = parse_spec(
        f"name: p\nversion: '1'\nmodel: preset:tiny\noutput_root: {tmp_path}\nseed: 1\n"
        "cohorts:\n  - name: c\n    count: 1\n    body_region: chest\n    output_size: [32, 32, 32]\n"
        "    spacing_mm: [8, 8, 8]\n    num_inference_steps: 2\n    qc: {organ_hu_check: false}\n"
    )
    record = run_case(plan_dataset(spec).cases[0], get_generator("maisi", "preset:tiny", "cpu", precision="bf16"),
                      root=DatasetRoot.of(tmp_path))
    assert record.precision == "bf16" and record.to_row()["precision"] == "bf16"


def test_catalog_rows_without_precision_still_read():
    from catalog.schema import SAMPLES_SCHEMA, conform_table

    old = pa.table({"sample_id": ["a"], "device": ["cpu"]})
    table = conform_table(old, SAMPLES_SCHEMA)
    assert "precision" in table.column_names and table.column("precision").to_pylist() == [None]


# -- 5. DDPM step noise -----------------------------------------------------------------------------

def _strict_randn(monkeypatch):
    """Make torch.randn fail like CUDA does when the generator lives on another device."""
    real = torch.randn

    def randn(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return real(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)


def test_ddpm_step_draws_noise_on_the_generator_device(monkeypatch):
    scheduler = build_scheduler(DDPMSchedulerConfig())
    plan = plan_timesteps(scheduler, 2, latent_spatial_shape=(4, 4, 4))
    _strict_randn(monkeypatch)
    x = torch.zeros(1, 4, 4, 4, 4, device="meta")  # stands in for a CUDA tensor
    out = scheduler_step(scheduler, torch.zeros_like(x), plan.timesteps[0], plan.next_timesteps[0], x,
                         generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape


def test_ddpm_step_adds_cpu_drawn_noise_to_the_posterior_mean():
    scheduler = build_scheduler(DDPMSchedulerConfig())
    scheduler.set_timesteps(1000)
    gen = torch.Generator().manual_seed(5)
    x, eps = torch.randn(1, 4, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, 4, generator=gen)
    t = 500
    a_t, a_prev, beta = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 1], scheduler.betas[t]
    x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
    mean = a_prev**0.5 * beta / (1 - a_t) * x0 + (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t) * x
    std = ((1 - a_prev) / (1 - a_t) * beta) ** 0.5
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out = scheduler_step(scheduler, eps, torch.tensor(t), torch.tensor(0), x,
                         generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, mean + std * noise)
    monai_out, _ = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out, monai_out)  # on the CPU, identical to MONAI's own step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ddpm_pipeline_on_cuda_matches_cpu(label_map):
    kwargs = {"spacing_mm": SPACING, "seed": 3, "num_inference_steps": 3}
    cpu = MaisiPipeline.from_config(_tiny_ddpm(), device="cpu").generate(label_map, **kwargs)
    cuda = MaisiPipeline.from_config(_tiny_ddpm(), device="cuda", precision="fp32").generate(label_map, **kwargs)
    np.testing.assert_allclose(cuda.image, cpu.image, atol=10.0)  # other step noise would differ by 100s of HU
    fp16 = MaisiPipeline.from_config(_tiny_ddpm(), device="cuda").generate(label_map, **kwargs)
    assert np.isfinite(fp16.image).all()
