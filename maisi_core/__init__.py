"""maisi_core: the MAISI CT generation engine (VAE, latent diffusion UNet, ControlNet) as a plain library.

No Prefect, no CLI, no environment variables: everything is passed explicitly.
"""

from __future__ import annotations

__version__ = "0.1.0"

from maisi_core import presets  # noqa: E402
from maisi_core.pipeline import GenerationOutput, GenerationRequest, MaisiPipeline  # noqa: E402

__all__ = ["GenerationOutput", "GenerationRequest", "MaisiPipeline", "presets"]
