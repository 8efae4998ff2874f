from __future__ import annotations

import pytest

from maisi_core import MaisiPipeline, presets
from maisi_core.engine.config import AutoencoderConfig, PipelineConfig, scheduler_config_from_dict
from maisi_core.errors import ConfigError
from maisi_core.engine.networks import count_parameters


@pytest.mark.parametrize(
    ("preset", "vae", "unet", "controlnet"),
    [
        (presets.maisi_ct_rflow, 20_944_897, 180_500_868, 72_037_072),
        (presets.maisi_ct_ddpm, 20_944_897, 169_370_884, 68_644_944),
    ],
)
def test_official_presets_parameter_counts_match_released_architectures(preset, vae, unet, controlnet):
    pipe = MaisiPipeline.from_config(preset(), device="meta")
    assert count_parameters(pipe.vae) == vae  # 20.9 M
    assert count_parameters(pipe.unet) == unet  # 180.5 M / 169.4 M
    assert count_parameters(pipe.controlnet) == controlnet  # 72.0 M / 68.6 M
    assert next(pipe.unet.parameters()).device.type == "meta"


def test_official_presets_read_upstream_config_values():
    rflow, ddpm = presets.maisi_ct_rflow(), presets.maisi_ct_ddpm()
    assert rflow.vae.num_splits == 4 and ddpm.vae.num_splits == 8
    assert rflow.vae.norm_float16 is True  # the released value; switched off on CPU by networks.py
    assert rflow.unet.num_class_embeds == 128 and rflow.unet.resblock_updown and rflow.unet.include_fc
    assert ddpm.unet.num_class_embeds is None and ddpm.unet.include_top_region_index_input
    assert rflow.scheduler.name == "rflow" and rflow.scheduler.default_num_inference_steps == 30
    assert rflow.scheduler.use_timestep_transform and not rflow.scheduler.use_discrete_timesteps
    assert ddpm.scheduler.name == "ddpm" and ddpm.scheduler.default_num_inference_steps == 1000
    assert ddpm.scheduler.schedule == "scaled_linear_beta" and ddpm.scheduler.beta_end == 0.0195
    assert rflow.controlnet.conditioning_embedding_num_channels == (8, 32, 64)


@pytest.mark.parametrize("preset", [presets.tiny, presets.maisi_ct_rflow, presets.maisi_ct_ddpm])
def test_pipeline_config_round_trips_through_dict(preset):
    cfg = preset()
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


def test_config_from_dict_rejects_unknown_field_with_suggestion():
    data = presets.tiny().vae.to_dict()
    data["num_chanels"] = [4, 4, 4]
    with pytest.raises(ConfigError, match=r"AutoencoderConfig expects only the fields .* but got unknown=\['num_chanels'\]\. Did you mean 'num_channels'\?"):
        AutoencoderConfig.from_dict(data)


def test_autoencoder_config_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ConfigError, match=r"divisible by norm_num_groups=4, but got num_channels=\(4, 6, 4\)"):
        AutoencoderConfig(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=(1, 1, 1),
                          num_channels=(4, 6, 4), attention_levels=(False,) * 3, norm_num_groups=4)


def test_pipeline_config_rejects_mismatched_latent_channels():
    t = presets.tiny()
    with pytest.raises(ConfigError, match=r"latent_channels=4, but got unet.in_channels=3"):
        t.replace(unet=t.unet.replace(in_channels=3, out_channels=3))


def test_scheduler_config_by_unknown_name_suggests():
    with pytest.raises(ConfigError, match=r"name in \['ddpm', 'rflow'\], but got name='rflw'\. Did you mean 'rflow'\?"):
        scheduler_config_from_dict({"name": "rflw"})


def test_get_preset_unknown_name():
    with pytest.raises(ConfigError, match=r"but got name='tiniy'\. Did you mean 'tiny'\?"):
        presets.get_preset("tiniy")


def test_tiny_preset_latent_is_8_cubed(tiny_pipe):
    from maisi_core.engine.geometry import latent_shape

    assert latent_shape(tiny_pipe.config, (32, 32, 32)) == (4, 8, 8, 8)
