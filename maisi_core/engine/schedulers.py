"""Noise schedulers by name: rectified flow (MAISI-v2, default) and DDPM (MAISI-v1).

Both are MONAI's own classes. What is written here is the part MONAI leaves to the caller: the
resolution-dependent timestep shift of rectified flow (``input_img_size_numel`` = latent voxels), the
"next timestep" of each step (zero after the last one), and one ``step`` call shape for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from maisi_core.engine.config import DDPMSchedulerConfig, RFlowSchedulerConfig, SchedulerConfig
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
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Advance ``sample`` by one step and return the new sample (same shape (B, C, X, Y, Z)).

    DDPM's step noise comes from ``generator`` on the generator's own device (see :func:`ddpm_step`):
    one generator for the whole batch, or one per case.
    """
    if isinstance(scheduler, RFlowScheduler):
        new_sample, _ = scheduler.step(model_output, timestep, sample, next_timestep)
        return new_sample
    return ddpm_step(scheduler, model_output, int(timestep), sample, generator=generator)


def ddpm_step(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    *,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """MONAI's ``DDPMScheduler.step`` (formulas 6, 7 and 15 of Ho et al. 2020) with the noise drawn apart.

    MONAI draws the step noise with ``torch.randn(generator=..., device=model_output.device)``, which
    fails for a CPU generator and CUDA tensors. Here the noise is drawn in fp32 on the generator's device
    (the CPU, like the initial latents) and moved to the sample's, so a seed gives the same noise on
    every device. Without a generator the noise comes from torch's global CPU generator. With one
    generator per case, each case's noise is drawn from its own, so a case gets the same noise in a
    batch as alone.
    """
    if model_output.shape[1] == sample.shape[1] * 2 and scheduler.variance_type in ("learned", "learned_range"):
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    else:
        predicted_variance = None
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_prev = scheduler.alphas_cumprod[timestep - 1] if timestep > 0 else scheduler.one
    beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
    if scheduler.prediction_type == "epsilon":
        x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    elif scheduler.prediction_type == "sample":
        x0 = model_output
    else:  # v_prediction
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
    if scheduler.clip_sample:
        x0 = torch.clamp(x0, scheduler.clip_sample_values[0], scheduler.clip_sample_values[1])
    x0_coeff = alpha_prod_prev**0.5 * scheduler.betas[timestep] / beta_prod_t
    sample_coeff = scheduler.alphas[timestep] ** 0.5 * beta_prod_prev / beta_prod_t
    prev = x0_coeff * x0 + sample_coeff * sample
    if timestep > 0:
        noise = _step_noise(tuple(model_output.shape), generator)
        std = scheduler._get_variance(timestep, predicted_variance=predicted_variance) ** 0.5
        prev = prev + std * noise.to(device=model_output.device, dtype=model_output.dtype)
    return prev


def training_target(
    scheduler: RFlowScheduler | DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Return what the network learns to predict: velocity ``x0 - noise`` (rflow) or the noise (ddpm)."""
    if isinstance(scheduler, RFlowScheduler):
        return x0 - noise
    return noise


def _step_noise(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator | None] | None
                ) -> torch.Tensor:
    """fp32 noise of ``shape``, drawn on each generator's device: one draw, or one per case along dim 0."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    if len(generator) != shape[0]:
        raise ConfigError(f"ddpm_step expects one generator per case, but got generators={len(generator)} for a "
                          f"batch of {shape[0]}.")
    return torch.cat([_step_noise((1, *shape[1:]), g).cpu() for g in generator])
