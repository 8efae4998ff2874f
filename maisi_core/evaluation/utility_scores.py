"""Scores of one arm on the held-out real test set, and their bootstrap summary over arms.

Rule for a structure absent from both the truth and the prediction of a case: it is **excluded** from that
case (no Dice, no surface Dice), not counted as 1.0; absent from one side only scores 0. Dice and surface
Dice (normalised surface distance at ``nsd_tolerance_mm``) come from MONAI's ``compute_dice`` and
``compute_surface_dice`` on the case's own grid and spacing. Confidence intervals are percentile bootstrap
95 % intervals over test cases; deltas against the baseline arm resample the test cases in pairs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.errors import ConfigError, TrainingDataError

if TYPE_CHECKING:
    from maisi_core.evaluation.utility import UtilityConfig
    from maisi_core.evaluation.utility_data import LabeledCase

CI_LEVEL = 0.95
MEAN_ROW = "mean"


@dataclass(frozen=True)
class ArmScores:
    """Per-case, per-structure scores of one arm.

    Attributes:
        arm: the arm's name.
        dice: case_id -> structure ID -> Dice (structures absent from truth and prediction left out).
        surface_dice: case_id -> structure ID -> surface Dice, same keys as ``dice``.
    """

    arm: str
    dice: dict[str, dict[int, float]]
    surface_dice: dict[str, dict[int, float]]

    def to_dict(self) -> dict:
        """JSON-able form (structure IDs as string keys)."""
        return {"arm": self.arm,
                "dice": {c: {str(s): v for s, v in d.items()} for c, d in self.dice.items()},
                "surface_dice": {c: {str(s): v for s, v in d.items()} for c, d in self.surface_dice.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArmScores:
        """Inverse of :meth:`to_dict`."""
        return cls(str(d["arm"]),
                   {c: {int(s): float(v) for s, v in x.items()} for c, x in d["dice"].items()},
                   {c: {int(s): float(v) for s, v in x.items()} for c, x in d["surface_dice"].items()})


def _crop_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel (surfaces and Dice are unchanged inside it)."""
    coords = np.argwhere(a | b)
    lo = np.maximum(coords.min(axis=0) - 1, 0)
    hi = np.minimum(coords.max(axis=0) + 2, a.shape)
    return tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))


def score_structure(pred: np.ndarray, truth: np.ndarray, *, spacing_mm: Sequence[float],
                    tolerance_mm: float) -> tuple[float, float] | None:
    """Dice and surface Dice of two boolean masks ``(X, Y, Z)``; None when both are empty (excluded)."""
    import torch
    from monai.metrics import compute_dice, compute_surface_dice

    if not pred.any() and not truth.any():
        return None
    box = _crop_box(pred, truth)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].float()
    y = torch.from_numpy(np.ascontiguousarray(truth[box]))[None, None].float()
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    with warnings.catch_warnings():  # MONAI warns of an empty side, which the rule above scores as 0
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = float(compute_surface_dice(y_pred, y, [float(tolerance_mm)], include_background=True,
                                         spacing=[float(s) for s in spacing_mm])[0, 0])
    return dice, (0.0 if math.isnan(nsd) else nsd)


def score_cases(pred: Mapping[str, np.ndarray], cases: Sequence[LabeledCase], structures: Sequence[int],
                config: UtilityConfig, *, arm: str = "") -> ArmScores:
    """Score predictions against the truth of every case, per structure.

    Args:
        pred: case_id -> predicted MAISI IDs on the case's own grid (same shape as ``case.label``).
        cases: the test cases (truth).
        structures: MAISI IDs to score.
        config: gives ``nsd_tolerance_mm``.
        arm: the arm's name recorded in the result.

    Raises:
        TrainingDataError: a case has no prediction, or a prediction of another shape.
    """
    dice: dict[str, dict[int, float]] = {}
    nsd: dict[str, dict[int, float]] = {}
    for case in cases:
        if case.case_id not in pred:
            raise TrainingDataError(f"score_cases expects a prediction for every test case, but got none for "
                                    f"case_id={case.case_id!r}.")
        p = np.asarray(pred[case.case_id])
        if p.shape != case.label.shape:
            raise TrainingDataError(f"score_cases expects predictions on the case's grid, but got shape={p.shape} "
                                    f"for case_id={case.case_id!r} (label shape {case.label.shape}).")
        dice[case.case_id], nsd[case.case_id] = {}, {}
        for s in structures:
            result = score_structure(p == int(s), case.label == int(s), spacing_mm=case.spacing_mm,
                                     tolerance_mm=config.nsd_tolerance_mm)
            if result is not None:
                dice[case.case_id][int(s)], nsd[case.case_id][int(s)] = result
    return ArmScores(arm, dice, nsd)


