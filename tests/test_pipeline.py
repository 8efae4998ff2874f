from __future__ import annotations

import numpy as np
import pytest
import torch

from maisi_core import GenerationRequest, MaisiPipeline, presets
from maisi_core.engine.config import DDPMSchedulerConfig
from maisi_core.errors import ConfigError, DeviceError, GeometryError, LabelMapError
from maisi_core.anatomy.labels import remove_tumors
from maisi_core.engine.pipeline import encode_labels_8bit


def test_generate_labelled_32_cube_on_cpu(tiny_pipe, label_map):
    out = tiny_pipe.generate(label_map, spacing_mm=(1.5, 1.5, 1.5), seed=0, num_inference_steps=2)
    assert out.image.shape == (32, 32, 32) and out.image.dtype == np.float32
    assert out.label_map.dtype == np.uint8 and np.array_equal(out.label_map, label_map)
    assert out.image.min() >= -1000 and out.image.max() <= 1000
    assert (out.image[label_map == 0] == -1000).all()
    assert np.allclose(np.diag(out.affine)[:3], 1.5)
    assert set(out.timings_s) >= {"denoise", "decode", "total"}


def test_same_seed_gives_identical_volume_and_other_seed_differs(tiny_pipe, label_map):
    a = tiny_pipe.generate(label_map, spacing_mm=(1.5, 1.5, 1.5), seed=7, num_inference_steps=2)
    b = tiny_pipe.generate(label_map, spacing_mm=(1.5, 1.5, 1.5), seed=7, num_inference_steps=2)
    c = tiny_pipe.generate(label_map, spacing_mm=(1.5, 1.5, 1.5), seed=8, num_inference_steps=2)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_two_pipelines_from_same_config_agree(label_map):
    p1 = MaisiPipeline.from_config(presets.tiny(), device="cpu", init_seed=0)
    p2 = MaisiPipeline.from_config(presets.tiny(), device="cpu", init_seed=0)
    a = p1.generate(label_map, spacing_mm=(2.0, 2.0, 2.0), seed=1, num_inference_steps=2)
    b = p2.generate(label_map, spacing_mm=(2.0, 2.0, 2.0), seed=1, num_inference_steps=2)
    assert np.array_equal(a.image, b.image)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values (ControlNet output convolutions start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_condition_changes_output(label_map):
    tiny_pipe = MaisiPipeline.from_config(presets.tiny(), device="cpu")
    _randomize(tiny_pipe.controlnet, 0)
    _randomize(tiny_pipe.unet, 1)
    other = label_map.copy()
    other[other == 1] = 3
    a = tiny_pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    b = tiny_pipe.generate(other, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    c = tiny_pipe.generate(label_map, spacing_mm=(3.0,) * 3, seed=0, num_inference_steps=2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def _final_latents(pipe, monkeypatch, label_map, **kw):
    """The denoised latents of one generate call (decoding may clip small differences away)."""
    seen = []
    real = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda x: seen.append(x.clone()) or real(x))
    out = pipe.generate(label_map, **kw)
    monkeypatch.setattr(pipe, "decode", real)
    return out, seen[0]


@pytest.fixture(scope="module")
def guided_pipe():
    """``tiny`` with 4 norm groups over 8 channels and random weights.

    With one channel per group (``tiny`` itself) GroupNorm removes the per-channel shift through which the
    time, spacing and modality embeddings enter, so modality guidance could not change anything there.
    """
    import dataclasses

    cfg = presets.tiny()
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, norm_num_groups=4),
                              controlnet=dataclasses.replace(cfg.controlnet, norm_num_groups=4))
    pipe = MaisiPipeline.from_config(cfg, device="cpu")
    _randomize(pipe.unet, 1)
    _randomize(pipe.controlnet, 2)
    return pipe


def test_image_only_path_and_modality_guidance(guided_pipe, monkeypatch):
    """Guidance follows the classifier-free formula: scale 1 is the conditional prediction, 2 moves away."""
    tiny_pipe = guided_pipe
    kw = dict(spacing_mm=(2.0, 2.0, 2.0), output_size_vox=(32, 32, 48), seed=0, num_inference_steps=2)
    plain, z0 = _final_latents(tiny_pipe, monkeypatch, None, **kw)
    assert plain.image.shape == (32, 32, 48) and plain.label_map is None
    _, z1 = _final_latents(tiny_pipe, monkeypatch, None, guidance_scale=1.0, **kw)
    _, z2 = _final_latents(tiny_pipe, monkeypatch, None, guidance_scale=2.0, **kw)
    torch.testing.assert_close(z1, z0, atol=1e-4, rtol=1e-4)  # u + 1 * (c - u) == c
    assert (z2 - z0).abs().max() > 1e-4  # the modality class (unknown vs CT) matters; float noise is ~1e-6


