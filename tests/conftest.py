"""Shared fixtures: tiny components (32³ image / 8³ latent) and a small labelled volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def make_label_map(size: int = 32) -> np.ndarray:
    """A (size, size, size) MAISI label map: body 200 with a liver (1), spleen (3) and left lung lobe (28)."""
    lm = np.zeros((size, size, size), dtype=np.uint8)
    q = size // 8
    lm[q:-q, q:-q, q:-q] = 200
    lm[2 * q:4 * q, 2 * q:4 * q, 2 * q:5 * q] = 1
    lm[5 * q:6 * q, 2 * q:4 * q, 2 * q:5 * q] = 3
    lm[4 * q:6 * q, 4 * q:6 * q, 5 * q:7 * q - 1] = 28
    return lm


def tiny_components(device: str = "cpu"):
    """Return a tiny pipeline with seeded random weights."""
    from maisi_core import MaisiPipeline, presets

    return MaisiPipeline.from_config(presets.tiny(), device=device, init_seed=0)


@pytest.fixture(scope="session")
def tiny_pipe():
    return tiny_components()


@pytest.fixture()
def label_map() -> np.ndarray:
    return make_label_map()