# ----------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class UtilitySummary:
    """The utility table: one row per (arm, structure) and a ``"mean"`` row per arm.

    Row keys: ``arm``, ``structure`` (ID or ``"mean"``), ``name``, ``n_cases``, ``dice``, ``dice_ci``
    (lo, hi), ``surface_dice``, ``surface_dice_ci``, ``delta_dice``, ``delta_dice_ci``,
    ``delta_surface_dice``, ``delta_surface_dice_ci`` (paired against the baseline; None for the
    baseline), plus ``n_paired`` (cases in the paired comparison). Means are None where no case counts.
    """

    rows: tuple[dict, ...]
    baseline: str = "real"
    bootstrap: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-able form (intervals as lists)."""
        rows = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in self.rows]
        return {"rows": rows, "baseline": self.baseline, "bootstrap": self.bootstrap, "seed": self.seed,
                "ci_level": CI_LEVEL}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UtilitySummary:
        """Inverse of :meth:`to_dict`."""
        rows = tuple({k: (tuple(v) if isinstance(v, list) else v) for k, v in r.items()} for r in d["rows"])
        return cls(rows, str(d.get("baseline", "real")), int(d.get("bootstrap", 1000)), int(d.get("seed", 0)))

    def mean_delta(self) -> dict[str, float]:
        """Arm -> mean Dice delta against the baseline (the ``"mean"`` rows; baseline left out)."""
        return {r["arm"]: r["delta_dice"] for r in self.rows
                if r["structure"] == MEAN_ROW and r["arm"] != self.baseline and r["delta_dice"] is not None}


def _bootstrap_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float] | None:
    """Percentile 95 % interval of the mean of ``values`` over ``n_boot`` resamples (None when empty)."""
    if values.size == 0:
        return None
    rng = np.random.default_rng([int(seed), values.size])
    means = values[rng.integers(0, values.size, size=(int(n_boot), values.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _per_case(metric: Mapping[str, Mapping[int, float]], structure: int | str,
              keep: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
    """case_id -> value of one structure, or of the case's mean over structures (``keep`` limits them)."""
    out = {}
    for case_id, per in metric.items():
        if structure == MEAN_ROW:
            ids = [s for s in per if keep is None or s in keep.get(case_id, ())]
            if ids:
                out[case_id] = float(np.mean([per[s] for s in ids]))
        elif structure in per:
            out[case_id] = float(per[structure])
    return out


def _arm_rows(arm: str, scores: ArmScores, base: ArmScores | None, structures: Sequence[int | str],
              bootstrap: int, seed: int) -> list[dict]:
    rows = []
    shared = None
    if base is not None:
        shared = {c: [s for s in scores.dice.get(c, {}) if s in base.dice.get(c, {})] for c in scores.dice}
    for s in structures:
        row: dict[str, Any] = {"arm": arm, "structure": s,
                               "name": MEAN_ROW if s == MEAN_ROW else labels.label_name(int(s))}
        for key, metric in (("dice", scores.dice), ("surface_dice", scores.surface_dice)):
            vals = np.asarray([v for _, v in sorted(_per_case(metric, s).items())], dtype=np.float64)
            row["n_cases"] = int(vals.size)
            row[key], row[f"{key}_ci"] = _mean(vals), _bootstrap_ci(vals, bootstrap, seed)
            if base is None:
                row[f"delta_{key}"], row[f"delta_{key}_ci"], row["n_paired"] = None, None, None
                continue
            mine = _per_case(metric, s, shared)
            theirs = _per_case(getattr(base, key), s, shared)
            paired = sorted(set(mine) & set(theirs))
            diffs = np.asarray([mine[c] - theirs[c] for c in paired], dtype=np.float64)
            row[f"delta_{key}"], row[f"delta_{key}_ci"] = _mean(diffs), _bootstrap_ci(diffs, bootstrap, seed)
            row["n_paired"] = len(paired)
        rows.append(row)
    return rows


def summarise(scores: Mapping[str, ArmScores], *, baseline: str = "real", bootstrap: int, seed: int) -> UtilitySummary:
    """Bootstrap the arms' scores into the utility table.

    Each structure's value is the mean over the test cases that score it; its interval resamples those
    cases. A ``"mean"`` row per arm averages each case's structures first. Deltas are paired: the cases
    (and, for the mean row, the structures of each case) scored in both the arm and the baseline, resampled
    together. Resamples are drawn from ``seed`` and the number of cases, so every arm sees the same draws.

    Args:
        scores: arm name -> its scores (the mapping's keys name the arms, in order).
        baseline: the arm deltas are taken against.
        bootstrap: number of resamples.
        seed: seed of the resamples.

    Raises:
        ConfigError: ``baseline`` is not among the arms, or ``bootstrap < 1``.
    """
    if baseline not in scores:
        raise ConfigError(f"summarise expects the baseline among the arms {list(scores)}, but got "
                          f"baseline={baseline!r}. Score the real-only arm too.")
    if int(bootstrap) < 1:
        raise ConfigError(f"summarise expects bootstrap >= 1, but got bootstrap={bootstrap}.")
    structures = sorted({s for arm in scores.values() for per in arm.dice.values() for s in per})
    rows = []
    for name, arm_scores in scores.items():
        base = None if name == baseline else scores[baseline]
        rows += _arm_rows(name, arm_scores, base, [*structures, MEAN_ROW], int(bootstrap), int(seed))
    return UtilitySummary(tuple(rows), baseline, int(bootstrap), int(seed))
