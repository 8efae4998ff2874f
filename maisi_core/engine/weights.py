"""Model directories (one folder per network + an index) and conversion of official MAISI checkpoints.

Layout of a model directory::

    model_index.json          name, format version, pipeline config, scale factor, modality,
                              label dictionary version, licence, sha256 of every file
    vae/config.json           AutoencoderConfig fields
    vae/model.safetensors
    unet/config.json          DiffusionUNetConfig fields
    unet/model.safetensors
    controlnet/config.json    ControlNetConfig fields
    controlnet/model.safetensors

Weights are only ever read from safetensors, or from the official ``.pt`` files with
``torch.load(weights_only=True)``; a pickle that needs anything more is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file

from maisi_core.anatomy import labels
from maisi_core.digest import sha256_file
from maisi_core.engine.config import PipelineConfig
from maisi_core.errors import UnsafeCheckpointError, WeightsError, WeightsNotFoundError
from maisi_core.modality import convention_for_code
from maisi_core.engine.model_dir import (  # the torch-free half of model directories
    COMPONENTS,
    FORMAT_VERSION,
    INDEX_NAME,
    WEIGHTS_NAME,
    _config_from,
    _digest_of,
    model_file,
    resolve_model_path,
    verify_model_dir,
)
from maisi_core.engine.networks import build_controlnet, build_unet, build_vae

logger = logging.getLogger(__name__)

_BUILDERS = {"vae": build_vae, "unet": build_unet, "controlnet": build_controlnet}


@dataclass(frozen=True)
class LoadedModel:
    """Networks, config and provenance read from a model directory."""

    config: PipelineConfig
    vae: torch.nn.Module
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    scale_factor: float
    digest: str
    index: dict[str, Any]


def state_digest(modules: dict[str, torch.nn.Module]) -> str:
    """Return the sha256 of the networks' weights (names, dtypes, shapes and bytes, in a fixed order).

    Identifies a model that has no model directory (e.g. a preset with seeded random weights).
    """
    h = hashlib.sha256()
    for comp in sorted(modules):
        for key, tensor in sorted(modules[comp].state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{comp}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model_dir(
    path: str | Path,
    config: PipelineConfig,
    modules: dict[str, torch.nn.Module],
    *,
    scale_factor: float,
    name: str,
    extra_index: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write a model directory atomically (temp dir + rename) and return the model digest."""
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise WeightsError(
            f"save_model_dir expects an empty or new directory, but got path={str(dest)!r} with files in it. "
            "Pass overwrite=True or choose another path."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        files: dict[str, str] = {}
        for comp in COMPONENTS:
            cfg = getattr(config, comp)
            (tmp / comp).mkdir()
            (tmp / comp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in modules[comp].state_dict().items()}
            save_file(state, str(tmp / comp / WEIGHTS_NAME), metadata={"component": comp, "format": "pt"})
            for fname in ("config.json", WEIGHTS_NAME):
                files[f"{comp}/{fname}"] = sha256_file(tmp / comp / fname)
        index = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "pipeline_config": {k: v for k, v in config.to_dict().items() if k not in COMPONENTS},
            "scale_factor": float(scale_factor),
            "modality": convention_for_code(config.modality).name,
            "label_dict_version": labels.LABEL_DICT_VERSION,
            "licence": config.licence,
            "files": files,
            "digest": _digest_of(files),
            **(extra_index or {}),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index["digest"]


def load_model_dir(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Load and verify a model directory; build the networks and load their weights strictly."""
    root = resolve_model_path(path)
    index = verify_model_dir(root)
    config = _config_from(root, index)
    modules: dict[str, torch.nn.Module] = {}
    for comp in COMPONENTS:
        module = _BUILDERS[comp](getattr(config, comp), "cpu")
        state = _load_safetensors(model_file(root, f"{comp}/{WEIGHTS_NAME}"), who=f"load_model_dir[{comp}]")
        load_state_strict(module, state, who=f"load_model_dir[{comp}]")
        modules[comp] = module.to(device).eval()
    return LoadedModel(config=config, scale_factor=config.scale_factor, digest=index["digest"],
                       index=index, **modules)


def _load_safetensors(file: Path, *, who: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a malformed one (bad header, random bytes, truncated) is a WeightsError."""
    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError (not exported) and OSError
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{who} expects a safetensors weights file, but got {file.name} that cannot be read "
                           f"({reason}). Restore the file or re-save the model.") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], *, who: str) -> None:
    """Load a state dict, raising a WeightsError naming missing/unexpected keys or mismatched shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape_bad:
        detail = []
        if missing:
            detail.append(f"missing={missing[:3]}{'…' if len(missing) > 3 else ''} ({len(missing)})")
        if unexpected:
            detail.append(f"unexpected={unexpected[:3]}{'…' if len(unexpected) > 3 else ''} ({len(unexpected)})")
        if shape_bad:
            k = shape_bad[0]
            detail.append(f"shape {k}: {tuple(state[k].shape)} vs architecture {tuple(own[k].shape)} ({len(shape_bad)})")
        raise WeightsError(
            f"{who} expects weights of the configured architecture, but got a state dict with "
            + "; ".join(detail) + ". Check the preset/config matches the checkpoint."
        )
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Official MAISI checkpoints (.pt) → model directory.


def load_torch_checkpoint(source: str | Path | BinaryIO, *, who: str = "load_torch_checkpoint",
                          what: str | None = None) -> Any:
    """Load a ``.pt`` checkpoint (a path or a binary buffer) with ``weights_only=True``, the only way
    ctfactory reads torch pickles; refuse anything that needs full unpickling.

    Raises:
        WeightsNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle needs arbitrary objects (it is never unpickled).
        WeightsError: the file is not a readable torch checkpoint.
    """
    if isinstance(source, (str, Path)):
        file = Path(source)
        if not file.is_file():
            raise WeightsNotFoundError(f"{who} expects an existing checkpoint file, but got path={str(source)!r}.")
        what = what or f"path={file.name!r}"
    what = what or "a checkpoint buffer"
    _check_checkpoint_magic(source, who=who, what=what)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:160]
        if "weights only load failed" not in str(exc).lower():
            raise WeightsError(f"{who} expects a readable torch checkpoint, but got {what} with a corrupt pickle "
                               f"({reason}). Restore the file or download it again.") from None
        raise UnsafeCheckpointError(
            f"{who} expects a weights-only checkpoint (tensors, dicts, numbers; torch.load weights_only=True), "
            f"but got {what} that needs arbitrary pickled objects ({reason}); it was not loaded. "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as safetensors."
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, IndexError, ... for damaged files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{who} expects a readable torch checkpoint, but got {what} that cannot be read "
                           f"({reason}). Restore the file or download it again.") from None


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def _check_checkpoint_magic(source: str | Path | BinaryIO, *, who: str, what: str) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a legacy pickle; refuse anything else early."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            head = fh.read(4)
    else:
        pos = source.tell()
        head = source.read(4)
        source.seek(pos)
    if head[:4] == _ZIP_MAGIC or (head[:1] and head[0] == _PICKLE_PROTOCOL):
        return
    shown = "an empty file" if not head else f"first bytes {head.hex()}"
    raise WeightsError(f"{who} expects a torch checkpoint (a zip archive or a pickle), but got {what} with "
                       f"{shown}. Check the file is the checkpoint you meant; restore or download it again.")


def _state_dict_from(ckpt: Any, keys: tuple[str, ...], *, who: str) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, dict):
        for key in keys:
            if key in ckpt and isinstance(ckpt[key], dict):
                return ckpt[key]
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise WeightsError(
        f"{who} expects a state dict or a dict with one of {list(keys)}, but got "
        f"keys={sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__}."
    )


def convert_maisi_checkpoints(
    *,
    config: PipelineConfig,
    autoencoder: str | Path,
    diffusion_unet: str | Path,
    controlnet: str | Path,
    dest: str | Path,
    name: str | None = None,
    overwrite: bool = False,
) -> str:
    """Convert the official MAISI ``.pt`` files into a model directory; return the model digest.

    The autoencoder file is a raw state dict (or ``{"unet_state_dict": ...}``); the diffusion file holds
    ``unet_state_dict`` and ``scale_factor``; the ControlNet file holds ``controlnet_state_dict``. As
    upstream does, the ControlNet is first filled from the diffusion UNet's weights and then overlaid
    with its own (its own file need not repeat the shared encoder weights).
    """
    from monai.networks.utils import copy_model_state

    vae = build_vae(config.vae, "cpu")
    unet = build_unet(config.unet, "cpu")
    cnet = build_controlnet(config.controlnet, "cpu")

    vae_state = _state_dict_from(load_torch_checkpoint(autoencoder), ("unet_state_dict", "state_dict"),
                                 who="convert_maisi_checkpoints[autoencoder]")
    load_state_strict(vae, vae_state, who="convert_maisi_checkpoints[autoencoder]")

    unet_ckpt = load_torch_checkpoint(diffusion_unet)
    unet_state = _state_dict_from(unet_ckpt, ("unet_state_dict",), who="convert_maisi_checkpoints[diffusion_unet]")
    load_state_strict(unet, unet_state, who="convert_maisi_checkpoints[diffusion_unet]")
    scale = unet_ckpt.get("scale_factor", config.scale_factor) if isinstance(unet_ckpt, dict) else config.scale_factor
    scale_factor = float(scale.item() if isinstance(scale, torch.Tensor) else scale)

    copy_model_state(cnet, unet.state_dict())
    c_state = _state_dict_from(load_torch_checkpoint(controlnet), ("controlnet_state_dict",),
                               who="convert_maisi_checkpoints[controlnet]")
    own = cnet.state_dict()
    unexpected = sorted(set(c_state) - set(own))
    shape_bad = sorted(k for k in set(c_state) & set(own) if tuple(c_state[k].shape) != tuple(own[k].shape))
    if unexpected or shape_bad:
        raise WeightsError(
            "convert_maisi_checkpoints[controlnet] expects weights of the configured ControlNet, but got "
            f"unexpected={unexpected[:3]} shape_mismatch={shape_bad[:3]}. Check the preset matches the checkpoint."
        )
    cnet.load_state_dict(c_state, strict=False)

    return save_model_dir(
        dest, config.replace(scale_factor=scale_factor), {"vae": vae, "unet": unet, "controlnet": cnet},
        scale_factor=scale_factor, name=name or config.name, overwrite=overwrite,
        extra_index={"converted_from": {
            "autoencoder": sha256_file(autoencoder),
            "diffusion_unet": sha256_file(diffusion_unet),
            "controlnet": sha256_file(controlnet),
        }},
    )
