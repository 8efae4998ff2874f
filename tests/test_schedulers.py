from __future__ import annotations

import pytest
import torch

from maisi_core import presets
from maisi_core.errors import ConfigError
from maisi_core.engine.schedulers import build_scheduler, plan_timesteps, scheduler_step


def test_rflow_timesteps_follow_maisi_resolution_shift():
    sched = build_scheduler(presets.maisi_ct_rflow().scheduler)
    plan = plan_timesteps(sched, 30, latent_spatial_shape=(64, 64, 64))
    values = plan.timesteps.float().tolist()
    # measured upstream (MAISI.md section 3): 1000, 983, 965.5 ... 64.5 for a 64^3 latent
    assert values[0] == pytest.approx(1000.0)
    assert values[1] == pytest.approx(983.0, abs=0.5)
    assert values[2] == pytest.approx(965.5, abs=0.5)
    assert values[-1] == pytest.approx(64.5, abs=0.5)
    assert plan.next_timesteps[-1].item() == 0 and len(plan) == 30


def test_rflow_larger_latent_shifts_more():
    sched = build_scheduler(presets.maisi_ct_rflow().scheduler)
    plan = plan_timesteps(sched, 30, latent_spatial_shape=(128, 128, 192))
    assert plan.timesteps[1].item() == pytest.approx(992.5, abs=0.5)
    assert plan.timesteps[-1].item() == pytest.approx(136.4, abs=0.5)


def test_rflow_loop_on_tiny_tensor_matches_stored_values():
    sched = build_scheduler(presets.tiny().scheduler)
    plan = plan_timesteps(sched, 4, latent_spatial_shape=(8, 8, 8))
    x = torch.ones(1, 1, 2, 2, 2)
    v = torch.full_like(x, 0.5)
    for t, t_next in zip(plan.timesteps, plan.next_timesteps, strict=True):
        x = scheduler_step(sched, v, t, t_next, x)
    # fp16 timesteps after the resolution shift (latent 8^3 < base 32^3 shifts towards 0)
    assert plan.timesteps.tolist() == [1000.0, 428.5, 200.0, 76.9375]
    # x + v * sum(t_i - int(t_next)) / 1000: upstream casts next_t to int
    stored = 1.0 + 0.5 * (1000 - 428 + 428.5 - 200 + 200 - 76 + 76.9375) / 1000
    assert stored == pytest.approx(1.50071875)
    assert torch.allclose(x, torch.full_like(x, stored), atol=1e-6)


def test_ddpm_plan_has_requested_steps_and_zero_successor():
    sched = build_scheduler(presets.maisi_ct_ddpm().scheduler)
    plan = plan_timesteps(sched, 10, latent_spatial_shape=(8, 8, 8))
    assert len(plan) == 10 and plan.timesteps[0].item() == 999 and plan.next_timesteps[-1].item() == 0


def test_plan_rejects_bad_step_count():
    sched = build_scheduler(presets.tiny().scheduler)
    with pytest.raises(ConfigError, match=r"1 <= num_inference_steps <= 1000, but got num_inference_steps=0"):
        plan_timesteps(sched, 0, latent_spatial_shape=(8, 8, 8))
