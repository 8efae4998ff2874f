from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maisi_core import MaisiPipeline, presets
from maisi_core.errors import UnsafeCheckpointError, WeightsError, WeightsNotFoundError
from maisi_core.engine.model_dir import read_index
from maisi_core.engine.weights import convert_maisi_checkpoints, load_torch_checkpoint


@pytest.fixture()
def saved(tmp_path, tiny_pipe):
    path = tmp_path / "model"
    digest = tiny_pipe.save_pretrained(path)
    return path, digest


def test_save_and_load_round_trip_gives_equal_outputs(saved, tiny_pipe, label_map):
    path, digest = saved
    loaded = MaisiPipeline.from_pretrained(path, device="cpu")
    assert loaded.model_digest == digest and loaded.config == tiny_pipe.config
    a = tiny_pipe.generate(label_map, spacing_mm=(1.5,) * 3, seed=4, num_inference_steps=2)
    b = loaded.generate(label_map, spacing_mm=(1.5,) * 3, seed=4, num_inference_steps=2)
    assert np.array_equal(a.image, b.image)


def test_model_directory_layout_and_index(saved):
    path, digest = saved
    assert sorted(p.name for p in path.iterdir()) == ["controlnet", "model_index.json", "unet", "vae"]
    assert (path / "vae" / "config.json").is_file() and (path / "vae" / "model.safetensors").is_file()
    index = read_index(path)
    assert index["digest"] == digest and index["label_dict_version"].startswith("maisi-ct-132")
    assert index["pipeline_config"]["intensity_range"] == [-1000.0, 1000.0] and index["modality"] == "CT"
    assert "licence" in index
    assert set(index["files"]) == {f"{c}/{f}" for c in ("vae", "unet", "controlnet")
                                   for f in ("config.json", "model.safetensors")}


def test_altered_weights_file_is_refused(saved):
    path, _ = saved
    file = path / "unet" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"expects unet/model.safetensors to have sha256 [0-9a-f]{16}…, but got sha256="):
        MaisiPipeline.from_pretrained(path, device="cpu")


def test_missing_file_is_refused(saved):
    path, _ = saved
    (path / "controlnet" / "model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"expects the file controlnet/model.safetensors listed in model_index.json, but got a missing file"):
        MaisiPipeline.from_pretrained(path, device="cpu")


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"expects a model directory with model_index.json, but got path="):
        MaisiPipeline.from_pretrained(tmp_path / "nope", device="cpu")


def test_wrong_architecture_is_refused(saved):
    path, _ = saved
    cfg_file = path / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_channels"] = [16, 16, 16]
    cfg_file.write_text(json.dumps(cfg))
    # re-record the digest so only the architecture check can fail
    import hashlib

    index = json.loads((path / "model_index.json").read_text())
    index["files"]["unet/config.json"] = hashlib.sha256(cfg_file.read_bytes()).hexdigest()
    from maisi_core.engine.model_dir import _digest_of

    index["digest"] = _digest_of(index["files"])
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"load_model_dir\[unet\] expects weights of the configured architecture, but got a state dict with .*shape"):
        MaisiPipeline.from_pretrained(path, device="cpu")


def test_save_refuses_non_empty_directory(saved, tiny_pipe):
    path, _ = saved
    with pytest.raises(WeightsError, match=r"expects an empty or new directory, but got path="):
        tiny_pipe.save_pretrained(path)


def _write_official_style_checkpoints(tmp_path, pipe):
    vae = tmp_path / "autoencoder_v1.pt"
    unet = tmp_path / "diff_unet_3d_rflow-ct.pt"
    cnet = tmp_path / "controlnet_3d_rflow-ct.pt"
    torch.save(pipe.vae.state_dict(), vae)
    torch.save({"unet_state_dict": pipe.unet.state_dict(), "scale_factor": torch.tensor(0.75), "epoch": 3,
                "loss": 0.1, "num_train_timesteps": 1000}, unet)
    # the released ControlNet file: its own weights only (shared ones come from the UNet)
    cstate = {k: v for k, v in pipe.controlnet.state_dict().items() if "controlnet" in k}
    torch.save({"controlnet_state_dict": cstate, "epoch": 1, "loss": 0.2}, cnet)
    return vae, unet, cnet


def test_convert_official_checkpoints_to_model_directory(tmp_path, label_map):
    pipe = MaisiPipeline.from_config(presets.tiny(), device="cpu", init_seed=5)
    vae, unet, cnet = _write_official_style_checkpoints(tmp_path, pipe)
    digest = convert_maisi_checkpoints(config=presets.tiny(), autoencoder=vae, diffusion_unet=unet,
                                       controlnet=cnet, dest=tmp_path / "converted")
    loaded = MaisiPipeline.from_pretrained(tmp_path / "converted", device="cpu")
    assert loaded.model_digest == digest and loaded.scale_factor == pytest.approx(0.75)
    for name in ("vae", "unet"):
        ref, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    index = read_index(tmp_path / "converted")
    assert set(index["converted_from"]) == {"autoencoder", "diffusion_unet", "controlnet"}


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needing_more_than_weights_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"unet_state_dict": {}, "extra": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"expects a weights-only checkpoint .* but got path='evil.pt' that needs arbitrary pickled objects"):
        load_torch_checkpoint(path)


