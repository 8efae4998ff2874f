"""maisi_core: the MAISI CT generation engine (VAE, latent diffusion UNet, ControlNet) as a plain library.

No Prefect, no CLI, no environment variables: everything is passed explicitly.

The package imports lazily: ``import maisi_core`` (or a light submodule such as ``maisi_core.errors`` or
``maisi_core.anatomy.labels``) does not import torch or MONAI; ``maisi_core.MaisiPipeline`` and the other
network-backed names load them on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GenerationOutput", "GenerationRequest", "MaisiPipeline", "presets"]

_LAZY = {"GenerationOutput": "maisi_core.engine.pipeline", "GenerationRequest": "maisi_core.engine.pipeline",
         "MaisiPipeline": "maisi_core.engine.pipeline", "presets": "maisi_core.engine.presets"}

if TYPE_CHECKING:  # pragma: no cover
    from maisi_core import presets
    from maisi_core.engine.pipeline import GenerationOutput, GenerationRequest, MaisiPipeline


def __getattr__(name: str) -> Any:
    """Import the heavy names on first use (PEP 562)."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'maisi_core' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name)
    value = module if module_name.endswith(name) else getattr(module, name)
    globals()[name] = value
    return value
