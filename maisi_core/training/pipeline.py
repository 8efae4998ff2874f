"""Training loops for the three MAISI networks (the embedded default model is trained with them).

:func:`train_pipeline` runs up to three stages on a corpus of :class:`~maisi_core.training.data.TrainingCase`
and writes a model directory (:meth:`MaisiPipeline.save_pretrained`) whose index holds a training summary:

1. ``vae``: random patches, L1 reconstruction + ``kl_weight`` · KL (upstream 1e-7) + optional least-squares
   patch adversarial loss (off by default; no perceptual loss, it needs downloaded weights). Then
   ``scale_factor = 1 / std(z_mu)`` over the first ``scale_factor_cases`` training images.
2. ``unet``: latents ``z_mu · scale_factor`` (deterministic, encoded once), rectified flow with MONAI's
   ``RFlowScheduler.sample_timesteps`` / ``add_noise``, target ``x0 − noise``, conditioned on spacing (mm × 100)
   and modality class (CT = 1). L1 loss by default, as MAISI's DM and ControlNet training; ``"mse"`` is offered.
3. ``controlnet``: the UNet frozen; a fresh ControlNet is initialised from the UNet's weights
   (``copy_model_state``; its conditioning embedding and zero convs keep their zero init) and learns label →
   latent through the UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``, with the
   label map as the 8-bit encoding of :func:`maisi_core.engine.pipeline.encode_labels_8bit`.

Optionally voxels (VAE) and latent voxels (UNet, ControlNet) covering organ or tumour labels (anything but 0 and body 200) get ``roi_loss_weight``.

Starting from a model directory instead of a preset fine-tunes it (selected stages continue from its weights).

Checkpoints (see :mod:`maisi_core.training.loop`: ``checkpoint_dir/<stage>/state.pt`` + ``progress.json``, ``loss_log.jsonl``) hold model, optimizer,
step and torch RNG state as tensors only (loaded with ``weights_only=True``). Every step draws its randomness
from ``(seed, stage, step)``, so a resumed run gives the same weights as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.utils import copy_model_state

from maisi_core.engine.config import PipelineConfig, RFlowSchedulerConfig
from maisi_core.errors import ConfigError, TrainingDataError
from maisi_core.engine.pipeline import MaisiPipeline, encode_labels_8bit, resolve_device
from maisi_core.training.config import LOSSES, STAGES, THIN_STRUCTURE_IDS, TrainingConfig
from maisi_core.training.data import TrainingCase
from maisi_core.training.losses import roi_weights, weighted_loss
from maisi_core.training.loop import ProgressCallback, TrainingProgress, TrainingRun, run_stage_loop

# The config, stage names and progress types live in training_config / training_loop; callers import them from here.
__all__ = [
    "CT_MODALITY", "LOSSES", "STAGES", "THIN_STRUCTURE_IDS", "ProgressCallback", "TrainingConfig", "TrainingProgress",
    "TrainingResult", "compute_scale_factor", "encode_cases", "train_controlnet_stage", "train_pipeline",
    "train_unet_stage", "train_vae_stage",
]

logger = logging.getLogger(__name__)

CT_MODALITY = 1


@dataclass(frozen=True)
class TrainingResult:
    """The outcome of :func:`train_pipeline`.

    Attributes:
        model_dir: the written model directory.
        digest: its model digest.
        scale_factor: the latent scale factor saved with it.
        summary: the training summary stored in ``model_index.json`` under ``"training"``.
    """

    model_dir: Path
    digest: str
    scale_factor: float
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- stages


def _stack(cases: Sequence[TrainingCase], idx: Sequence[int], attr: str) -> np.ndarray:
    return np.stack([getattr(cases[int(i)], attr) for i in idx])


def train_vae_stage(run: TrainingRun, pipe: MaisiPipeline, cases: Sequence[TrainingCase]) -> dict[str, Any]:
    """Stage 1: train the VAE on random patches (B, 1, P, P, P) with L1 + KL (+ adversarial)."""
    cfg, dev, vae = run.cfg, run.device, pipe.vae
    vae.train()
    params = list(vae.parameters())
    if cfg.vae_decoder_only:
        params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    modules: dict[str, torch.nn.Module] = {"vae": vae}
    optimizers: dict[str, torch.optim.Optimizer] = {"vae": torch.optim.Adam(params, lr=cfg.lr_vae)}
    disc = adv = None
    if cfg.adv_weight > 0:
        from monai.losses.adversarial_loss import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            disc = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1,
                                      norm="INSTANCE").to(dev)
        adv = PatchAdversarialLoss(criterion="least_squares")
        modules["discriminator"] = disc
        optimizers["discriminator"] = torch.optim.Adam(disc.parameters(), lr=cfg.lr_vae)
    shape = np.array(cases[0].image.shape)
    patch = np.minimum(shape, cfg.vae_patch_vox)

    def step(rng: np.random.Generator) -> dict[str, float]:
        idx = rng.integers(len(cases), size=cfg.batch_vae)
        crops, label_crops = [], []
        for i in idx:
            lo = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch, strict=True)]
            box = tuple(slice(a, a + p) for a, p in zip(lo, patch, strict=True))
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            crops.append(np.flip(cases[int(i)].image[box], flips))
            label_crops.append(np.flip(cases[int(i)].label_map[box], flips))
        x = torch.from_numpy(np.ascontiguousarray(np.stack(crops)))[:, None].to(dev)
        weight = roi_weights(np.stack(label_crops), 1, cfg)
        if cfg.vae_decoder_only:
            with torch.no_grad():
                mu, sigma = vae.encode(x)
            recon = vae.decode(vae.sampling(mu, sigma))
        else:
            recon, mu, sigma = vae(x)
        l1 = weighted_loss(recon, x, None if weight is None else weight.to(dev), "l1")
        kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-10) - 1, dim=[1, 2, 3, 4]).mean()
        loss = l1 + cfg.kl_weight * kl
        out = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if disc is not None:
            g_adv = adv(disc(recon.contiguous())[-1], target_is_real=True, for_discriminator=False)
            loss = loss + cfg.adv_weight * g_adv
            out["adv_g"] = float(g_adv.detach())
        optimizers["vae"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["vae"].step()
        if disc is not None:
            d_loss = 0.5 * (adv(disc(recon.detach().contiguous())[-1], target_is_real=False, for_discriminator=True)
                            + adv(disc(x)[-1], target_is_real=True, for_discriminator=True))
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()
            out["adv_d"] = float(d_loss.detach())
        return {"loss": float(loss.detach()), **out}

    summary = run_stage_loop(run, "vae", step, modules, optimizers, cfg.lr_vae)
    vae.eval()
    return summary


@torch.no_grad()
def encode_cases(vae: torch.nn.Module, cases: Sequence[TrainingCase], device: torch.device) -> torch.Tensor:
    """Return the VAE means ``z_mu`` (N, C, x, y, z) of the cases' images (on the CPU, unscaled)."""
    vae.eval()
    out = []
    for case in cases:
        x = torch.from_numpy(case.image)[None, None].to(device)
        z_mu, _ = vae.encode(x)
        out.append(z_mu.float().cpu())
    return torch.cat(out)


