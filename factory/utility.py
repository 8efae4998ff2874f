"""Downstream utility: does adding a dataset's synthetic cases help a segmenter on real data?

Plain functions (no Prefect) behind ``ctfactory utility ROOT --real DIR`` (``flows.utility``). The same
segmenter is trained with the same budget and seeds in several arms: real cases only, real plus synthetic
cases at the asked ratios, optionally synthetic only. Each arm is scored on held-out real cases (``--test``,
or a seeded split of ``--real`` that never overlaps training) and, optionally, an out-of-distribution set;
the summary (per-structure Dice and surface Dice with bootstrap 95 % CIs, deltas against real only) comes
from :mod:`maisi_core.evaluation.utility`.

Synthetic cases are the catalog's passing rows at a ``samples`` version, read through the dataset root.
Each arm trains in ``ROOT/utility/<samples version>/<key>/<arm>/``, where ``key`` (12 hex digits) is a hash
of everything the training depends on; the backend keeps its checkpoint there, so a crashed arm resumes and a
finished arm is not trained again. Results go to a new ``datasets`` row (``utility_*`` columns); the real
data is recorded only as its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalog.root import DatasetRoot
from catalog.store import Catalog
from factory.errors import FactoryError, ValidationInputError

logger = logging.getLogger(__name__)

UTILITY_DIR = "utility"
TEST_FRACTION = 0.25  # share of --real held out for testing when no --test is given
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_NOT_TRAINING = ("bootstrap", "nsd_tolerance_mm", "device")  # config fields the weights do not depend on


class ArmsCrashedError(FactoryError, RuntimeError):
    """Raised when training arms ended without scores; a re-run resumes them from their checkpoints."""

    def __init__(self, crashed: Sequence[str]) -> None:
        self.crashed = tuple(crashed)
        super().__init__(f"downstream_utility expects every arm to finish, but got {len(self.crashed)} crashed "
                         f"arm(s), first {self.crashed[0] if self.crashed else '-'}. Finished arms keep their "
                         "checkpoints; fix the cause and run again to resume.")

    def __reduce__(self):  # picklable across Prefect and Dask
        return (type(self), (self.crashed,))


class UtilityRequest(BaseModel):
    """What to measure (the flow's validated parameter).

    Attributes:
        real: labelled real cases (an nnU-Net-style folder, see ``load_labeled_folder``).
        test: held-out real test cases; None splits ``test_fraction`` of ``real`` off (seeded).
        ood: an optional out-of-distribution test set, scored separately.
        ratios: synthetic cases per real training case, one arm each.
        synthetic_only: add an arm trained on synthetic cases only.
        as_of: the ``samples`` version whose passing cases are the synthetic pool (None: the newest).
        test_fraction: share of ``real`` held out when ``test`` is None.
        label_mapping: how the real labels map to MAISI IDs (``maisi`` or ``totalsegmentator``).
        config: ``UtilityConfig.to_dict()``: segmenter, budget, seeds, device.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    real: str = Field(min_length=1)
    test: str | None = None
    ood: str | None = None
    ratios: tuple[float, ...] = (1.0,)
    synthetic_only: bool = False
    as_of: int | None = Field(None, ge=0)
    test_fraction: float = Field(TEST_FRACTION, ge=0.2, le=0.3)
    label_mapping: str = "maisi"
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("ratios")
    @classmethod
    def _positive_ratios(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [r for r in value if not (math.isfinite(r) and r > 0)]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"UtilityRequest expects distinct finite ratios > 0, but got ratios={list(value)}.")
        return value

    def utility_config(self) -> Any:
        """The :class:`~maisi_core.evaluation.utility.UtilityConfig` every arm trains with."""
        return _lib().UtilityConfig.from_dict(self.config)


@dataclass(frozen=True)
class UtilityPlan:
    """The arms of one measurement and what they train and test on (ids only, no arrays).

    Attributes:
        samples_version: the catalog version of the synthetic pool.
        real_fingerprint: sha256 of every case of ``--real`` (the only trace of the real data kept).
        train_ids, test_ids: the real cases trained on and tested on (never overlapping).
        test_source: how the test set was chosen (the ``utility_test`` column).
        structures: MAISI IDs scored.
        arms: ``Arm`` objects, "real" first.
        key: 12 hex digits naming the arms' work folders.
    """

    samples_version: int
    real_fingerprint: str
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    test_source: str
    structures: tuple[int, ...]
    arms: tuple[Any, ...]
    key: str


@dataclass(frozen=True)
class ArmResult:
    """One arm's scores on the test set and, when given, on the OOD set."""

    arm: str
    test: Any
    ood: Any = None


def _lib():
    from maisi_core.evaluation import utility

    return utility


# -- data ---------------------------------------------------------------------------------------------

def load_real_cases(folder: str | Path, *, label_mapping: str = "maisi", what: str = "--real") -> list[Any]:
    """The labelled cases of ``folder`` (sorted by case id); refuses a missing or empty folder."""
    path = Path(folder)
    if not path.is_dir():
        raise ValidationInputError(f"ctfactory utility expects {what} to be a folder, but got {what}={str(folder)!r}.")
    cases = _lib().load_labeled_folder(path, label_mapping=label_mapping)
    if not cases:
        raise ValidationInputError(
            f"ctfactory utility expects labelled cases in {what}, but got none in {str(folder)!r}. "
            "Use imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz (or images/ + labels/ of the same names).")
    return list(cases)


def split_test(ids: Sequence[str], *, fraction: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split case ids into (train, test): a seeded draw of ``round(fraction * n)`` (at least 1) test cases."""
    ids = sorted(ids)
    if len(ids) < 3:
        raise ValidationInputError(f"ctfactory utility expects at least 3 real cases to split off a test set, but got "
                                   f"n_real={len(ids)}. Add cases or give --test.")
    n_test = max(1, round(fraction * len(ids)))
    order = np.random.default_rng([int(seed), 20_251_015]).permutation(len(ids))
    test = {ids[i] for i in order[:n_test]}
    return tuple(i for i in ids if i not in test), tuple(i for i in ids if i in test)


def passing_rows(cat: Catalog, *, as_of: int | None) -> tuple[int, list[dict[str, Any]]]:
    """The ``samples`` version and its passing rows (``sample_id``, image and label URIs), sorted by id."""
    import pyarrow.compute as pc

    if not cat.exists("samples"):
        raise ValidationInputError(f"ctfactory utility expects a catalog with samples, but got root={cat.root_uri!r} "
                                   "without one. Run `ctfactory run SPEC` first.")
    version = cat.delta_table("samples", version=as_of).version()
    where = (pc.field("status") == "passed") & (pc.field("qc_pass") == True)  # noqa: E712 (an Arrow expression)
    rows = cat.read_table("samples", as_of=version, filter=where,
                          columns=["sample_id", "image_uri", "label_uri"]).to_pylist()
    if not rows:
        raise ValidationInputError(f"ctfactory utility expects passing cases in the catalog, but got none at samples "
                                   f"version={version}. Generate cases that pass QC first.")
    return version, sorted(rows, key=lambda r: r["sample_id"])


def load_synthetic_cases(root: DatasetRoot, sample_ids: Sequence[str], *, version: int) -> list[Any]:
    """The passing cases ``sample_ids`` at ``version`` as labelled cases, read through the root's path rule."""
    from maisi_core.io import load_image, load_label

    wanted = set(sample_ids)
    rows = [r for r in passing_rows(root.catalog(), as_of=version)[1] if r["sample_id"] in wanted]
    opts = root.fsspec_options() or None
    out = []
    for r in rows:
        image = load_image(root.resolve(r["image_uri"]), storage_options=opts)
        label = load_label(root.resolve(r["label_uri"]), storage_options=opts)
        out.append(_lib().LabeledCase(r["sample_id"], image.array.astype(np.float32), label.array, image.affine))
    return out


# -- plan and arms --------------------------------------------------------------------------------------

def plan_utility(root: DatasetRoot, request: UtilityRequest) -> UtilityPlan:
    """Load the real cases once, split them, list the synthetic pool and draw the arms (see :class:`UtilityPlan`)."""
    lib = _lib()
    config = request.utility_config()
    real = load_real_cases(request.real, label_mapping=request.label_mapping)
    version, rows = passing_rows(root.catalog(), as_of=request.as_of)
    ids = [c.case_id for c in real]
    if request.test is None:
        train, test = split_test(ids, fraction=request.test_fraction, seed=config.seed)
        source = f"held-out split of --real: {len(test)} of {len(ids)} cases (seed {config.seed})"
        scored = real
    else:
        tests = load_real_cases(request.test, label_mapping=request.label_mapping, what="--test")
        overlap = sorted(set(ids) & {c.case_id for c in tests})
        if overlap:
            raise ValidationInputError(f"ctfactory utility expects --test cases that are not in --real, but got "
                                       f"{len(overlap)} shared case id(s), first {overlap[0]!r}.")
        train, test = tuple(ids), tuple(c.case_id for c in tests)
        source = f"--test: {len(test)} cases (sha256 {lib.fingerprint(tests)[:12]})"
        scored = real + tests
    arms = tuple(lib.make_arms(train, [r["sample_id"] for r in rows], list(request.ratios),
                               synthetic_only=request.synthetic_only, seed=config.seed))
    real_fp = lib.fingerprint(real)
    structures = lib.resolve_structures(config, scored)
    training = {k: v for k, v in config.to_dict().items() if k not in _NOT_TRAINING}
    key_text = json.dumps({"real": real_fp, "train": list(train), "config": training, "structures": list(structures),
                           "arms": [[a.name, list(a.real_ids), list(a.synthetic_ids)] for a in arms]},
                          sort_keys=True, default=str)
    return UtilityPlan(version, real_fp, train, test, source, structures, arms,
                       hashlib.sha256(key_text.encode()).hexdigest()[:12])


def arm_workdir(root: DatasetRoot, plan: UtilityPlan, arm_name: str) -> Path:
    """``ROOT/utility/<samples version>/<key>/<arm>/``, created; refused when it would leave the root."""
    if root.is_remote:
        raise ValidationInputError(f"ctfactory utility expects a local dataset root for the arms' checkpoints, but "
                                   f"got root={root.uri!r}. Copy the dataset to a local folder first.")
    if not _ARM_NAME.match(arm_name):
        raise ValidationInputError(f"arm_workdir expects an arm name of letters, digits and '_.+-', but got "
                                   f"arm_name={arm_name!r}.")
    path = Path(root.resolve(f"{UTILITY_DIR}/{plan.samples_version}/{plan.key}/{arm_name}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_arm(root: DatasetRoot, request: UtilityRequest, plan: UtilityPlan, arm: Any) -> ArmResult:
    """Train (or resume) one arm in its work folder and score it on the test and OOD sets."""
    lib = _lib()
    config = request.utility_config()
    workdir = arm_workdir(root, plan, arm.name)
    real = load_real_cases(request.real, label_mapping=request.label_mapping)
    if lib.fingerprint(real) != plan.real_fingerprint:
        raise ValidationInputError(f"run_arm expects --real unchanged since the plan, but got a different fingerprint "
                                   f"for {request.real!r}. Run again.")
    by_id = {c.case_id: c for c in real}
    if request.test is not None:
        by_id.update({c.case_id: c for c in load_real_cases(request.test, label_mapping=request.label_mapping,
                                                             what="--test")})
    synthetic = load_synthetic_cases(root, arm.synthetic_ids, version=plan.samples_version)
    train = [by_id[i] for i in arm.real_ids] + synthetic
    backend = lib.backend_for(config.segmenter)
    logger.info("arm %s: %d real + %d synthetic training cases in %s", arm.name, len(arm.real_ids),
                len(synthetic), workdir)
    backend.fit(train, config, workdir, structures=plan.structures)
    test = [by_id[i] for i in plan.test_ids]
    scores = lib.score_cases(backend.predict(test, config, workdir), test, plan.structures, config, arm=arm.name)
    ood_scores = None
    if request.ood is not None:
        ood = load_real_cases(request.ood, label_mapping=request.label_mapping, what="--ood")
        ood_scores = lib.score_cases(backend.predict(ood, config, workdir), ood, plan.structures, config,
                                     arm=arm.name)
    return ArmResult(arm.name, scores, ood_scores)


# -- results ------------------------------------------------------------------------------------------

def summarise_results(results: Sequence[ArmResult], config: Any) -> tuple[Any, Any]:
    """The test summary and the OOD summary (None without OOD scores) over the arms' results."""
    lib = _lib()
    test = lib.summarise({r.arm: r.test for r in results}, baseline="real", bootstrap=config.bootstrap,
                         seed=config.seed)
    oods = {r.arm: r.ood for r in results if r.ood is not None}
    ood = (lib.summarise(oods, baseline="real", bootstrap=config.bootstrap, seed=config.seed) if oods else None)
    return test, ood


def arms_json(plan: UtilityPlan) -> list[dict[str, Any]]:
    """The ``utility_arms`` column: name, ratio (``"inf"`` for synthetic only), n_real, n_synthetic."""
    return [{"name": a.name, "ratio": None if a.ratio is None else (a.ratio if math.isfinite(a.ratio) else "inf"),
             "n_real": len(a.real_ids), "n_synthetic": len(a.synthetic_ids)} for a in plan.arms]


def utility_columns(plan: UtilityPlan, config: Any, summary: Any, ood: Any = None) -> dict[str, Any]:
    """The ``utility_*`` columns of a datasets row."""
    results = summary.to_dict()
    if ood is not None:
        results["ood"] = ood.to_dict()
    return {"utility_segmenter": config.segmenter,
            "utility_budget": json.dumps(config.to_dict(), sort_keys=True),
            "utility_arms": json.dumps(arms_json(plan)),
            "utility_real_fingerprint": plan.real_fingerprint,
            "utility_test": plan.test_source,
            "utility_results": json.dumps(results, sort_keys=True, allow_nan=False),
            "utility_mean_dice_delta": {k: float(v) for k, v in summary.mean_delta().items()}}


def record_utility(root: DatasetRoot, plan: UtilityPlan, config: Any, summary: Any, ood: Any = None) -> int | None:
    """Append a copy of the newest datasets row (up to the plan's version) with the utility columns.

    Returns:
        The datasets version, or None when that row already holds exactly these results (a re-run).
    """
    cat = root.catalog()
    if not cat.exists("datasets"):
        raise ValidationInputError(f"ctfactory utility expects a catalog with a datasets table, but got "
                                   f"root={cat.root_uri!r} without one. Run `ctfactory run SPEC` first.")
    rows = cat.read_table("datasets", as_of=plan.samples_version).to_pylist()
    if not rows:
        raise ValidationInputError(f"ctfactory utility expects a datasets row at samples version <= "
                                   f"{plan.samples_version}, but got none.")
    latest = max(rows, key=lambda r: (r["created_at"], r["samples_version"] or -1))
    columns = utility_columns(plan, config, summary, ood)
    if all(_same(latest.get(k), v) for k, v in columns.items()):
        return None
    keep = {k: v for k, v in latest.items() if k not in {"created_at", "schema_version"}}
    row = {**keep, **columns, "samples_version": plan.samples_version}
    return cat.append_dataset(row, commit_metadata={"ctfactory.utility_key": plan.key,
                                                    "spec_id": latest.get("spec_id") or ""})


def _same(stored: Any, new: Any) -> bool:
    if isinstance(new, dict):
        return dict(stored or []) == new
    return stored == new


def format_table(summary: Any) -> str:
    """The printed table: arm, structure, Dice [CI], surface Dice [CI], ΔDice [CI], one line per row."""
    header = ("arm", "structure", "n", "Dice [95% CI]", "surface Dice [95% CI]", "ΔDice vs real [95% CI]")
    lines = [[r["arm"], _structure_name(r), str(r["n_cases"]), _ci(r["dice"], r["dice_ci"]),
              _ci(r["surface_dice"], r["surface_dice_ci"]), _ci(r["delta_dice"], r["delta_dice_ci"], signed=True)]
             for r in summary.rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in lines])


def _structure_name(row: Mapping[str, Any]) -> str:
    if row["structure"] == "mean":
        return "mean"
    return f"{row.get('name') or 'structure'} ({row['structure']})"


def _ci(value: float | None, ci: Sequence[float] | None, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{value:{sign}.3f}"
    if ci is None or any(c is None for c in ci):
        return text
    return f"{text} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"
