"""The loss and loss-weight helpers the training stages of :mod:`maisi_core.training.pipeline` share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from maisi_core.anatomy.labels import BACKGROUND_ID, BODY_ID, TUMOR_IDS
from maisi_core.training.config import THIN_STRUCTURE_IDS, TrainingConfig

__all__ = ["roi_weights", "weighted_loss"]


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, kind: str) -> torch.Tensor:
    err = (pred.float() - target.float()).abs() if kind == "l1" else (pred.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[1])


def roi_weights(label_maps: np.ndarray, factor: int, cfg: TrainingConfig) -> torch.Tensor | None:
    """(B, 1, x, y, z) loss weights of the voxels of label maps (B, X, Y, Z) pooled by ``factor``.

    ``cfg.roi_loss_weight`` on (latent) voxels covering organ/tumour labels, times ``cfg.tumor_loss_weight``
    on those covering a tumour and ``cfg.thin_loss_weight`` on those covering a thin structure, 1
    elsewhere; None when all three are 1.
    """
    weight, tumor_weight, thin_weight = cfg.roi_loss_weight, cfg.tumor_loss_weight, cfg.thin_loss_weight
    if weight == 1.0 and tumor_weight == 1.0 and thin_weight == 1.0:
        return None
    lab = torch.from_numpy(np.ascontiguousarray(label_maps))[:, None]
    roi = F.max_pool3d(((lab != BACKGROUND_ID) & (lab != BODY_ID)).float(), kernel_size=factor, stride=factor)
    out = 1.0 + (weight - 1.0) * roi
    for ids, extra in ((TUMOR_IDS, tumor_weight), (THIN_STRUCTURE_IDS, thin_weight)):
        if extra != 1.0:
            hit = torch.isin(lab, torch.tensor(ids, dtype=lab.dtype)).float()
            out = out * (1.0 + (extra - 1.0) * F.max_pool3d(hit, kernel_size=factor, stride=factor))
    return out