def test_checkpoint_of_wrong_architecture_is_refused(tmp_path):
    small = MaisiPipeline.from_config(presets.tiny(), device="cpu")
    vae, unet, cnet = _write_official_style_checkpoints(tmp_path, small)
    with pytest.raises(WeightsError, match=r"convert_maisi_checkpoints\[autoencoder\] expects weights of the configured architecture"):
        convert_maisi_checkpoints(config=presets.tiny().replace(
            vae=presets.tiny().vae.replace(num_channels=(8, 8, 8))),
            autoencoder=vae, diffusion_unet=unet, controlnet=cnet, dest=tmp_path / "x")


def test_garbage_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises((WeightsError, UnsafeCheckpointError), match=r"load_torch_checkpoint expects"):
        load_torch_checkpoint(path)


def test_state_digest_identifies_weights(tiny_pipe):
    from maisi_core.engine.weights import state_digest

    mods = {"vae": tiny_pipe.vae, "unet": tiny_pipe.unet, "controlnet": tiny_pipe.controlnet}
    other = MaisiPipeline.from_config(presets.tiny(), device="cpu", init_seed=1)
    assert state_digest(mods) == state_digest(dict(mods))
    assert len(state_digest(mods)) == 64
    assert state_digest(mods) != state_digest({"vae": other.vae, "unet": other.unet, "controlnet": other.controlnet})


def _edit_index(path, **changes):
    index = json.loads((path / "model_index.json").read_text())
    index.update(changes)
    (path / "model_index.json").write_text(json.dumps(index))
    return index


def test_index_path_outside_the_model_directory_is_refused_unread(saved, tmp_path):
    path, _ = saved
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    index = json.loads((path / "model_index.json").read_text())
    files = dict(index["files"], **{"../secret.txt": "0" * 64})
    _edit_index(path, files=files)
    with pytest.raises(WeightsError, match=r"^load_model_dir expects every file of model_index.json inside the model "
                                           r"directory, but got file='\.\./secret\.txt' \(it resolves outside it\)"):
        MaisiPipeline.from_pretrained(path, device="cpu")
    _edit_index(path, files=dict(index["files"], **{str(secret): "0" * 64}))
    with pytest.raises(WeightsError, match=r"expects file paths relative to the model directory, but got file='/"):
        MaisiPipeline.from_pretrained(path, device="cpu")


def test_symlinked_config_leaving_the_directory_is_refused(saved, tmp_path):
    path, _ = saved
    outside = tmp_path / "elsewhere.json"
    outside.write_text((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").unlink()
    (path / "vae" / "config.json").symlink_to(outside)
    with pytest.raises(WeightsError, match=r"expects every file of model_index.json inside the model directory, but "
                                           r"got file='vae/config.json'"):
        MaisiPipeline.from_pretrained(path, device="cpu")


def test_malformed_index_gives_one_line_errors(saved):
    path, _ = saved
    index = _edit_index(path, files=["vae/config.json"])
    with pytest.raises(WeightsError, match=r"expects 'files' in model_index.json to map paths to sha256 strings, "
                                           r"but got files of type list\."):
        MaisiPipeline.from_pretrained(path, device="cpu")
    index.pop("pipeline_config")
    (path / "model_index.json").write_text(json.dumps({**index, "files": json.loads(json.dumps(read_files(path)))}))
    with pytest.raises(WeightsError, match=r"expects model_index.json to hold 'pipeline_config', but got keys="):
        MaisiPipeline.from_pretrained(path, device="cpu")


def read_files(path):
    """The sha256 of each model file as save_pretrained records them."""
    from maisi_core.digest import sha256_file

    return {f"{c}/{f}": sha256_file(path / c / f) for c in ("vae", "unet", "controlnet")
            for f in ("config.json", "model.safetensors")}


def test_model_directory_saved_before_the_rename_loads_with_its_intensity_range(saved):
    """Indexes written before v0.x name the fields intensity_range_hu and background_hu; they still load."""
    path, _ = saved
    index = read_index(path)
    config = index["pipeline_config"]
    config["intensity_range_hu"], config["background_hu"] = [-900.0, 1100.0], -950.0
    del config["intensity_range"], config["background_value"]
    (path / "model_index.json").write_text(json.dumps(index))
    loaded = MaisiPipeline.from_pretrained(path, device="cpu")
    assert loaded.config.intensity_range == (-900.0, 1100.0) and loaded.config.background_value == -950.0


def test_factory_refuses_a_model_of_another_modality(tmp_path, tiny_pipe):
    """The factory writes int16 HU and checks HU ranges: an MR model is refused before any case."""
    from factory.errors import ModelRefError
    from factory.models import clear_cache, load_pipeline, pipeline_config

    path = tmp_path / "mr-model"
    mr = MaisiPipeline(tiny_pipe.config.replace(modality=9), tiny_pipe.vae, tiny_pipe.unet, tiny_pipe.controlnet,
                       device="cpu")
    mr.save_pretrained(path)
    assert read_index(path)["modality"] == "MR"
    message = r"load_pipeline expects a CT model \(modality code 0-7\), but got model=.* with modality=9 \(MR\)"
    with pytest.raises(ModelRefError, match=message):
        pipeline_config(str(path))
    clear_cache()
    with pytest.raises(ModelRefError, match=message):
        load_pipeline(str(path), device="cpu")
    clear_cache()
