"""benchmarks/race_reference.py: the export of our random weights to upstream's checkpoint layout and configs.

The race is only fair if both sides run the same weights. These tests read the exported ``.pt`` files back
through ctfactory's own converter (``maisi_core.engine.weights``) and, when NV-Generate-CTMR has been fetched
into ``benchmarks/.reference`` (``scripts/fetch_reference.sh``), through upstream's own loader, and compare
every tensor. Tiny preset: seconds on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from maisi_core import MaisiPipeline, presets
from maisi_core.engine.decoding import get_decode_preset
from maisi_core.engine.weights import convert_maisi_checkpoints, load_model_dir, load_torch_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _load_race():
    spec = importlib.util.spec_from_file_location("race_reference", ROOT / "benchmarks" / "race_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


race = _load_race()
REFERENCE = race.DEFAULT_REFERENCE_DIR
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "scripts" / "utils_infer.py").is_file(),
    reason="NV-Generate-CTMR not fetched (bash scripts/fetch_reference.sh)",
)


@pytest.fixture(scope="module")
def tiny():
    return MaisiPipeline.from_config(presets.tiny(), device="cpu", init_seed=0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return race.save_upstream_checkpoints(tiny, tmp_path_factory.mktemp("upstream"))


def _assert_same_state(module: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = module.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k].cpu(), want[k].cpu())]
    assert different == []


def test_save_upstream_checkpoints_layout(tiny, exported):
    unet = load_torch_checkpoint(exported["unet"])
    cnet = load_torch_checkpoint(exported["controlnet"])
    vae = load_torch_checkpoint(exported["vae"])
    assert sorted(unet) == ["scale_factor", "unet_state_dict"]
    assert isinstance(unet["scale_factor"], torch.Tensor) and unet["scale_factor"].item() == tiny.scale_factor
    assert sorted(cnet) == ["controlnet_state_dict"]
    # every ControlNet key: upstream fills from the UNet first, so a missing key would silently take UNet weights
    assert sorted(cnet["controlnet_state_dict"]) == sorted(tiny.controlnet.state_dict())
    assert sorted(vae) == sorted(tiny.vae.state_dict())
    assert [p.name for p in exported.values()] == list(race.UPSTREAM_FILES.values())


def test_save_upstream_checkpoints_round_trip_through_converter(tiny, exported, tmp_path):
    convert_maisi_checkpoints(config=presets.tiny(), autoencoder=exported["vae"], diffusion_unet=exported["unet"],
                              controlnet=exported["controlnet"], dest=tmp_path / "converted")
    loaded = load_model_dir(tmp_path / "converted")
    for comp in ("vae", "unet", "controlnet"):
        _assert_same_state(getattr(loaded, comp), getattr(tiny, comp))
    assert loaded.scale_factor == tiny.scale_factor


def test_upstream_network_config_keeps_our_kwargs_and_sets_splits():
    cfg = presets.maisi_ct_rflow()
    net = race.upstream_network_config(cfg, num_splits=get_decode_preset("24g").num_splits, device_type="cuda")
    assert net["autoencoder_def"]["num_splits"] == 2
    assert net["autoencoder_def"]["norm_float16"] is True and net["diffusion_unet_def"]["use_flash_attention"] is True
    cpu = json.loads(json.dumps(race.upstream_network_config(cfg, num_splits=4, device_type="cpu")))  # as written
    assert cpu["autoencoder_def"]["norm_float16"] is False and cpu["diffusion_unet_def"]["use_flash_attention"] is False
    assert cpu["controlnet_def"] == {"_target_": race.TARGETS["controlnet_def"],
                                     **json.loads(json.dumps(cfg.controlnet.to_kwargs()))}


def test_upstream_network_config_rejects_ddpm():
    with pytest.raises(race.RaceError, match=r"upstream_network_config expects a rectified-flow preset, but got "
                                             r"scheduler='ddpm'\."):
        race.upstream_network_config(presets.maisi_ct_ddpm(), num_splits=4, device_type="cuda")


@pytest.mark.parametrize(("speedup", "ratio", "size", "verdict"), [
    (1.5, 1.0, (512, 512, 512), "PASS"),
    (1.49, 0.9, (512, 512, 512), "MISS: speed-up 1.49x < 1.5x"),
    (2.0, 1.01, (512, 512, 512), "MISS: peak memory 1.010x the reference's"),
    (2.0, 0.5, (256, 256, 256), "n/a: the goal is defined at 512x512x512 with fp16 (upstream's precision)"),
    (None, None, (512, 512, 512), "n/a: not measured (needs both sides end to end on CUDA)"),
])
def test_goal_verdict(speedup, ratio, size, verdict):
    assert race.goal_verdict(speedup, ratio, size=size, precision="fp16", device="cuda") == verdict


def test_parse_size_rejects_two_axes():
    with pytest.raises(race.RaceError,
                       match=r"race_reference expects a size like 512x512x512, but got size='512x512'\."):
        race.parse_size("512x512")


@needs_reference
def test_upstream_network_config_matches_upstream_file():
    """Our maisi_ct_rflow preset, written as an upstream config, has every value of CTMR's config_network_rflow.json."""
    raw = json.loads((REFERENCE / "configs" / "config_network_rflow.json").read_text())

    def resolve(v):
        if isinstance(v, str) and v.startswith("@"):
            return resolve(raw[v[1:]])
        return {k: resolve(x) for k, x in v.items()} if isinstance(v, dict) else v

    ours = json.loads(json.dumps(race.upstream_network_config(presets.maisi_ct_rflow(), num_splits=4,
                                                              device_type="cuda")))  # as written to disk
    for block in ("autoencoder_def", "diffusion_unet_def", "controlnet_def", "noise_scheduler"):
        theirs = resolve(raw[block])
        assert {k: ours[block].get(k, "<absent>") for k in theirs} == theirs, block


@needs_reference
def test_upstream_loader_reads_export_as_our_weights(tiny, exported, tmp_path):
    """Upstream's load_config + load_image_models (VAE strict; UNet and ControlNet strict=False) give our tensors."""
    cfg = tmp_path / "net.json"
    cfg.write_text(json.dumps(race.upstream_network_config(presets.tiny(), num_splits=1, device_type="cpu")))
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"output_dir": str(tmp_path), "trained_autoencoder_path": str(exported["vae"]),
                               "trained_diffusion_path": str(exported["unet"]),
                               "trained_controlnet_path": str(exported["controlnet"])}))
    infer = tmp_path / "infer.json"
    infer.write_text(json.dumps(race.upstream_inference_config(size=(32, 32, 32), spacing=(1.0, 1.0, 1.0), steps=2,
                                                               preset=get_decode_preset("80g"))))
    saved_path, saved_modules = list(sys.path), dict(sys.modules)
    try:
        vae, unet, cnet, scale = race.load_with_upstream_loader(REFERENCE, str(cfg), str(env), str(infer))
    finally:  # upstream's top-level package is called `scripts`: leave no trace of it in this process
        sys.path[:] = saved_path
        for name in set(sys.modules) - set(saved_modules):
            if name == "scripts" or name.startswith("scripts."):
                del sys.modules[name]
    _assert_same_state(vae, tiny.vae)
    _assert_same_state(unet, tiny.unet)
    _assert_same_state(cnet, tiny.controlnet)
    assert scale == tiny.scale_factor
