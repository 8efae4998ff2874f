"""Noise schedulers by name: rectified flow (MAISI-v2, default) and DDPM (MAISI-v1).

Both are MONAI's own classes. What is written here is the part MONAI leaves to the caller: the
resolution-dependent timestep shift of rectified flow (``input_img_size_numel`` = latent voxels), the
"next timestep" of each step (zero after the last one), and one ``step`` call shape for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from maisi_core.config import DDPMSchedulerConfig, RFlowSchedulerConfig, SchedulerConfig
from maisi_core.errors import ConfigError

SCHEDULER_NAMES = ("rflow", "ddpm")


def build_scheduler(cfg: SchedulerConfig) -> RFlowScheduler | DDPMScheduler:
    """Return the MONAI scheduler for a scheduler config."""
    if isinstance(cfg, RFlowSchedulerConfig):
        return RFlowScheduler(**cfg.to_kwargs())
    if isinstance(cfg, DDPMSchedulerConfig):
        return DDPMScheduler(**cfg.to_kwargs())
    raise ConfigError(
        f"build_scheduler expects an RFlowSchedulerConfig or DDPMSchedulerConfig, but got cfg={type(cfg).__name__}."
    )


@dataclass(frozen=True)
class TimestepPlan:
    """The timesteps of one sampling run: ``timesteps[i]`` steps to ``next_timesteps[i]``."""

    timesteps: torch.Tensor
    next_timesteps: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def plan_timesteps(
    scheduler: RFlowScheduler | DDPMScheduler,
    num_inference_steps: int,
    *,
    latent_spatial_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> TimestepPlan:
    """Set the scheduler's timesteps and return them with their successors.

    Args:
        scheduler: a scheduler from :func:`build_scheduler`.
        num_inference_steps: number of denoising steps (1..num_train_timesteps).
        latent_spatial_shape: the latent's spatial shape (used by rectified flow's resolution shift).
        device: where the timesteps live.
    """
    n_train = int(scheduler.num_train_timesteps)
    if not 1 <= int(num_inference_steps) <= n_train:
        raise ConfigError(
            f"plan_timesteps expects 1 <= num_inference_steps <= {n_train}, but got "
            f"num_inference_steps={num_inference_steps}."
        )
    if isinstance(scheduler, RFlowScheduler):
        numel = 1
        for s in latent_spatial_shape:
            numel *= int(s)
        scheduler.set_timesteps(int(num_inference_steps), device=device, input_img_size_numel=numel)
    else:
        scheduler.set_timesteps(int(num_inference_steps), device=device)
    timesteps = scheduler.timesteps
    zero = torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)
    return TimestepPlan(timesteps=timesteps, next_timesteps=torch.cat([timesteps[1:], zero]))


def scheduler_step(
    scheduler: RFlowScheduler | DDPMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    next_timestep: torch.Tensor,
    sample: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Advance ``sample`` by one step and return the new sample (same shape (B, C, X, Y, Z))."""
    if isinstance(scheduler, RFlowScheduler):
        new_sample, _ = scheduler.step(model_output, timestep, sample, next_timestep)
    else:
        new_sample, _ = scheduler.step(model_output, int(timestep), sample, generator=generator)
    return new_sample


def training_target(
    scheduler: RFlowScheduler | DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Return what the network learns to predict: velocity ``x0 - noise`` (rflow) or the noise (ddpm)."""
    if isinstance(scheduler, RFlowScheduler):
        return x0 - noise
    return noise
