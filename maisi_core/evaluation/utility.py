"""Downstream utility: does synthetic data help a segmenter trained on real CT?

The same segmenter is trained with the same budget and seeds on several arms (real only; real plus
synthetic at ratios; synthetic only), each is scored on a held-out real test set (per-structure Dice and
surface Dice) and the arms are compared with real-only by paired bootstrap over test cases.

The pieces, in the order a run uses them:

1. :func:`load_labeled_folder` reads the real and synthetic folders (:class:`LabeledCase`, MAISI IDs);
   :func:`fingerprint` identifies the real data without keeping it.
2. :func:`make_arms` draws the arms' training sets (:class:`Arm`).
3. :func:`backend_for` gives a :class:`SegmenterBackend`: ``"segresnet"`` and ``"dynunet"`` are MONAI
   networks trained in-process (:mod:`maisi_core.evaluation.utility_monai`); ``"nnunet"`` is nnU-Net v2
   (:mod:`maisi_core.evaluation.utility_nnunet`). ``fit`` resumes from the checkpoint in its workdir.
4. :func:`score_cases` scores one arm's predictions (:class:`ArmScores`); :func:`summarise` makes the
   table with intervals and deltas (:class:`UtilitySummary`).

This module imports neither torch nor MONAI; the backends and scoring load them when called.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.errors import ConfigError, TrainingDataError, did_you_mean
from maisi_core.evaluation.utility_data import LabeledCase, fingerprint, load_labeled_folder
from maisi_core.evaluation.utility_scores import ArmScores, UtilitySummary, score_cases, summarise

__all__ = [
    "UTILITY_SEGMENTERS", "Arm", "ArmScores", "LabeledCase", "SegmenterBackend", "UtilityConfig", "UtilitySummary",
    "backend_for", "fingerprint", "load_labeled_folder", "make_arms", "resolve_structures", "score_cases",
    "summarise",
]

UTILITY_SEGMENTERS = ("segresnet", "dynunet", "nnunet")
PATCH_MULTIPLE_VOX = 8  # three 2x down-samplings in the MONAI networks
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class UtilityConfig:
    """The training budget and scoring settings, identical for every arm.

    Attributes:
        segmenter: one of :data:`UTILITY_SEGMENTERS`.
        structures: MAISI IDs trained and scored; ``()`` means every ID except 0 and body 200 present in
            the real labels (:func:`resolve_structures`).
        spacing_mm: every case is resampled to this grid (labels nearest) for training and prediction.
        patch_size: training patch and sliding-window size ``(X, Y, Z)``, multiples of 8.
        epochs: epochs of training.
        steps_per_epoch: optimiser steps per epoch. An epoch is a fixed number of steps (as in nnU-Net),
            not a pass over the data, so an arm with more cases gets no more training.
        batch_size: patches per step.
        learning_rate: peak learning rate (AdamW, polynomial decay over epochs).
        seed: seed of initialisation and of every step's draws; the same in every arm.
        bootstrap: bootstrap resamples over test cases for the 95 % intervals.
        nsd_tolerance_mm: surface Dice tolerance.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a runtime setting; determinism is exact on CPU).
    """

    segmenter: str = "segresnet"
    structures: tuple[int, ...] = ()
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    epochs: int = 20
    steps_per_epoch: int = 25
    batch_size: int = 2
    learning_rate: float = 1e-3
    seed: int = 0
    bootstrap: int = 1000
    nsd_tolerance_mm: float = 6.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        who = "UtilityConfig"
        if self.segmenter not in UTILITY_SEGMENTERS:
            raise ConfigError(f"{who} expects segmenter in {list(UTILITY_SEGMENTERS)}, but got "
                              f"segmenter={self.segmenter!r}.{did_you_mean(self.segmenter, UTILITY_SEGMENTERS)}")
        structures = tuple(sorted({int(s) for s in self.structures}))
        bad = [s for s in structures if s not in labels.known_ids() or s == labels.BACKGROUND_ID]
        if bad:
            raise ConfigError(f"{who} expects structures that are MAISI IDs other than 0, but got "
                              f"structures={bad}. See maisi_core.anatomy.labels.label_dict().")
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ConfigError(f"{who} expects spacing_mm as three positive numbers, but got "
                              f"spacing_mm={self.spacing_mm!r}.")
        patch = tuple(int(s) for s in self.patch_size)
        if len(patch) != 3 or any(p < PATCH_MULTIPLE_VOX or p % PATCH_MULTIPLE_VOX for p in patch):
            raise ConfigError(f"{who} expects patch_size as three multiples of {PATCH_MULTIPLE_VOX}, but got "
                              f"patch_size={self.patch_size!r}. Try (32, 32, 32).")
        for name in ("epochs", "steps_per_epoch", "batch_size", "bootstrap"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{who} expects {name} >= 1, but got {name}={getattr(self, name)}.")
        if not (math.isfinite(float(self.learning_rate)) and float(self.learning_rate) > 0):
            raise ConfigError(f"{who} expects learning_rate > 0, but got learning_rate={self.learning_rate}.")
        if int(self.seed) < 0:
            raise ConfigError(f"{who} expects seed >= 0, but got seed={self.seed}.")
        if not float(self.nsd_tolerance_mm) >= 0:
            raise ConfigError(f"{who} expects nsd_tolerance_mm >= 0, but got nsd_tolerance_mm={self.nsd_tolerance_mm}.")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"{who} expects device 'cpu', 'cuda', 'cuda:N' or 'mps', but got device={self.device!r}.")
        for name, value in (("structures", structures), ("spacing_mm", spacing), ("patch_size", patch)):
            object.__setattr__(self, name, value)

    @classmethod
    def tiny(cls) -> UtilityConfig:
        """Seconds on a CPU (tests): 16³ patches at 6 mm, 2 epochs of 2 steps, 200 resamples."""
        return cls(patch_size=(16, 16, 16), epochs=2, steps_per_epoch=2, batch_size=2, bootstrap=200)

    @classmethod
    def full(cls) -> UtilityConfig:
        """A real comparison (hours on a GPU): 1.5 mm, 96³ patches, 200 epochs of 250 steps."""
        return cls(spacing_mm=(1.5, 1.5, 1.5), patch_size=(96, 96, 96), epochs=200, steps_per_epoch=250,
                   batch_size=2, learning_rate=1e-3, nsd_tolerance_mm=2.0, bootstrap=1000)

    def to_dict(self) -> dict:
        """JSON-able form (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UtilityConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"UtilityConfig expects keys from {sorted(names)}, but got unknown keys={unknown}."
                              f"{did_you_mean(unknown[0], names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def resolve_structures(config: UtilityConfig, real_cases: Sequence[LabeledCase]) -> tuple[int, ...]:
    """The structures to train and score: ``config.structures``, or every ID but 0 and 200 in the real labels."""
    if config.structures:
        return config.structures
    present = set()
    for case in real_cases:
        present.update(int(v) for v in np.unique(case.label))
    found = tuple(sorted(present - {labels.BACKGROUND_ID, labels.BODY_ID}))
    if not found:
        raise TrainingDataError("resolve_structures expects real labels with at least one structure besides 0 and "
                                "200, but got none. Check the label mapping.")
    return found


# ----------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One training set of the comparison.

    Attributes:
        name: ``"real"``, ``"real+synth_1to<r>"`` or ``"synth_only"``.
        real_ids: real case ids trained on.
        synthetic_ids: synthetic case ids trained on.
        ratio: synthetic cases per real case; None for ``"real"``, ``math.inf`` for ``"synth_only"``.
    """

    name: str
    real_ids: tuple[str, ...]
    synthetic_ids: tuple[str, ...]
    ratio: float | None


def _ratio_name(ratio: float) -> str:
    return f"real+synth_1to{float(ratio):g}"


def make_arms(real_ids: Sequence[str], synthetic_ids: Sequence[str], ratios: Sequence[float], *,
              synthetic_only: bool, seed: int) -> list[Arm]:
    """Return the arms: ``"real"`` first, one per ratio, then ``"synth_only"`` when asked.

    Ratio ``r`` adds ``round(r * len(real_ids))`` synthetic cases drawn from one seeded permutation, so a
    smaller ratio's cases are a subset of a larger one's. ``"synth_only"`` trains on every synthetic case.

    Raises:
        TrainingDataError: no real cases, repeated or shared ids, or fewer synthetic cases than a ratio asks.
        ConfigError: a ratio that is not a positive finite number, repeated ratios, or one that gives 0 cases.
    """
    real, synth = tuple(str(i) for i in real_ids), tuple(str(i) for i in synthetic_ids)
    _check_ids(real, synth)
    rs = [float(r) for r in ratios]
    if any(not (math.isfinite(r) and r > 0) for r in rs) or len(set(rs)) != len(rs):
        raise ConfigError(f"make_arms expects distinct positive finite ratios, but got ratios={list(ratios)}.")
    order = [synth[i] for i in np.random.default_rng([int(seed), 0xA125]).permutation(len(synth))]
    arms = [Arm("real", tuple(sorted(real)), (), None)]
    for r in rs:
        n = int(round(r * len(real)))
        if n < 1:
            raise ConfigError(f"make_arms expects ratios that add at least one synthetic case, but got ratio={r} "
                              f"with {len(real)} real cases. Use a larger ratio.")
        if n > len(synth):
            raise TrainingDataError(
                f"make_arms expects at least {n} synthetic cases for ratio={r} ({len(real)} real cases), but got "
                f"{len(synth)}. Generate more or use ratios up to {len(synth) / len(real):.3g}.")
        arms.append(Arm(_ratio_name(r), tuple(sorted(real)), tuple(sorted(order[:n])), r))
    if synthetic_only:
        if not synth:
            raise TrainingDataError("make_arms expects synthetic cases for the synth_only arm, but got "
                                    "synthetic_ids=(). Pass synthetic_only=False.")
        arms.append(Arm("synth_only", (), tuple(sorted(synth)), math.inf))
    return arms


def _check_ids(real: tuple[str, ...], synth: tuple[str, ...]) -> None:
    if not real:
        raise TrainingDataError("make_arms expects at least one real case, but got real_ids=(). "
                                "The real-only arm is the baseline.")
    for name, ids in (("real_ids", real), ("synthetic_ids", synth)):
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise TrainingDataError(f"make_arms expects unique case ids, but got repeated {name}={dup[:5]}.")
    both = sorted(set(real) & set(synth))
    if both:
        raise TrainingDataError(f"make_arms expects real and synthetic case ids to differ, but got shared "
                                f"ids={both[:5]}. Prefix one set (e.g. 'synth_').")


# ----------------------------------------------------------------------------------------- backends


@runtime_checkable
class SegmenterBackend(Protocol):
    """A segmenter the utility test can train and run."""

    name: str

    def fit(self, train: Sequence[LabeledCase], config: UtilityConfig, workdir: Path, *,
            structures: Sequence[int]) -> None:
        """Train from scratch, or resume from the checkpoint kept in ``workdir``; same inputs and seed, same weights."""
        ...

    def predict(self, cases: Sequence[LabeledCase], config: UtilityConfig, workdir: Path) -> dict[str, np.ndarray]:
        """case_id -> predicted MAISI IDs on each case's own grid (same shape as ``case.label``)."""
        ...


def backend_for(name: str) -> SegmenterBackend:
    """Return the backend for a segmenter name (see :data:`UTILITY_SEGMENTERS`).

    Raises:
        ConfigError: an unknown name.
        NnUNetNotInstalledError: ``"nnunet"`` without the ``nnunetv2`` package (an ``ImportError``).
    """
    if name not in UTILITY_SEGMENTERS:
        raise ConfigError(f"backend_for expects a segmenter in {list(UTILITY_SEGMENTERS)}, but got name={name!r}."
                          f"{did_you_mean(name, UTILITY_SEGMENTERS)}")
    if name == "nnunet":
        module = importlib.import_module("maisi_core.evaluation.utility_nnunet")
        module.check_nnunet_installed()
        return module.NnUNetBackend()
    from maisi_core.evaluation.utility_monai import MonaiBackend

    return MonaiBackend(name)
