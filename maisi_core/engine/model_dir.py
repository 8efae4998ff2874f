"""Model directories without torch: the index, its files, their digests and the pipeline config.

What planning and checking a spec need from a model directory (``check-spec``, ``models info``) lives
here, so those commands never import torch or MONAI. Loading weights is :mod:`maisi_core.engine.weights`.
See that module for the layout of a model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from maisi_core.engine.config import PipelineConfig
from maisi_core.digest import sha256_file
from maisi_core.errors import WeightsError, WeightsNotFoundError

FORMAT_VERSION = 1
INDEX_NAME = "model_index.json"
WEIGHTS_NAME = "model.safetensors"
COMPONENTS = ("vae", "unet", "controlnet")


def _digest_of(files: dict[str, str]) -> str:
    """The model digest: sha256 over the sorted (path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def packaged_model_path(name: str) -> Path | None:
    """Return the folder of a model shipped inside the package (``default``), or None if absent."""
    root = resources.files("maisi_core").joinpath("models", name)
    path = Path(str(root))
    return path if (path / INDEX_NAME).is_file() else None


def resolve_model_path(path: str | Path) -> Path:
    """Return the directory for a model path or a packaged model name such as ``"default"``."""
    p = Path(path)
    if not p.exists() and isinstance(path, str) and os.sep not in path:
        packaged = packaged_model_path(path)
        if packaged is not None:
            return packaged
    return p


def read_index(path: str | Path) -> dict[str, Any]:
    """Read and check the index of a model directory."""
    root = resolve_model_path(path)
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise WeightsNotFoundError(
            f"load_model_dir expects a model directory with {INDEX_NAME}, but got path={str(path)!r} "
            f"without it. Write one with MaisiPipeline.save_pretrained or convert official checkpoints."
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(
            f"load_model_dir expects {INDEX_NAME} to be JSON, but got a parse error at line {exc.lineno}: {exc.msg}."
        ) from exc
    if index.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"load_model_dir expects format_version={FORMAT_VERSION}, but got "
            f"format_version={index.get('format_version')!r} in {index_path}."
        )
    return index


def model_file(root: Path, rel: Any) -> Path:
    """Return the file ``rel`` of a model directory, refusing a path (or a link) that leaves the directory.

    Raises:
        WeightsError: ``rel`` is not a relative path inside ``root`` once links are resolved.
    """
    base = Path(root).resolve()
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\x00" in rel:
        raise WeightsError(f"load_model_dir expects file paths relative to the model directory, but got file={rel!r}.")
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise WeightsError(
            f"load_model_dir expects every file of {INDEX_NAME} inside the model directory, but got file={rel!r} "
            "(it resolves outside it). Model directories never point elsewhere; re-save or re-convert the model."
        )
    return target


def verify_model_dir(path: str | Path) -> dict[str, Any]:
    """Check every file of a model directory exists and matches its recorded sha256; return the index."""
    root = resolve_model_path(path)
    index = read_index(root)
    files = index.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise WeightsError(f"load_model_dir expects 'files' in {INDEX_NAME} to map paths to sha256 strings, "
                           f"but got files of type {type(files).__name__}.")
    for rel in files:
        model_file(root, rel)
    for comp in COMPONENTS:
        for fname in ("config.json", WEIGHTS_NAME):
            rel = f"{comp}/{fname}"
            if rel not in files:
                raise WeightsError(f"load_model_dir expects {INDEX_NAME} to list {rel}, but got files={sorted(files)}.")
    for rel, expected in files.items():
        file = model_file(root, rel)
        if not file.is_file():
            raise WeightsNotFoundError(
                f"load_model_dir expects the file {rel} listed in {INDEX_NAME}, but got a missing file at {file}."
            )
        actual = sha256_file(file)
        if actual != expected:
            raise WeightsError(
                f"load_model_dir expects {rel} to have sha256 {expected[:16]}…, but got sha256={actual[:16]}…. "
                "The file was altered or corrupted; restore it or re-save the model."
            )
    if index.get("digest") != _digest_of(files):
        raise WeightsError(f"load_model_dir expects the index digest to match its files, but got digest={index.get('digest')!r}.")
    return index


def _config_from(root: Path, index: dict[str, Any]) -> PipelineConfig:
    parts = {}
    for comp in COMPONENTS:
        file = model_file(root, f"{comp}/config.json")
        if not file.is_file():
            raise WeightsNotFoundError(
                f"load_model_dir expects {comp}/config.json in the model directory, but got a missing file at {file}."
            )
        try:
            parts[comp] = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"load_model_dir expects {comp}/config.json to be JSON, but got {exc}.") from None
    for key in ("pipeline_config", "scale_factor"):
        if key not in index:
            raise WeightsError(f"load_model_dir expects {INDEX_NAME} to hold {key!r}, but got keys={sorted(index)}.")
    if not isinstance(index["pipeline_config"], dict):
        raise WeightsError(f"load_model_dir expects 'pipeline_config' in {INDEX_NAME} to be an object, but got "
                           f"{type(index['pipeline_config']).__name__}.")
    config = PipelineConfig.from_dict({**index["pipeline_config"], **parts})
    return config.replace(scale_factor=float(index["scale_factor"]))


def read_model_config(path: str | Path) -> PipelineConfig:
    """Return the pipeline config of a model directory (networks included) without loading any weights."""
    root = resolve_model_path(path)
    return _config_from(root, read_index(root))