def test_tumour_guidance_runs_with_and_without_a_tumour(guided_pipe, label_map, monkeypatch):
    """Upstream guides on any mask: without a tumour only the modality class differs; with one, the mask too."""
    tiny_pipe = guided_pipe
    kw = dict(spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    lm = label_map.copy()
    lm[9:11, 9:11, 9:11] = 26
    for mask in (label_map, lm):
        plain, z0 = _final_latents(tiny_pipe, monkeypatch, mask, **kw)
        _, z1 = _final_latents(tiny_pipe, monkeypatch, mask, guidance_scale=1.0, **kw)
        guided, z15 = _final_latents(tiny_pipe, monkeypatch, mask, guidance_scale=1.5, **kw)
        assert guided.image.shape == plain.image.shape == (32, 32, 32)
        torch.testing.assert_close(z1, z0, atol=1e-4, rtol=1e-4)
        assert (z15 - z0).abs().max() > 1e-4
    # the unconditional branch of a tumour mask drops the tumour: only there does the control input change
    cond = tiny_pipe.prepare_conditioning((1.5,) * 3, label_map=lm)
    uncond_control, _ = tiny_pipe.prepare_guidance(lm, cond, 1.5)
    assert uncond_control is not None
    assert torch.equal(uncond_control, tiny_pipe.prepare_control(remove_tumors(lm)))
    assert not np.any(remove_tumors(lm) == 26) and tiny_pipe.prepare_guidance(label_map, cond, 1.5)[0] is None


def test_callback_reports_each_step(tiny_pipe, label_map):
    seen = []
    tiny_pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=3,
                       callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_missing_body_label_is_refused_unless_fixed(tiny_pipe, label_map):
    no_body = np.where(label_map == 200, 0, label_map).astype(np.uint8)
    with pytest.raises(LabelMapError, match=r"MaisiPipeline\[tiny\] expects the body label 200 .* Pass fix_body=True"):
        tiny_pipe.generate(no_body, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    out = tiny_pipe.generate(no_body, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2, fix_body=True)
    assert 200 in np.unique(out.label_map)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"spacing_mm": (1.5, 1.5, 1.5), "output_size_vox": (48, 48, 48)}, LabelMapError,
         r"MaisiPipeline\[tiny\] expects a label map of the output size \(48, 48, 48\), but got shape=\(32, 32, 32\)"),
        ({"spacing_mm": (1.5, 1.5, 30.0)}, GeometryError, r"z spacing in \[0.1, 20.0\] mm, but got spacing_mm=\[1.5, 1.5, 30.0\]"),
        ({"spacing_mm": (1.5, 1.5)}, GeometryError, r"expects spacing_mm as three numbers"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny_pipe, label_map, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        tiny_pipe.generate(label_map, seed=0, num_inference_steps=2, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_label_ids_refused(tiny_pipe, label_map):
    bad = label_map.copy()
    bad[0, 0, 0] = 140
    with pytest.raises(LabelMapError, match=r"but got unknown ids=\[140\]"):
        tiny_pipe.generate(bad, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)


def test_size_not_divisible_refused(tiny_pipe):
    with pytest.raises(GeometryError, match=r"divisible by 16"):
        tiny_pipe.generate(np.full((32, 32, 24), 200, np.uint8), spacing_mm=(1.5,) * 3, seed=0)


def test_neither_label_map_nor_size(tiny_pipe):
    with pytest.raises(ConfigError, match=r"expects a label_map or an output_size_vox, but got neither"):
        tiny_pipe(GenerationRequest(spacing_mm=(1.0, 1.0, 1.0)), num_inference_steps=2)


def test_official_preset_enforces_released_geometry_before_any_compute(label_map):
    """generate applies the released model's geometry rules first: a 32^3 mask never reaches the networks."""
    pipe = MaisiPipeline.from_config(presets.maisi_ct_rflow(), device="meta")
    with pytest.raises(GeometryError, match=r"x and y in \[256, 384, 512\], but got output_size_vox=\[32, 32, 32\]"):
        pipe.generate(label_map, spacing_mm=(1.5,) * 3)
    released = np.full((256, 256, 128), 200, np.uint8)  # a geometry the rules accept: only then the device
    with pytest.raises(DeviceError, match=r"expects real weights to generate, but got device='meta'"):
        pipe.generate(released, spacing_mm=(1.5, 1.5, 2.5))


def test_meta_pipeline_check_inputs_uses_official_rules(label_map):
    pipe = MaisiPipeline.from_config(presets.maisi_ct_rflow(), device="meta")
    with pytest.raises(GeometryError, match=r"x and y in \[256, 384, 512\], but got output_size_vox=\[32, 32, 32\]"):
        pipe.check_inputs(GenerationRequest(spacing_mm=(1.5,) * 3, label_map=label_map))


def test_fp16_refused_on_cpu():
    with pytest.raises(DeviceError, match=r"expects fp16 only on CUDA, but got precision='fp16' on device=cpu"):
        MaisiPipeline.from_config(presets.tiny(), device="cpu", precision="fp16")


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DeviceError, match=r"but got device='cuda' with no CUDA"):
        MaisiPipeline.from_config(presets.tiny(), device="cuda")


def test_bf16_autocast_on_cpu_runs(label_map):
    pipe = MaisiPipeline.from_config(presets.tiny(), device="cpu", precision="bf16")
    out = pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    assert np.isfinite(out.image).all()


def test_eight_bit_label_encoding():
    t = torch.tensor([0, 1, 200, 255]).reshape(1, 1, 4, 1, 1)
    bits = encode_labels_8bit(t)[0, :, :, 0, 0].T
    assert bits[2].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # 200 = bits 3, 6, 7
    assert bits[3].tolist() == [1] * 8 and bits[0].tolist() == [0] * 8


def test_sliding_window_decode_approximates_direct_decode(tiny_pipe):
    from maisi_core.engine.decoding import decode_latents

    z = torch.randn(1, 4, 16, 16, 24, generator=torch.Generator().manual_seed(0))
    fn = tiny_pipe.vae.decode_stage_2_outputs
    with torch.no_grad():
        direct = decode_latents(fn, z, roi_latent=None, overlap=0.5)
        windowed = decode_latents(fn, z, roi_latent=(12, 12, 12), overlap=0.5)
    assert direct.shape == windowed.shape == (1, 1, 64, 64, 96)
    # away from window seams the gaussian-blended decode equals the direct one up to edge effects
    corr = np.corrcoef(direct.flatten().numpy(), windowed.flatten().numpy())[0, 1]
    assert corr > 0.95


def test_pipeline_uses_decode_window_from_preset(label_map):
    windowed = MaisiPipeline.from_config(presets.tiny().replace(decode_roi_latent=(8, 8, 8)), device="cpu")
    lm = np.tile(label_map, (1, 1, 2))
    calls = []
    original = windowed.vae.decode_stage_2_outputs
    windowed.vae.decode_stage_2_outputs = lambda z: calls.append(tuple(z.shape)) or original(z)
    out = windowed.generate(lm, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2)
    assert out.image.shape == (32, 32, 64)
    assert calls and all(shape[2:] == (8, 8, 8) for shape in calls) and len(calls) >= 2


def _tiny_ddpm():
    t = presets.tiny()
    return t.replace(
        name="tiny_ddpm", conditioning="body_region", scheduler=DDPMSchedulerConfig(),
        unet=t.unet.replace(num_class_embeds=None, include_top_region_index_input=True,
                            include_bottom_region_index_input=True),
        controlnet=t.controlnet.replace(num_class_embeds=None),
    )


def test_ddpm_body_region_model_paths_are_deterministic(label_map):
    pipe = MaisiPipeline.from_config(_tiny_ddpm(), device="cpu")
    a = pipe.generate(None, spacing_mm=(1.5,) * 3, output_size_vox=(32, 32, 32), body_region="chest", seed=0,
                      num_inference_steps=3)
    b = pipe.generate(None, spacing_mm=(1.5,) * 3, output_size_vox=(32, 32, 32), body_region="chest", seed=0,
                      num_inference_steps=3)
    assert np.array_equal(a.image, b.image)
    c = pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=3)  # regions from the mask
    assert c.image.shape == (32, 32, 32)
    with pytest.raises(ConfigError, match=r"expects a body_region .* but got body_region=None"):
        pipe.generate(None, spacing_mm=(1.5,) * 3, output_size_vox=(32, 32, 32), seed=0, num_inference_steps=2)
    with pytest.raises(ConfigError, match=r"expects no modality for a body-region model, but got modality=1"):
        pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=0, num_inference_steps=2, modality=1)


