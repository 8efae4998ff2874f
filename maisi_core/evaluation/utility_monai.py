"""MONAI segmenters for the downstream-utility test: SegResNet and DynUNet trained in-process.

Every case is reoriented to RAS and resampled to ``config.spacing_mm`` (:func:`to_work_grid`), HU are
mapped to [0, 1] from [-1000, 1000], and labels become class indices (0 background, then ``structures``
in order; everything else, body 200 included, is background). Training draws ``batch_size`` patches per
step (a seeded case choice, MONAI ``RandCropByPosNegLabeld`` with half the patches centred on a structure,
mild intensity scale and shift), optimises MONAI ``DiceCELoss`` with AdamW and a polynomial learning rate
over epochs. Every step is seeded from ``(seed, epoch, step)``, so a resumed fit repeats an uninterrupted one.

Workdir layout: ``progress.json`` (the fit's fingerprint, last finished epoch, losses),
``checkpoint.pt`` (model and optimiser state: tensors and numbers only, loaded with ``weights_only=True``)
after every epoch, and when done ``model.safetensors`` + ``model.json`` (network, structures, grid), which
:meth:`MonaiBackend.predict` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi_core.errors import CheckpointError, ConfigError, DeviceError, TrainingDataError, WeightsNotFoundError
from maisi_core.evaluation.utility import UtilityConfig
from maisi_core.evaluation.utility_data import LabeledCase, fingerprint, from_work_grid, to_work_grid
from maisi_core.training.data import hu_to_unit

logger = logging.getLogger(__name__)

MONAI_SEGMENTERS = ("segresnet", "dynunet")
INTENSITY_RANGE_HU = (-1000.0, 1000.0)
SEGRESNET_INIT_FILTERS = 16
DYNUNET_FILTERS = (16, 32, 64, 128, 256, 320)
DYNUNET_MIN_FEATURE_VOX = 4  # nnU-Net: stop down-sampling an axis below 4 voxels
DYNUNET_MIN_LEVELS = 3
POLY_EXPONENT = 0.9
WEIGHT_DECAY = 1e-5
SW_OVERLAP = 0.25
PATCH_CENTRE_CAP = 100_000  # foreground and background voxels kept per case as candidate patch centres
PROGRESS_NAME, CHECKPOINT_NAME = "progress.json", "checkpoint.pt"
MODEL_NAME, MODEL_CONFIG_NAME = "model.safetensors", "model.json"

EpochCallback = Callable[[int, float], None]


def network_kwargs(segmenter: str, n_classes: int, patch_size: Sequence[int]) -> dict[str, Any]:
    """The MONAI constructor arguments of a segmenter for ``n_classes`` outputs and a patch size."""
    if segmenter == "segresnet":
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": int(n_classes),
                "init_filters": SEGRESNET_INIT_FILTERS, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    if segmenter == "dynunet":
        strides = dynunet_strides(patch_size)
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": int(n_classes),
                "kernel_size": [[3, 3, 3]] * len(strides), "strides": strides, "upsample_kernel_size": strides[1:],
                "filters": list(DYNUNET_FILTERS[: len(strides)]), "norm_name": "instance", "res_block": True}
    raise ConfigError(f"network_kwargs expects a segmenter in {list(MONAI_SEGMENTERS)}, but got "
                      f"segmenter={segmenter!r}.")


def dynunet_strides(patch_size: Sequence[int]) -> list[list[int]]:
    """nnU-Net-style strides: halve each axis while it stays >= 4 voxels (first level stride 1)."""
    size, strides = [int(p) for p in patch_size], [[1, 1, 1]]
    while len(strides) < len(DYNUNET_FILTERS):
        step = [2 if s % 2 == 0 and s // 2 >= DYNUNET_MIN_FEATURE_VOX else 1 for s in size]
        if step == [1, 1, 1]:
            break
        strides.append(step)
        size = [s // k for s, k in zip(size, step)]
    if len(strides) < DYNUNET_MIN_LEVELS:
        raise ConfigError(f"DynUNet expects a patch_size that allows {DYNUNET_MIN_LEVELS - 1} down-samplings, but "
                          f"got patch_size={tuple(patch_size)}. Use 16 voxels or more per axis.")
    return strides


def build_network(segmenter: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Build a MONAI ``SegResNet`` or ``DynUNet`` from :func:`network_kwargs`."""
    from monai.networks.nets import DynUNet, SegResNet

    return SegResNet(**kwargs) if segmenter == "segresnet" else DynUNet(**kwargs)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"MonaiBackend expects an available device, but got device={name!r} without CUDA. "
                          "Use device='cpu'.")
    return device


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prepare_case(case: LabeledCase, structures: Sequence[int], config: UtilityConfig) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(1, X', Y', Z')`` in [0, 1] and class indices ``(1, X', Y', Z')`` on the utility grid."""
    image, label = to_work_grid(case, config.spacing_mm)
    lut = np.zeros(max(int(label.max()), *structures) + 1, dtype=np.int64)
    lut[np.asarray(structures, dtype=np.int64)] = np.arange(1, len(structures) + 1)
    return hu_to_unit(image, INTENSITY_RANGE_HU)[None], lut[label.astype(np.int64)][None]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class MonaiBackend:
    """Train and run a MONAI ``SegResNet`` (``"segresnet"``) or ``DynUNet`` (``"dynunet"``) in-process."""

    def __init__(self, name: str = "segresnet") -> None:
        if name not in MONAI_SEGMENTERS:
            raise ConfigError(f"MonaiBackend expects name in {list(MONAI_SEGMENTERS)}, but got name={name!r}.")
        self.name = name

    # ------------------------------------------------------------------ fit

    def fit_record(self, train: Sequence[LabeledCase], config: UtilityConfig, structures: Sequence[int]) -> dict:
        """What identifies a fit: segmenter, network, budget, seed, structures and the training data."""
        keys = ("spacing_mm", "patch_size", "epochs", "steps_per_epoch", "batch_size", "learning_rate", "seed")
        budget = {k: v for k, v in config.to_dict().items() if k in keys}
        return {"segmenter": self.name, "structures": [int(s) for s in structures], "budget": budget,
                "network": network_kwargs(self.name, len(structures) + 1, config.patch_size),
                "data": fingerprint(train), "n_cases": len(train)}

    def fit(self, train: Sequence[LabeledCase], config: UtilityConfig, workdir: Path, *,
            structures: Sequence[int], callback: EpochCallback | None = None) -> None:
        """Train from scratch, or resume from ``workdir``'s checkpoint (nothing to do when it is finished).

        Args:
            train: training cases (MAISI IDs).
            config: the budget; ``segmenter`` is not read (the backend's name is).
            workdir: checkpoint folder of this fit (one per arm).
            structures: MAISI IDs to learn, in the order of the output classes 1..n.
            callback: called as ``callback(epoch, mean_loss)`` after each epoch's checkpoint is written.

        Raises:
            TrainingDataError: no training cases or no structures.
            CheckpointError: ``workdir`` holds a checkpoint of a different fit.
        """
        structures = [int(s) for s in structures]
        if config.segmenter != self.name:
            raise ConfigError(f"MonaiBackend.fit expects config.segmenter to name this backend ({self.name!r}), but "
                              f"got segmenter={config.segmenter!r}. Use backend_for(config.segmenter).")
        if not train or not structures:
            raise TrainingDataError(f"MonaiBackend.fit expects training cases and structures, but got "
                                    f"{len(train)} cases and structures={structures}.")
        workdir = Path(workdir)
        record = self.fit_record(train, config, structures)
        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        progress = self._progress(workdir, key)
        if progress.get("done"):
            logger.info("%s: fit in %s already done", self.name, workdir)
            return
        device = _device(config.device)
        with _seeded(config.seed, device):
            net = build_network(self.name, record["network"]).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=WEIGHT_DECAY)
        start = int(progress.get("epoch", 0))
        if start:
            state = torch.load(workdir / CHECKPOINT_NAME, map_location=device, weights_only=True)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            logger.info("%s: resuming at epoch %d of %d", self.name, start, config.epochs)
        data = [self._training_item(c, structures, config) for c in train]
        losses = list(progress.get("losses", []))
        for epoch in range(start, config.epochs):
            losses.append(self._train_epoch(net, opt, data, config, epoch, device))
            self._save_checkpoint(workdir, net, opt, key, epoch + 1, losses)
            if callback is not None:
                callback(epoch + 1, losses[-1])
        self._save_model(workdir, net, record, key, losses)

    def _progress(self, workdir: Path, key: str) -> dict:
        path = workdir / PROGRESS_NAME
        if not path.is_file():
            return {}
        progress = json.loads(path.read_text())
        if progress.get("fingerprint") != key:
            raise CheckpointError(
                f"MonaiBackend.fit expects a workdir of the same fit to resume, but got fingerprint="
                f"{str(progress.get('fingerprint'))[:12]} in {str(path)!r} (this fit: {key[:12]}). Use the same "
                "data, structures and budget, or a new workdir."
            )
        return progress

    def _training_item(self, case: LabeledCase, structures: Sequence[int], config: UtilityConfig) -> dict:
        from monai.transforms import FgBgToIndicesd, SpatialPadd

        image, label = prepare_case(case, structures, config)
        item = SpatialPadd(keys=("image", "label"), spatial_size=config.patch_size)({"image": image, "label": label})
        item = FgBgToIndicesd(keys="label")({k: np.asarray(v) for k, v in item.items()})
        for key in ("label_fg_indices", "label_bg_indices"):  # evenly thinned: memory stays flat on fine grids
            indices = np.asarray(item[key])
            if indices.size > PATCH_CENTRE_CAP:
                item[key] = indices[np.linspace(0, indices.size - 1, PATCH_CENTRE_CAP).astype(np.int64)]
        return item

    def _transform(self, config: UtilityConfig):
        from monai.transforms import Compose, RandCropByPosNegLabeld, RandScaleIntensityd, RandShiftIntensityd

        return Compose([
            RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=config.patch_size,
                                   pos=1.0, neg=1.0, num_samples=1, fg_indices_key="label_fg_indices",
                                   bg_indices_key="label_bg_indices"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ])

    def _train_epoch(self, net: torch.nn.Module, opt: torch.optim.Optimizer, data: list[dict],
                     config: UtilityConfig, epoch: int, device: torch.device) -> float:
        from monai.losses import DiceCELoss

        loss_fn, transform = DiceCELoss(to_onehot_y=True, softmax=True), self._transform(config)
        for group in opt.param_groups:
            group["lr"] = config.learning_rate * (1.0 - epoch / config.epochs) ** POLY_EXPONENT
        net.train()
        total = 0.0
        for step in range(config.steps_per_epoch):
            seed = _step_seed(config.seed, epoch, step)
            rng = np.random.default_rng(seed)
            transform.set_random_state(seed=seed)
            picks = [transform(data[int(rng.integers(len(data)))])[0] for _ in range(config.batch_size)]
            images = torch.stack([torch.as_tensor(np.asarray(p["image"]), dtype=torch.float32) for p in picks])
            targets = torch.stack([torch.as_tensor(np.asarray(p["label"]), dtype=torch.long) for p in picks])
            with _seeded(seed, device):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(images.to(device)), targets.to(device))
                loss.backward()
                opt.step()
            total += float(loss.detach())
            if not np.isfinite(total):
                raise ConfigError(f"MonaiBackend.fit expects finite losses, but got loss={float(loss)} at epoch "
                                  f"{epoch + 1} step {step + 1}. Lower the learning rate.")
        return total / config.steps_per_epoch

    def _save_checkpoint(self, workdir: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, key: str,
                         epoch: int, losses: list[float]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "optimizer": opt.state_dict()}
        _write_atomic(workdir / CHECKPOINT_NAME, lambda p: torch.save(state, p))
        progress = {"fingerprint": key, "epoch": epoch, "done": False, "losses": losses}
        _write_atomic(workdir / PROGRESS_NAME, lambda p: p.write_text(json.dumps(progress, indent=2)))

    def _save_model(self, workdir: Path, net: torch.nn.Module, record: dict, key: str, losses: list[float]) -> None:
        from safetensors.torch import save_model

        workdir.mkdir(parents=True, exist_ok=True)  # save_model stores tensors DynUNet shares between modules once
        _write_atomic(workdir / MODEL_NAME, lambda p: save_model(net, str(p)))
        meta = {k: record[k] for k in ("segmenter", "structures", "network", "budget")} | {"fingerprint": key}
        _write_atomic(workdir / MODEL_CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2)))
        progress = {"fingerprint": key, "epoch": record["budget"]["epochs"], "done": True, "losses": losses}
        _write_atomic(workdir / PROGRESS_NAME, lambda p: p.write_text(json.dumps(progress, indent=2)))

    # ------------------------------------------------------------------ predict

    def load_model(self, workdir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
        """The finished network of ``workdir`` (eval mode) and its ``model.json``."""
        from safetensors.torch import load_model

        workdir = Path(workdir)
        if not (workdir / MODEL_NAME).is_file() or not (workdir / MODEL_CONFIG_NAME).is_file():
            raise WeightsNotFoundError(f"MonaiBackend.predict expects a finished fit in workdir, but got "
                                       f"workdir={str(workdir)!r} without {MODEL_NAME}. Run fit first.")
        meta = json.loads((workdir / MODEL_CONFIG_NAME).read_text())
        if meta["segmenter"] != self.name:
            raise CheckpointError(f"MonaiBackend.predict expects a {self.name} model, but got "
                                  f"segmenter={meta['segmenter']!r} in {str(workdir)!r}.")
        net = build_network(self.name, meta["network"])
        load_model(net, str(workdir / MODEL_NAME), strict=True)
        return net.to(device).eval(), meta

    @torch.no_grad()
    def predict(self, cases: Sequence[LabeledCase], config: UtilityConfig, workdir: Path) -> dict[str, np.ndarray]:
        """Segment each case (sliding window over the utility grid); MAISI IDs on the case's own grid."""
        from monai.inferers import sliding_window_inference

        device = _device(config.device)
        net, meta = self.load_model(workdir, device)
        for name in ("spacing_mm", "patch_size"):
            if list(getattr(config, name)) != list(meta["budget"][name]):
                raise CheckpointError(
                    f"MonaiBackend.predict expects the {name} the model was trained with, but got "
                    f"{name}={getattr(config, name)} (trained: {tuple(meta['budget'][name])}). Use the fit's config.")
        ids = np.asarray([0, *meta["structures"]], dtype=np.uint8)
        out = {}
        for case in cases:
            image, _ = prepare_case(case, meta["structures"], config)
            logits = sliding_window_inference(torch.as_tensor(image[None], device=device), config.patch_size,
                                              config.batch_size, net, overlap=SW_OVERLAP, mode="gaussian")
            classes = torch.as_tensor(logits).argmax(dim=1)[0].cpu().numpy()
            out[case.case_id] = from_work_grid(ids[classes], case)
        return out
