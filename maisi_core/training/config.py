"""What a training run is: the stages, the diffusion losses and :class:`TrainingConfig` (torch-free).

:mod:`maisi_core.training.loop`, :mod:`maisi_core.training.losses` and :mod:`maisi_core.training.pipeline` import this
module; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from maisi_core.errors import ConfigError, did_you_mean
from maisi_core.anatomy.labels import RIB_IDS

__all__ = ["LOSSES", "STAGES", "THIN_STRUCTURE_IDS", "TrainingConfig"]

STAGES = ("vae", "unet", "controlnet")
LOSSES = ("l1", "mse")

# Structures one or two voxels wide at the default model's 6 mm: ribs, spinal cord, trachea, airway.
THIN_STRUCTURE_IDS: tuple[int, ...] = (*RIB_IDS, 121, 57, 132)


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a training run (all stages).

    Attributes:
        stages: stages to run, in the order of ``STAGES``.
        steps_vae, steps_unet, steps_controlnet: optimiser steps per stage.
        batch_vae, batch_unet, batch_controlnet: cases per step.
        vae_patch_vox: cubic patch edge for the VAE (the whole volume when larger).
        lr_vae, lr_unet, lr_controlnet: peak learning rates (Adam / AdamW), linear warm-up over
            ``warmup_steps`` then cosine decay to 10 %.
        kl_weight: KL weight (upstream MAISI: 1e-7).
        vae_decoder_only: train only the VAE decoder (encoder frozen): the latent space, and so a trained
            UNet/ControlNet, stays valid while the reconstruction improves (fine-tuning a finished model).
        adv_weight: patch adversarial weight (0 switches the discriminator off).
        diffusion_loss: ``"l1"`` (MAISI) or ``"mse"``.
        roi_loss_weight: weight of voxels (VAE) and latent voxels (UNet, ControlNet) covering organ/tumour
            labels, i.e. anything but background 0 and body 200 (1: plain mean).
        tumor_loss_weight: weight of voxels (VAE) and latent voxels (UNet, ControlNet) covering a tumour
            label (23, 24, 26, 27, 128), multiplying ``roi_loss_weight``. Tumours are a few voxels of a
            case, so without it the networks learn to paint them as their host organ (upstream MAISI
            weights tumour voxels x100 in the ControlNet loss; 1: no extra weight).
        thin_loss_weight: the same for thin structures (:data:`THIN_STRUCTURE_IDS`: ribs, spinal cord,
            trachea, airway), one or two voxels wide at the default model's 6 mm, which a x4 VAE
            otherwise blurs into their surroundings (ribs read as lung, the cord as bone).
        scale_factor_cases: images encoded to estimate the latent scale factor.
        max_minutes: wall-time budget for all stages (None: no limit); a stage gets the remaining budget
            times its share of the remaining steps and stops early when it runs out.
        anneal_to_budget: with ``max_minutes``, decay the learning rate by the larger of step and time
            progress, so a stage the budget stops early still ends at the floor rate (off by default: the
            runs that made the packaged model did not do it, and it makes step-to-lr depend on the machine).
        checkpoint_every: steps between checkpoints (and always at the end of a stage).
        seed: seed of initialisation and of every step's draws.
    """

    stages: tuple[str, ...] = STAGES
    steps_vae: int = 500
    steps_unet: int = 500
    steps_controlnet: int = 500
    batch_vae: int = 4
    batch_unet: int = 4
    batch_controlnet: int = 2
    vae_patch_vox: int = 32
    lr_vae: float = 1e-3
    lr_unet: float = 5e-4
    lr_controlnet: float = 3e-4
    warmup_steps: int = 20
    kl_weight: float = 1e-7
    vae_decoder_only: bool = False
    adv_weight: float = 0.0
    diffusion_loss: str = "l1"
    roi_loss_weight: float = 1.0
    tumor_loss_weight: float = 1.0
    thin_loss_weight: float = 1.0
    scale_factor_cases: int = 16
    max_minutes: float | None = None
    anneal_to_budget: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        stages = (self.stages,) if isinstance(self.stages, str) else tuple(self.stages)
        for s in stages:
            if s not in STAGES:
                raise ConfigError(
                    f"TrainingConfig expects stages from {list(STAGES)}, but got stage={s!r}.{did_you_mean(s, STAGES)}"
                )
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in stages))
        if self.diffusion_loss not in LOSSES:
            raise ConfigError(
                f"TrainingConfig expects diffusion_loss in {list(LOSSES)}, but got "
                f"diffusion_loss={self.diffusion_loss!r}.{did_you_mean(self.diffusion_loss, LOSSES)}"
            )
        for name in ("steps_vae", "steps_unet", "steps_controlnet"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"TrainingConfig expects {name} >= 0, but got {name}={getattr(self, name)}.")
        for name in ("batch_vae", "batch_unet", "batch_controlnet", "vae_patch_vox", "checkpoint_every",
                     "scale_factor_cases"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TrainingConfig expects {name} >= 1, but got {name}={getattr(self, name)}.")
        for name in ("roi_loss_weight", "tumor_loss_weight", "thin_loss_weight"):
            if not float(getattr(self, name)) >= 1.0:
                raise ConfigError(f"TrainingConfig expects {name} >= 1, but got {name}={getattr(self, name)}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"TrainingConfig expects max_minutes > 0 or None, but got max_minutes={self.max_minutes}.")

    def steps(self, stage: str) -> int:
        """Steps of one stage (0 when the stage is not selected)."""
        return int(getattr(self, f"steps_{stage}")) if stage in self.stages else 0
