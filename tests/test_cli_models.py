from __future__ import annotations

import torch

from flows.cli import main


def test_models_list_shows_presets(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "maisi_ct_rflow" in out and "tiny" in out


def test_models_convert_then_info(tmp_path, tiny_pipe, capsys):
    vae, unet, cnet = tmp_path / "vae.pt", tmp_path / "unet.pt", tmp_path / "cnet.pt"
    torch.save(tiny_pipe.vae.state_dict(), vae)
    torch.save({"unet_state_dict": tiny_pipe.unet.state_dict(), "scale_factor": torch.tensor(1.0)}, unet)
    torch.save({"controlnet_state_dict": tiny_pipe.controlnet.state_dict()}, cnet)
    rc = main(["models", "convert", "--preset", "tiny", "--autoencoder", str(vae), "--diffusion-unet", str(unet),
               "--controlnet", str(cnet), "--dest", str(tmp_path / "m")])
    assert rc == 0 and "digest" in capsys.readouterr().out
    assert main(["models", "info", str(tmp_path / "m")]) == 0
    assert '"label_dict_version"' in capsys.readouterr().out


def test_models_info_on_missing_dir_is_exit_2(tmp_path, capsys):
    assert main(["models", "info", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctfactory models: load_model_dir expects a model directory with model_index.json")
    assert err.count("\n") == 1


def test_models_convert_refuses_pickled_objects(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    torch.save({"x": Evil()}, bad)
    rc = main(["models", "convert", "--preset", "tiny", "--autoencoder", str(bad), "--diffusion-unet", str(bad),
               "--controlnet", str(bad), "--dest", str(tmp_path / "m")])
    assert rc == 2
    assert "expects a weights-only checkpoint" in capsys.readouterr().err