def _count_embeddings(pipe):
    calls = []
    handle = pipe.controlnet.controlnet_cond_embedding.conv_in.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_conditioning_is_embedded_once_per_generate_and_output_unchanged(tiny_pipe, label_map):
    """The mask's embedding is computed once per generate and passed to every step (3 steps, 1 embedding)."""
    calls, handle = _count_embeddings(tiny_pipe)
    try:
        tiny_pipe.generate(label_map, spacing_mm=(8.0, 8.0, 8.0), seed=4, num_inference_steps=3)
        assert len(calls) == 1
        calls.clear()
        tiny_pipe.generate(label_map, spacing_mm=(8.0, 8.0, 8.0), seed=4, num_inference_steps=3, guidance_scale=1.5)
        assert len(calls) == 1  # no tumour: the unconditional branch reuses the same embedding
    finally:
        handle.remove()


def test_controlnet_residuals_equal_monai_forward_bit_for_bit(tiny_pipe):
    """The explicit-embedding path runs MONAI's ControlNet steps unchanged: identical residuals."""
    from maisi_core.engine.networks import controlnet_residuals, embed_control

    _randomize(tiny_pipe.controlnet, 3)
    gen = torch.Generator().manual_seed(0)
    x, control = torch.randn(1, 4, 8, 8, 8, generator=gen), torch.rand(1, 8, 32, 32, 32, generator=gen)
    t, labels_ = torch.tensor([500.0]), torch.tensor([1])
    with torch.no_grad():
        down, mid = tiny_pipe.controlnet(x=x, timesteps=t, controlnet_cond=control, class_labels=labels_)
        down2, mid2 = controlnet_residuals(tiny_pipe.controlnet, x, t, class_labels=labels_,
                                           control_embedding=embed_control(tiny_pipe.controlnet, control))
    assert len(down) == len(down2) and all(torch.equal(a, b) for a, b in zip(down, down2, strict=True))
    assert torch.equal(mid, mid2)


