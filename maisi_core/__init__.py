"""maisi_core: the MAISI CT generation engine (VAE, latent diffusion UNet, ControlNet) as a plain library.

No Prefect, no CLI, no environment variables: everything is passed explicitly.
"""

from __future__ import annotations

__version__ = "0.1.0"