def compute_scale_factor(latents: torch.Tensor) -> float:
    """Return ``1 / std(latents)`` (MAISI's latent scale factor)."""
    return float(1.0 / latents.float().std())


def _diffusion_batch(rng, latents, cases, batch, device):
    idx = rng.integers(len(cases), size=batch)
    x0 = latents[torch.as_tensor(idx)].to(device)
    spacing = torch.tensor(_stack(cases, idx, "spacing_mm"), dtype=torch.float32, device=device) * 100.0
    labels_ = _stack(cases, idx, "label_map")
    return idx, x0, spacing, labels_


def _noisy(pipe: MaisiPipeline, x0: torch.Tensor, device: torch.device):
    noise = torch.randn(x0.shape, dtype=torch.float32).to(device)
    t = pipe.scheduler.sample_timesteps(torch.empty(x0.shape)).to(device)  # drawn on the CPU: same on every device
    return pipe.scheduler.add_noise(x0, noise, t), t, x0 - noise


def _rflow_loss(pipe: MaisiPipeline, cfg, rng: np.random.Generator, latents: torch.Tensor,
                cases: Sequence[TrainingCase], batch: int, dev: torch.device, *,
                controlnet: torch.nn.Module | None = None) -> torch.Tensor:
    """One batch's rectified-flow loss through the UNet (with the ControlNet's residuals when given)."""
    _, x0, spacing, labels_ = _diffusion_batch(rng, latents, cases, batch, dev)
    xt, t, target = _noisy(pipe, x0, dev)
    classes = torch.full((x0.shape[0],), CT_MODALITY, dtype=torch.long, device=dev)
    residuals = {}
    if controlnet is not None:
        cond = encode_labels_8bit(torch.from_numpy(labels_)[:, None].to(dev))  # uint8 travels, 8 bits made there
        down, mid = controlnet(x=xt, timesteps=t, controlnet_cond=cond, class_labels=classes)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    pred = pipe.unet(xt, t, class_labels=classes, spacing_tensor=spacing, **residuals)
    weight = roi_weights(labels_, pipe.config.vae.downsample_factor, cfg)
    return weighted_loss(pred, target, None if weight is None else weight.to(dev), cfg.diffusion_loss)