def test_the_pipeline_leaves_its_networks_as_given():
    """Issue 13: building a pipeline swapped the ControlNet's embedding class and set the VAE's split count."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    from maisi_core.engine.decoding import get_decode_preset

    first = MaisiPipeline.from_config(presets.tiny(), device="cpu")
    cls = type(first.controlnet.controlnet_cond_embedding)
    splits = {m.num_splits for m in first.vae.modules() if isinstance(m, MaisiConvolution)}
    second = MaisiPipeline(first.config, first.vae, first.unet, first.controlnet, device=first.device,
                           decode_preset=get_decode_preset("24g"))
    assert type(second.controlnet.controlnet_cond_embedding) is cls and cls.__module__.startswith("monai.")
    seen = []
    handle = second.vae.decoder.register_forward_pre_hook(lambda *a: seen.append(
        {m.num_splits for m in second.vae.modules() if isinstance(m, MaisiConvolution)}))
    try:
        second.decode(torch.zeros(1, 4, 8, 8, 8))
    finally:
        handle.remove()
    assert seen == [{get_decode_preset("24g").num_splits}]  # the preset applies inside decode ...
    assert {m.num_splits for m in first.vae.modules() if isinstance(m, MaisiConvolution)} == splits  # ... only


def test_controlnet_still_pickles_after_generation(tiny_pipe, label_map):
    import pickle

    tiny_pipe.generate(label_map, spacing_mm=(8.0, 8.0, 8.0), seed=1, num_inference_steps=1)
    copy = pickle.loads(pickle.dumps(tiny_pipe.controlnet))
    assert type(copy.controlnet_cond_embedding) is type(tiny_pipe.controlnet.controlnet_cond_embedding)


def test_an_affine_contradicting_spacing_is_refused(tiny_pipe, label_map):
    """Issue 13: pipeline.generate accepted an affine whose voxel sizes contradicted spacing_mm, and wrote it."""
    import numpy as np

    from maisi_core.errors import GeometryError
    from maisi_core.engine.geometry import affine_from_spacing

    spacing = (8.0, 8.0, 8.0)
    wrong = affine_from_spacing((1.5, 1.5, 1.5), label_map.shape)
    with pytest.raises(GeometryError, match=r"expects an affine whose voxel sizes equal spacing_mm=\[8.0, 8.0, 8.0\], "
                                            r"but got affine voxel sizes=\[1.5, 1.5, 1.5\]"):
        tiny_pipe.generate(label_map, spacing_mm=spacing, seed=0, num_inference_steps=1, affine=wrong)
    flipped = affine_from_spacing(spacing, label_map.shape) @ np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: same sizes
    out = tiny_pipe.generate(label_map, spacing_mm=spacing, seed=0, num_inference_steps=1, affine=flipped)
    assert np.allclose(out.affine, flipped)
