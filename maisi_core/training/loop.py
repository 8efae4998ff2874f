"""The machinery every training stage shares: checkpoint folder, loss log, time budget, per-step seeding.

A stage is a ``step_fn(rng) -> {"loss": ..., ...}`` run by :func:`run_stage_loop`, which sets the learning rate
(linear warm-up, cosine decay to 10 %), seeds torch and numpy from ``(seed, stage, step)`` so a resumed run
repeats an uninterrupted one, checkpoints (``<dir>/<stage>/state.pt`` with tensors only, loaded with
``weights_only=True``, plus ``progress.json``), appends to ``loss_log.jsonl`` and calls the progress callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi_core.errors import CheckpointError, ConfigError
from maisi_core.training.config import STAGES, TrainingConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingProgress:
    """What the progress callback receives after every step."""

    stage: str
    step: int
    total_steps: int
    loss: float
    elapsed_s: float


ProgressCallback = Callable[[TrainingProgress], None]



def _step_seed(seed: int, stage: str, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), STAGES.index(stage), int(step)]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int, stage: str, step: int, device: torch.device):
    """Run a step with torch's RNG (CPU, and CUDA on a CUDA device) seeded from (seed, stage, step)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_step_seed(seed, stage, step))
        yield np.random.default_rng(_step_seed(seed, stage, step))


def lr_factor(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over the larger of step progress and ``time_progress``.

    ``time_progress`` (the spent share of a stage's wall-time budget) makes a run that a budget stops before
    its last step still end annealed, instead of being cut off near the peak learning rate.
    """
    warmup = max(1, min(warmup, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainingRun:
    """The mutable state of one training run: checkpoint folder, loss log, budget, callback."""

    def __init__(self, checkpoint_dir: Path, cfg: TrainingConfig, device: torch.device,
                 callback: ProgressCallback | None, resume: bool, fingerprint: dict[str, Any]) -> None:
        self.dir, self.cfg, self.device, self.callback = checkpoint_dir, cfg, device, callback
        self.fingerprint = fingerprint
        self.start = time.monotonic()
        self.log_path = checkpoint_dir / "loss_log.jsonl"
        existing = [p for p in STAGES if (checkpoint_dir / p / "progress.json").is_file()]
        if existing and not resume:
            raise CheckpointError(
                f"train_pipeline expects an empty checkpoint folder unless resume=True, but got "
                f"checkpoint_dir={str(checkpoint_dir)!r} holding stages {existing}. Pass resume=True (CLI: --resume) "
                "or choose another folder."
            )
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def progress(self, stage: str) -> dict[str, Any] | None:
        path = self.dir / stage / "progress.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"train_pipeline expects a checkpoint of the same run to resume, but got "
                f"fingerprint={data.get('fingerprint')} in {str(path)!r} (this run: {self.fingerprint}). "
                "Use the same seed, batch sizes, learning rates and corpus, or a new checkpoint folder."
            )
        return data

    def save(self, stage: str, step: int, *, done: bool, modules: dict[str, torch.nn.Module],
             optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any] | None = None) -> None:
        stage_dir = self.dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "modules": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, stage_dir / "state.pt.tmp")
        os.replace(stage_dir / "state.pt.tmp", stage_dir / "state.pt")
        info = {"stage": stage, "step": int(step), "done": bool(done), "fingerprint": self.fingerprint, **(extra or {})}
        (stage_dir / "progress.json.tmp").write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(stage_dir / "progress.json.tmp", stage_dir / "progress.json")

    def load(self, stage: str, modules: dict[str, torch.nn.Module],
             optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
        state = torch.load(self.dir / stage / "state.pt", map_location=self.device, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in (optimizers or {}).items():
            o.load_state_dict(state["optimizers"][k])

    def trim_log(self, stage: str, step: int) -> None:
        """Drop log lines of ``stage`` after ``step`` (they belong to an interrupted attempt)."""
        if not self.log_path.is_file():
            return
        keep = [ln for ln in self.log_path.read_text().splitlines()
                if ln and not (json.loads(ln)["stage"] == stage and json.loads(ln)["step"] > step)]
        self.log_path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, stage: str, step: int, total: int, losses: dict[str, float], lr: float) -> None:
        elapsed = time.monotonic() - self.start
        record = {"stage": stage, "step": step, **{k: round(v, 7) for k, v in losses.items()}, "lr": lr,
                  "elapsed_s": round(elapsed, 2)}
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(TrainingProgress(stage, step, total, losses["loss"], elapsed))

    def stage_deadline(self, stage: str) -> float | None:
        if self.cfg.max_minutes is None:
            return None
        left_s = self.cfg.max_minutes * 60.0 - (time.monotonic() - self.start)
        remaining = [s for s in STAGES[STAGES.index(stage):] if s in self.cfg.stages]
        total = sum(self.cfg.steps(s) for s in remaining) or 1
        return time.monotonic() + max(0.0, left_s) * self.cfg.steps(stage) / total


def run_stage_loop(run: TrainingRun, stage: str, step_fn: Callable[[np.random.Generator], dict[str, float]],
          modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
          lr: float) -> dict[str, Any]:
    """Run (or resume) one stage's optimiser steps with checkpoints, budget and logging."""
    total = run.cfg.steps(stage)
    start_step, t0 = 0, time.monotonic()
    prog = run.progress(stage)
    if prog is not None:
        run.load(stage, modules, optimizers)
        start_step = int(prog["step"])
        if prog["done"]:
            logger.info("%s: already done at step %d", stage, start_step)
            return prog["summary"]
        logger.info("%s: resuming at step %d of %d", stage, start_step, total)
    run.trim_log(stage, start_step)
    deadline = run.stage_deadline(stage)
    budget_start = time.monotonic()
    recent: list[float] = []
    step, stopped_early = start_step, False
    for step in range(start_step, total):
        now = time.monotonic()
        if deadline is not None and now > deadline:
            stopped_early = True
            break
        time_progress = (0.0 if deadline is None or not run.cfg.anneal_to_budget
                         else (now - budget_start) / max(1e-9, deadline - budget_start))
        factor = lr_factor(step, total, run.cfg.warmup_steps, time_progress)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr * factor
        with _seeded(run.cfg.seed, stage, step, run.device) as rng:
            losses = step_fn(rng)
        recent = (recent + [losses["loss"]])[-20:]
        if not math.isfinite(losses["loss"]):
            raise ConfigError(
                f"train_pipeline expects finite losses, but got loss={losses['loss']} at {stage} step {step + 1}. "
                "Lower the learning rate."
            )
        if (step + 1) % run.cfg.checkpoint_every == 0 and step + 1 < total:
            run.save(stage, step + 1, done=False, modules=modules, optimizers=optimizers)
        run.log(stage, step + 1, total, losses, lr * factor)
    else:
        step = total
    summary = {"steps": step, "steps_planned": total, "stopped_early": stopped_early,
               "final_loss_mean20": float(np.mean(recent)) if recent else None,
               "wall_s": round(time.monotonic() - t0, 1)}
    run.save(stage, step, done=True, modules=modules, optimizers=optimizers, extra={"summary": summary})
    return summary


