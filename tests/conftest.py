"""Shared fixtures: tiny components (32³ image / 8³ latent) and a small labelled volume."""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _fast_image_distance(monkeypatch):
    """Dataset metrics in tests use the fast fallback (FRD v1 takes ~20 s a volume); tests/test_frd.py asks for it."""
    monkeypatch.setattr("factory.validate.DEFAULT_IMAGE_DISTANCE", "fallback")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's training tests, restored afterwards: on a busy shared CPU two OpenMP
    threads spin-wait and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipe():
    return tiny_components()


@pytest.fixture()
def label_map() -> np.ndarray:
    return make_label_map()


_SERVICE_SWITCHES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


@pytest.fixture(scope="session")
def prefect_backend():
    """One Prefect test server for the session; heartbeat, task-run recorder and event persister off."""
    old = {k: os.environ.get(k) for k in _SERVICE_SWITCHES}
    os.environ.update(_SERVICE_SWITCHES)
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