def train_unet_stage(run: TrainingRun, pipe: MaisiPipeline, cases: Sequence[TrainingCase],
                     latents: torch.Tensor) -> dict[str, Any]:
    """Stage 2: rectified flow on latents (N, C, x, y, z) (already × scale_factor), spacing + modality conditioned."""
    cfg, dev, unet = run.cfg, run.device, pipe.unet
    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr_unet)

    def step(rng: np.random.Generator) -> dict[str, float]:
        loss = _rflow_loss(pipe, cfg, rng, latents, cases, cfg.batch_unet, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    summary = run_stage_loop(run, "unet", step, {"unet": unet}, {"unet": opt}, cfg.lr_unet)
    unet.eval()
    return summary


def train_controlnet_stage(run: TrainingRun, pipe: MaisiPipeline, cases: Sequence[TrainingCase],
                           latents: torch.Tensor) -> dict[str, Any]:
    """Stage 3: ControlNet on (label map (B, 8, X, Y, Z) 8-bit, latent) pairs through the frozen UNet."""
    cfg, dev, unet, cnet = run.cfg, run.device, pipe.unet, pipe.controlnet
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    cnet.train()
    opt = torch.optim.AdamW(cnet.parameters(), lr=cfg.lr_controlnet)

    def step(rng: np.random.Generator) -> dict[str, float]:
        loss = _rflow_loss(pipe, cfg, rng, latents, cases, cfg.batch_controlnet, dev, controlnet=cnet)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    try:
        summary = run_stage_loop(run, "controlnet", step, {"controlnet": cnet}, {"controlnet": opt}, cfg.lr_controlnet)
    finally:
        for p in unet.parameters():
            p.requires_grad_(True)
    cnet.eval()
    return summary


# ---------------------------------------------------------------------------------------------- entry point


def _check_corpus(config: PipelineConfig, cases: Sequence[TrainingCase]) -> None:
    who = "train_pipeline"
    if not cases:
        raise TrainingDataError(f"{who} expects at least one training case, but got num_cases=0.")
    shape = cases[0].image.shape
    m = config.size_multiple_vox
    if any(s % m for s in shape):
        raise TrainingDataError(
            f"{who} expects case sizes divisible by {m} for preset {config.name!r}, but got shape={shape}."
        )
    bad = [c.name for c in cases if c.image.shape != shape or c.label_map.shape != shape]
    if bad:
        raise TrainingDataError(
            f"{who} expects every image and label map of one shape {shape}, but got other shapes in cases={bad[:5]}."
        )


def train_pipeline(
    start: PipelineConfig | str | Path,
    cases: Sequence[TrainingCase],
    *,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    training: TrainingConfig | None = None,
    device: str | torch.device | None = "cpu",
    callback: ProgressCallback | None = None,
    resume: bool = False,
    name: str | None = None,
    data_description: str = "",
) -> TrainingResult:
    """Train (or fine-tune) the VAE, UNet and ControlNet and write a model directory.

    Args:
        start: a preset config (fresh networks, seeded with ``training.seed``) or a model directory / packaged
            model name to fine-tune (its weights and scale factor are the starting point).
        cases: the corpus, all of one shape divisible by the preset's size multiple.
        out_dir: the model directory to write (must be new or empty).
        checkpoint_dir: folder for per-stage checkpoints and ``loss_log.jsonl``.
        training: hyper-parameters; defaults to :class:`TrainingConfig`.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        callback: called with a :class:`TrainingProgress` after every step.
        resume: continue from ``checkpoint_dir`` (otherwise it must hold no checkpoint).
        name: model name for the index (default: the preset's).
        data_description: recorded in the summary (e.g. ``"phantom corpus, 300 cases"``).

    Raises:
        TrainingDataError: empty corpus or inconsistent shapes.
        CheckpointError: a checkpoint exists and ``resume`` is False, or it belongs to another run.
    """
    cfg = training or TrainingConfig()
    dev = resolve_device(device)
    if isinstance(start, PipelineConfig):
        pipe = MaisiPipeline.from_config(start, device=dev, precision="fp32", init_seed=cfg.seed)
        init_from, fresh = f"preset:{start.name}", True
    else:
        pipe = MaisiPipeline.from_pretrained(start, device=dev, precision="fp32")
        init_from, fresh = f"model:{pipe.config.name}@{pipe.model_digest}", False
    _check_corpus(pipe.config, cases)
    if not isinstance(pipe.config.scheduler, RFlowSchedulerConfig) and {"unet", "controlnet"} & set(cfg.stages):
        raise ConfigError(
            f"train_pipeline expects a rectified-flow preset to train the UNet or ControlNet, but got "
            f"scheduler={pipe.config.scheduler.name!r}. Train only the VAE, or use an rflow preset."
        )
    fingerprint = {"seed": cfg.seed, "init_from": init_from, "num_cases": len(cases),
                   "batches": [cfg.batch_vae, cfg.batch_unet, cfg.batch_controlnet],
                   "lrs": [cfg.lr_vae, cfg.lr_unet, cfg.lr_controlnet], "vae_decoder_only": cfg.vae_decoder_only}
    run = TrainingRun(Path(checkpoint_dir), cfg, dev, callback, resume, fingerprint)
    summaries: dict[str, Any] = {}
    scale_factor = pipe.scale_factor
    if "vae" in cfg.stages:
        summaries["vae"] = train_vae_stage(run, pipe, cases)
        if not cfg.vae_decoder_only:  # a frozen encoder keeps the latents, so the scale factor stays
            scale_factor = compute_scale_factor(encode_cases(pipe.vae, cases[: cfg.scale_factor_cases], dev))
        logger.info("scale_factor = %.5f", scale_factor)
    pipe.scale_factor = scale_factor
    latents = None
    if "unet" in cfg.stages or "controlnet" in cfg.stages:
        latents = encode_cases(pipe.vae, cases, dev) * scale_factor
    if "unet" in cfg.stages:
        summaries["unet"] = train_unet_stage(run, pipe, cases, latents)
    if "controlnet" in cfg.stages:
        if fresh and run.progress("controlnet") is None:
            copy_model_state(pipe.controlnet, pipe.unet.state_dict())
        summaries["controlnet"] = train_controlnet_stage(run, pipe, cases, latents)
    pipe.config = pipe.config.replace(scale_factor=scale_factor)
    summary = {
        "stages": summaries, "seed": cfg.seed, "init_from": init_from, "device": dev.type,
        "num_cases": len(cases), "case_shape": list(cases[0].image.shape), "data": data_description,
        "scale_factor": scale_factor, "wall_s": round(time.monotonic() - run.start, 1),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "torch_version": torch.__version__,
    }
    digest = pipe.save_pretrained(out_dir, name=name or pipe.config.name, extra_index={"training": summary})
    logger.info("wrote %s (digest %s)", out_dir, digest)
    return TrainingResult(Path(out_dir), digest, scale_factor, summary)
