"""Model references of a spec resolved to pipelines: one place, one cache per process (or Dask worker).

A reference is ``preset:NAME`` (a preset with seeded random weights, ``init_seed=0``: for tests and
CPU demos, not CT-like), ``default`` (the embedded model shipped in the package) or a model directory.
:func:`load_pipeline` builds each (reference, device, decode preset, precision) once per process, so a worker
that runs many cases loads the weights once. :func:`geometry_rules` reads only the config (no weights)
for planning.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from factory.errors import ModelRefError

if TYPE_CHECKING:
    from maisi_core.engine.config import GeometryRules, PipelineConfig
    from maisi_core.engine.pipeline import MaisiPipeline

logger = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
PRESET_INIT_SEED = 0  # the seeded random weights of ``preset:NAME``

_cache: dict[tuple[str, str, str | None, str], MaisiPipeline] = {}
_lock = threading.Lock()
_loads = threading.local()  # seconds of the load this thread did last, until taken (take_load_seconds)


def preset_name(ref: str) -> str | None:
    """Return NAME for ``preset:NAME`` references, else None."""
    return ref[len(PRESET_PREFIX):] if ref.startswith(PRESET_PREFIX) else None


def _model_dir_available(ref: str) -> bool:
    from maisi_core.engine.model_dir import INDEX_NAME, resolve_model_path

    return (resolve_model_path(ref) / INDEX_NAME).is_file()


def pipeline_config(ref: str, *, preset: str | None = None) -> PipelineConfig:
    """Return the pipeline config of a model reference without loading weights.

    Args:
        ref: ``preset:NAME``, ``default`` or a model directory.
        preset: preset to plan with when the directory is not on this machine.

    Raises:
        ModelRefError: unknown preset; directory absent and no ``preset`` given.
    """
    from maisi_core.errors import ConfigError
    from maisi_core.engine.presets import get_preset
    from maisi_core.engine.model_dir import read_model_config

    name = preset_name(ref)
    try:
        if name is not None:
            return _require_ct(get_preset(name), ref)
        if _model_dir_available(ref):
            return _require_ct(read_model_config(ref), ref)
        if preset is not None:
            return _require_ct(get_preset(preset), ref)
    except ConfigError as exc:
        raise ModelRefError(str(exc)) from None
    raise ModelRefError(
        f"load_pipeline expects 'preset:NAME', 'default' or a model directory with "
        f"model_index.json, but got model={ref!r}, which is not on this machine. Give model.preset "
        f"(e.g. maisi_ct_rflow) to plan without the weights, or use 'preset:tiny' for a CPU demo."
    )


def _require_ct(config: PipelineConfig, ref: str) -> PipelineConfig:
    """The factory publishes CT (int16 HU files, HU quality checks): refuse a model of another modality."""
    from maisi_core.modality import convention_for_code

    convention = convention_for_code(config.modality)
    if convention.name != "CT":
        raise ModelRefError(
            f"load_pipeline expects a CT model (modality code 0-7), but got model={ref!r} with modality="
            f"{config.modality} ({convention.name}). The factory writes and checks CT in HU; an "
            f"{convention.name} model can run through maisi_core.MaisiPipeline directly."
        )
    return config


def geometry_rules(ref: str, *, preset: str | None = None) -> GeometryRules:
    """Return the output-size and spacing rules of the model (see :mod:`maisi_core.engine.geometry`)."""
    return pipeline_config(ref, preset=preset).geometry


def load_pipeline(ref: str, device: str = "auto", *, decode_preset: str | None = None,
                  precision: str = "auto") -> MaisiPipeline:
    """Return the pipeline for ``ref`` on ``device``, built once per process and cached.

    ``precision`` ``"auto"`` runs fp16 autocast on CUDA (as upstream) and fp32 on a CPU; ``bf16`` and
    ``fp32`` are honoured as asked. The pipeline's ``precision`` attribute holds the one in use.

    Raises:
        ModelRefError: unknown preset or missing model directory.
    """
    from torch import device as torch_device

    from maisi_core.errors import ConfigError, DeviceError, WeightsNotFoundError
    from maisi_core.engine.pipeline import MaisiPipeline, resolve_device, resolve_precision
    from maisi_core.engine.presets import get_preset
    from maisi_core.engine.weights import state_digest

    dev = str(resolve_device(device))
    try:
        prec = resolve_precision(precision, torch_device(dev))
    except ConfigError as exc:
        raise ModelRefError(f"load_pipeline could not load model={ref!r}: {exc}") from None
    key = (ref, dev, decode_preset, prec)
    with _lock:
        if key in _cache:
            return _cache[key]
        t0 = time.perf_counter()
        name = preset_name(ref)
        try:
            if name is not None:
                pipe = MaisiPipeline.from_config(get_preset(name), device=dev, init_seed=PRESET_INIT_SEED,
                                                 decode_preset=decode_preset, precision=prec)
                pipe.model_digest = state_digest({"vae": pipe.vae, "unet": pipe.unet, "controlnet": pipe.controlnet})
            else:
                pipe = MaisiPipeline.from_pretrained(ref, device=dev, decode_preset=decode_preset, precision=prec)
        except (ConfigError, DeviceError, WeightsNotFoundError) as exc:
            raise ModelRefError(f"load_pipeline could not load model={ref!r}: {exc}") from None
        _require_ct(pipe.config, ref)
        _loads.seconds = time.perf_counter() - t0
        logger.info("loaded model %s on %s (%s) in %.1f s", ref, dev, prec, _loads.seconds)
        _cache[key] = pipe
        return pipe


def take_load_seconds() -> float | None:
    """Seconds this thread spent loading a model since the last call (None: it loaded none; the cache served it)."""
    seconds = getattr(_loads, "seconds", None)
    _loads.seconds = None
    return seconds


def clear_cache() -> None:
    """Forget every cached pipeline (tests)."""
    with _lock:
        _cache.clear()


MODEL_CARD_NAMES = ("MODEL_CARD.md", "README.md")  # looked for, in this order, in a model directory
MODEL_CARD_MAX_BYTES = 256 * 1024


def model_card_markdown(ref: str) -> str:
    """The model card of a model reference, as Markdown, for the dataset row (column ``model_card``).

    A model directory's ``MODEL_CARD.md`` (or ``README.md``); for ``preset:NAME`` (seeded random weights)
    a short card saying so. ``""`` when a directory has no card: the dataset card then says none was found.
    """
    name = preset_name(ref)
    if name is not None:
        return (f"# preset:{name} with seeded random weights\n\n## Intended use\n\nTesting the factory, its flows, "
                "QC and catalog end to end without trained weights.\n\n## Limitations\n\nThe weights are random "
                "(init_seed=0): the images are not CT-like and must not be used as data.\n")
    from maisi_core.engine.model_dir import resolve_model_path

    folder = resolve_model_path(ref)
    for card in MODEL_CARD_NAMES:
        path = folder / card
        if path.is_file():
            text = path.read_bytes()[:MODEL_CARD_MAX_BYTES]
            return text.decode("utf-8", errors="replace")
    return ""


def model_name(ref: str) -> str:
    """A short model name for the catalog: the preset name or the directory name."""
    name = preset_name(ref)
    return name if name is not None else Path(ref).name or ref
