"""nnU-Net v2 backend of the downstream-utility comparison (``ctfactory utility --segmenter nnunet``).

:class:`NnUNetBackend` implements ``SegmenterBackend`` of :mod:`maisi_core.evaluation.utility` by driving
nnU-Net v2 (the ``nnunetv2`` package, the ``nnunet`` extra) through its own command entry points, each in a
child process whose ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` point under the arm's
workdir (the parent's environment is never changed):

1. ``write_raw_dataset``: the arm's cases as ``DatasetNNN_Name/imagesTr``, ``labelsTr`` and ``dataset.json``
   with consecutive labels for the scored structures (as ``catalog.export.export_nnunet``; other IDs become
   background) and ``maisi_label_ids`` mapping them back to MAISI IDs.
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres --verify_dataset_integrity -overwrite_target_spacing``
   (``config.spacing_mm``), then the plans' ``3d_fullres`` patch size, batch size and network topology are
   pinned to ``config.patch_size`` / ``config.batch_size`` with nnU-Net's own topology rule, so every arm
   trains the same network on the same grid (nnU-Net would otherwise plan each arm from its own data).
3. Training through nnU-Net's own training API, the body of ``nnUNetv2_train ID 3d_fullres all`` (fold
   ``all``: the arm's cases are all training data; the utility test set is separate): ``get_trainer_from_args``
   builds ``nnUNetTrainer``, the budget is set on it, ``maybe_load_checkpoint(continue_training=True)`` (the
   command's ``--c``) resumes a crashed run, then ``run_training()``. nnU-Net's final validation on the
   training cases is skipped (the utility scores the held-out test set).
4. ``nnUNetv2_predict -f all -chk checkpoint_final.pth``; predictions go back to MAISI IDs.

Budget: an nnU-Net epoch is a fixed number of iterations (250 by default), not a pass over the data, as in
``UtilityConfig``. The trainer runs exactly ``config.epochs`` epochs of ``config.steps_per_epoch``
iterations (``UtilityConfig.full()``: 200 x 250, nnU-Net's own epoch length), with
``max(1, steps_per_epoch // 5)`` validation iterations per epoch (nnU-Net's 250:50) and a checkpoint every
``ceil(epochs / 10)`` epochs (at most 50, nnU-Net's default), so a crash loses at most a tenth of the budget.
nnU-Net's fixed-length trainer variants (``nnUNetTrainer_1epoch``, ``_5epochs``, ...) are not used: they
cover few budgets, and in nnunetv2 2.6-2.8 looking one up by name imports every trainer module, including
the Primus trainers (``timm`` -> ``torchvision``), which fails where torchvision does not match the torch
build (PyPI's CUDA torchvision 0.28 with CPU torch 2.13: ``operator torchvision::nms does not exist``);
plain ``nnUNetTrainer`` is found before that import.

Determinism: training runs with Python, NumPy and torch seeded from ``config.seed`` and, on the CPU, with
data augmentation in the main process (``nnUNet_n_proc_DA=0``) and ``nnUNet_compile=f``, so a CPU run with
the same inputs repeats. Not guaranteed: on CUDA nnU-Net sets ``cudnn.benchmark=True`` and augments in
worker processes without seeds (``NonDetMultiThreadedAugmenter``); a run resumed from a checkpoint restarts
the random streams there (nnU-Net's checkpoint holds no RNG state), so it differs from an uninterrupted one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maisi_core.errors import CheckpointError, ConfigError, LabelMapError, MaisiError

if TYPE_CHECKING:  # the shared types live in U1's module; only annotations use them here
    from maisi_core.evaluation.utility import LabeledCase, UtilityConfig

logger = logging.getLogger(__name__)

NNUNET_EXTRA = "nnunet"
NNUNET_PACKAGE = "nnunetv2"
NNUNET_CONFIGURATION = "3d_fullres"
NNUNET_FOLD = "all"
NNUNET_PLANS = "nnUNetPlans"
NNUNET_FILE_ENDING = ".nii.gz"
NNUNET_TRAINER = "nnUNetTrainer"
NNUNET_DEVICES = ("cpu", "cuda", "mps")
_VAL_FRACTION = 5  # nnU-Net: 250 training and 50 validation iterations per epoch
_SAVE_EVERY_MAX = 50  # nnUNetTrainer.save_every
_MAX_FEATURES_3D = 320  # ExperimentPlanner.UNet_max_features_3d
_MIN_FEATURE_MAP_EDGE = 4  # ExperimentPlanner.UNet_featuremap_min_edge_length
_CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMMANDS = {  # console-script name -> entry point (nnunetv2's own pyproject)
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:"
                                    "plan_and_preprocess_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
}
# Every child starts with this: argv[1] is the JSON of build_nnunet_env, argv[2] the seed. It drops the
# nnUNet_* settings it inherited and sets the arm's, in the child only, before nnunetv2 is imported.
_PRELUDE = (
    "import importlib, json, os, random, sys\n"
    "env, seed = json.loads(sys.argv[1]), int(sys.argv[2])\n"
    "for key in [k for k in os.environ if k.startswith('nnUNet_')]:\n"
    "    del os.environ[key]\n"
    "os.environ.update(env)\n"
)
_SEED = "import numpy, torch\nrandom.seed(seed); numpy.random.seed(seed); torch.manual_seed(seed)\n"
# Runs an entry point (argv[3], "module:function") exactly as its console script does, with argv[4:].
_ENTRY = _PRELUDE + _SEED + (
    "target = sys.argv[3]\n"
    "sys.argv = [target.rsplit(':', 1)[1]] + sys.argv[4:]\n"
    "module, func = target.split(':')\n"
    "sys.exit(getattr(importlib.import_module(module), func)())\n"
)
# nnUNetv2_train's run_training() for one device (argv[3]: JSON arguments), with the schedule set on the
# trainer and without the final validation on the training cases.
_TRAIN = _PRELUDE + _SEED + (
    "a = json.loads(sys.argv[3])\n"
    "from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint\n"
    "if a['device'] != 'cpu':\n"
    "    torch.set_num_threads(1); torch.set_num_interop_threads(1)\n"
    "t = get_trainer_from_args(a['dataset'], a['configuration'], a['fold'], a['trainer'], a['plans'],\n"
    "                          a['resume'], device=torch.device(a['device']))\n"
    "t.num_epochs, t.num_iterations_per_epoch = a['epochs'], a['iterations_per_epoch']\n"
    "t.num_val_iterations_per_epoch, t.save_every = a['val_iterations_per_epoch'], a['save_every']\n"
    "maybe_load_checkpoint(t, a['resume'], False, None)\n"
    "t.run_training()\n"
)


class NnUNetNotInstalledError(MaisiError, ImportError):
    """Raised when the nnU-Net backend is used without the ``nnunetv2`` package (the ``nnunet`` extra)."""


class NnUNetRunError(MaisiError, RuntimeError):
    """Raised when an nnU-Net command fails or does not leave the files it should."""


def check_nnunet_installed() -> None:
    """Raise :class:`NnUNetNotInstalledError` unless ``nnunetv2`` can be imported."""
    try:
        found = importlib.util.find_spec(NNUNET_PACKAGE) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        found = False
    if not found:
        raise NnUNetNotInstalledError(
            f"NnUNetBackend expects the {NNUNET_PACKAGE} package (the '{NNUNET_EXTRA}' extra), but got "
            f"{NNUNET_PACKAGE}=not installed. Install it with: pip install 'ctfactory[{NNUNET_EXTRA}]'."
        )


@dataclass(frozen=True)
class TrainingSchedule:
    """What ``nnUNetTrainer`` runs: epochs of fixed length, validation iterations and checkpoint interval."""

    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    save_every: int

    @classmethod
    def from_config(cls, config: UtilityConfig) -> TrainingSchedule:
        """The schedule for ``config.epochs`` x ``config.steps_per_epoch`` (see the module docstring)."""
        epochs, steps = int(config.epochs), int(config.steps_per_epoch)
        if epochs < 1 or steps < 1:
            raise ConfigError(f"NnUNetBackend expects epochs and steps_per_epoch >= 1, but got epochs={epochs}, "
                              f"steps_per_epoch={steps}.")
        return cls(epochs, steps, max(1, steps // _VAL_FRACTION), min(_SAVE_EVERY_MAX, -(-epochs // 10)))

    def to_dict(self) -> dict:
        return asdict(self)


def build_label_table(structures: Sequence[int]) -> dict[int, int]:
    """Map consecutive nnU-Net labels 1..N to the scored MAISI IDs (sorted), as ``export_nnunet`` does."""
    ids = sorted({int(s) for s in structures})
    if not ids or ids[0] < 1 or ids[-1] > 65535:
        raise LabelMapError(
            f"NnUNetBackend expects scored MAISI IDs in 1..65535, at least one, but got structures={list(structures)}."
        )
    return {new: old for new, old in enumerate(ids, start=1)}


def to_nnunet_labels(label: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """Return ``label`` (MAISI IDs) as consecutive nnU-Net labels; IDs that are not scored become 0."""
    arr = np.asarray(label)
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and int(arr.min()) < 0):
        raise LabelMapError(f"NnUNetBackend expects non-negative integer MAISI IDs, but got dtype={arr.dtype}.")
    lut = np.zeros(max(int(arr.max(initial=0)), max(table.values())) + 1, dtype=np.uint16)
    for new, old in table.items():
        lut[old] = new
    return lut[arr.astype(np.int64)].astype(np.uint8 if len(table) < 256 else np.uint16)


def to_maisi_labels(pred: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """Return an nnU-Net prediction (consecutive labels) in MAISI IDs."""
    arr = np.asarray(pred).astype(np.int64)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > len(table)):
        raise NnUNetRunError(
            f"NnUNetBackend expects predicted labels in 0..{len(table)}, but got range=({arr.min()}, {arr.max()})."
        )
    lut = np.zeros(len(table) + 1, dtype=np.uint16)
    for new, old in table.items():
        lut[new] = old
    return lut[arr]


@dataclass(frozen=True)
class NnUNetLayout:
    """The nnU-Net folders of one arm, all under ``<workdir>/nnunet``."""

    root: Path
    dataset_id: int

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_Utility"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def record(self) -> Path:
        return self.root / "fit.json"

    def plans(self) -> Path:
        return self.preprocessed / self.dataset_name / f"{NNUNET_PLANS}.json"

    def trainer_folder(self, trainer: str) -> Path:
        return (self.results / self.dataset_name / f"{trainer}__{NNUNET_PLANS}__{NNUNET_CONFIGURATION}"
                / f"fold_{NNUNET_FOLD}")


def build_nnunet_env(layout: NnUNetLayout, *, device: str, data_workers: int | None = None) -> dict[str, str]:
    """Return the environment settings of one nnU-Net child process.

    The child (see ``_PRELUDE``) drops every ``nnUNet_*`` variable it inherited and sets these; the parent's
    environment is never changed or read.

    Args:
        layout: The arm's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` point there).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``cuda:N`` sets ``CUDA_VISIBLE_DEVICES=N``.
        data_workers: ``nnUNet_n_proc_DA``, the training's data-augmentation processes (0: in the main
            process, reproducible); None leaves nnU-Net's default. Give it to training only: the planner
            calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which refuses 0.
    """
    env = {
        "nnUNet_raw": str(layout.raw), "nnUNet_preprocessed": str(layout.preprocessed),
        "nnUNet_results": str(layout.results), "nnUNet_compile": "f",
    }
    kind, _, index = device.partition(":")
    if index:
        env["CUDA_VISIBLE_DEVICES"] = index
    if data_workers is not None:
        env["nnUNet_n_proc_DA"] = str(int(data_workers))
    if kind == "cpu":
        env["nnUNet_def_n_proc"] = "1"
    return env


def write_raw_dataset(cases: Sequence[LabeledCase], raw_root: Path, *, table: Mapping[int, int],
                      dataset_id: int) -> Path:
    """Write ``raw_root/DatasetNNN_Utility`` in nnU-Net v2 raw layout with consecutive labels.

    Images are written as CT (``<case>_0000.nii.gz``, HU), labels as ``<case>.nii.gz`` through
    :mod:`maisi_core.io`; ``dataset.json`` carries ``maisi_label_ids`` (nnU-Net label -> MAISI ID).

    Returns:
        The dataset folder (replaced when it exists).
    """
    from maisi_core.anatomy.labels import label_name
    from maisi_core.io import save_image, save_label

    check_case_ids(cases)
    folder = Path(raw_root) / NnUNetLayout(Path(raw_root), dataset_id).dataset_name
    if folder.exists():
        shutil.rmtree(folder)
    for case in cases:
        save_image(folder / "imagesTr" / f"{case.case_id}_0000{NNUNET_FILE_ENDING}", case.image, case.affine,
                   compresslevel=1)
        save_label(folder / "labelsTr" / f"{case.case_id}{NNUNET_FILE_ENDING}",
                   to_nnunet_labels(case.label, table), case.affine, compresslevel=1)
    meta = {
        "name": "Utility", "description": "ctfactory downstream-utility arm",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0} | {label_name(old): new for new, old in table.items()},
        "numTraining": len(cases), "file_ending": NNUNET_FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "maisi_label_ids": {str(new): old for new, old in table.items()},
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def check_case_ids(cases: Sequence[LabeledCase]) -> None:
    """Refuse case IDs that are not safe nnU-Net file stems, and duplicates."""
    seen: set[str] = set()
    for case in cases:
        if not _CASE_ID_PATTERN.match(case.case_id) or case.case_id.endswith("_0000"):
            raise ConfigError(
                f"NnUNetBackend expects case IDs of letters, digits, '_', '.' and '-' (not ending in '_0000'), "
                f"but got case_id={case.case_id!r}."
            )
        if case.case_id in seen:
            raise ConfigError(f"NnUNetBackend expects unique case IDs, but got case_id={case.case_id!r} twice.")
        seen.add(case.case_id)
    if not cases:
        raise ConfigError("NnUNetBackend expects at least one case, but got cases=[].")


def pin_plans(plans_path: Path, *, patch_size_xyz: Sequence[int], batch_size: int) -> dict:
    """Set the ``3d_fullres`` patch size, batch size and network topology in nnU-Net's plans file.

    The topology comes from nnU-Net's own ``get_pool_and_conv_props`` for the pinned patch; the planner's
    own choice is kept under ``ctfactory_planned`` in the file.

    Returns:
        The planned and pinned values, for the fit record.
    """
    plans = json.loads(plans_path.read_text())
    if NNUNET_CONFIGURATION not in plans.get("configurations", {}):
        raise NnUNetRunError(
            f"nnUNetv2_plan_and_preprocess expects to plan {NNUNET_CONFIGURATION}, but got configurations="
            f"{sorted(plans.get('configurations', {}))} in {plans_path}. The cases must be 3D volumes."
        )
    conf = plans["configurations"][NNUNET_CONFIGURATION]
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    order = [2 - i for i in plans["transpose_forward"]]  # file (X, Y, Z) -> SimpleITK (Z, Y, X) -> transposed
    patch = [int(patch_size_xyz[i]) for i in order]
    arch = conf["architecture"]["arch_kwargs"]
    _, strides, kernels, fitted, _ = get_pool_and_conv_props(conf["spacing"], patch, _MIN_FEATURE_MAP_EDGE, 999999)
    if [int(v) for v in fitted] != patch:
        nearest = tuple(int(fitted[order.index(i)]) for i in range(3))
        raise ConfigError(
            f"NnUNetBackend expects patch_size divisible by nnU-Net's pooling, but got patch_size="
            f"{tuple(patch_size_xyz)}. Use multiples of 2**k per axis, e.g. {nearest}."
        )
    planned = {"patch_size": conf["patch_size"], "batch_size": conf["batch_size"]}
    stages = len(strides)  # the default planner's rule: base features doubling per stage, capped
    features = [min(_MAX_FEATURES_3D, int(arch["features_per_stage"][0]) * 2 ** i) for i in range(stages)]
    arch.update({"n_stages": stages, "features_per_stage": features, "kernel_sizes": kernels, "strides": strides,
                 "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1)})
    conf.update({"patch_size": patch, "batch_size": int(batch_size), "ctfactory_planned": planned})
    plans_path.write_text(json.dumps(plans, indent=2))
    return {"planned": planned, "pinned": {"patch_size": patch, "batch_size": int(batch_size), "n_stages": stages}}


def read_prediction(folder: Path, case: LabeledCase, table: Mapping[int, int]) -> np.ndarray:
    """Read ``folder/<case_id>.nii.gz`` written by ``nnUNetv2_predict`` and return it in MAISI IDs."""
    import nibabel as nib

    path = folder / f"{case.case_id}{NNUNET_FILE_ENDING}"
    if not path.is_file():
        raise NnUNetRunError(f"nnUNetv2_predict expects to write {path.name}, but got no such file in {folder}.")
    pred = np.asarray(nib.load(str(path)).dataobj)
    if pred.shape != np.shape(case.label):
        raise NnUNetRunError(
            f"nnUNetv2_predict expects the case's shape, but got shape={pred.shape} for "
            f"case_id={case.case_id!r} (label {np.shape(case.label)})."
        )
    return to_maisi_labels(pred, table)


def check_device(device: str) -> None:
    """Refuse devices nnU-Net cannot run on."""
    kind, _, index = str(device).partition(":")
    if kind not in NNUNET_DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(
            f"NnUNetBackend expects device in {list(NNUNET_DEVICES)} or 'cuda:N', but got device={device!r}."
        )


class NnUNetBackend:
    """nnU-Net v2 as a ``SegmenterBackend``: one raw dataset, plans, model and predictions per arm workdir.

    From ``UtilityConfig`` it uses ``spacing_mm``, ``patch_size``, ``batch_size``, ``epochs``,
    ``steps_per_epoch``, ``seed`` and ``device``; ``learning_rate`` is not used (nnU-Net trains with its own
    SGD, 1e-2 with polynomial decay, and its own augmentation). Everything is kept under
    ``<workdir>/nnunet``: ``raw/``, ``preprocessed/``, ``results/``, ``predict/``, ``logs/<step>.log`` and
    ``fit.json`` (data fingerprint, label map, schedule, planned and pinned plans, nnunetv2 version).

    Args:
        dataset_id: The nnU-Net dataset ID used inside the arm's private folders.
        data_workers: Data-augmentation processes; None gives 0 on the CPU (reproducible) and nnU-Net's
            default elsewhere (fast, not reproducible).
        timeout_s: Wall-clock limit of each nnU-Net command; None for none.
    """

    name = "nnunet"

    def __init__(self, *, dataset_id: int = 500, data_workers: int | None = None,
                 timeout_s: float | None = None) -> None:
        if not 1 <= int(dataset_id) <= 999:
            raise ConfigError(f"NnUNetBackend expects dataset_id in 1..999, but got dataset_id={dataset_id}.")
        if data_workers is not None and int(data_workers) < 0:
            raise ConfigError(f"NnUNetBackend expects data_workers >= 0 or None, but got data_workers={data_workers}.")
        self.dataset_id = int(dataset_id)
        self.data_workers = data_workers
        self.timeout_s = timeout_s

    def fit(self, train: Sequence[LabeledCase], config: UtilityConfig, workdir: Path, *,
            structures: Sequence[int]) -> None:
        """Train on ``train`` in ``workdir``; finish a crashed run from nnU-Net's checkpoint.

        Raises:
            NnUNetNotInstalledError: Without the ``nnunet`` extra.
            CheckpointError: When ``workdir`` holds a run with other data, structures or budget.
            NnUNetRunError: When an nnU-Net command fails (its log is under ``<workdir>/nnunet/logs``).
        """
        from maisi_core.evaluation.utility import fingerprint

        check_nnunet_installed()
        check_device(config.device)
        check_case_ids(train)
        table = build_label_table(structures)
        schedule = TrainingSchedule.from_config(config)
        layout = NnUNetLayout(Path(workdir) / "nnunet", self.dataset_id)
        record = {
            "data_sha256": fingerprint(train), "case_ids": [c.case_id for c in train],
            "maisi_label_ids": {str(k): v for k, v in table.items()}, "trainer": NNUNET_TRAINER,
            "schedule": schedule.to_dict(), "spacing_mm": list(config.spacing_mm),
            "patch_size": list(config.patch_size), "batch_size": int(config.batch_size), "seed": int(config.seed),
            "configuration": NNUNET_CONFIGURATION, "fold": NNUNET_FOLD,
            "nnunetv2": package_version(NNUNET_PACKAGE),
        }
        state = self._check_record(layout, record)
        if (layout.trainer_folder(NNUNET_TRAINER) / "checkpoint_final.pth").is_file():
            logger.info("NnUNetBackend.fit: %s is already trained", layout.root)
            return
        layout.root.mkdir(parents=True, exist_ok=True)
        if not state.get("preprocessed"):
            layout.record.write_text(json.dumps(record, indent=2))
            write_raw_dataset(train, layout.raw, table=table, dataset_id=self.dataset_id)
            self.plan_and_preprocess(layout, config)
            record |= {"plans": pin_plans(layout.plans(), patch_size_xyz=config.patch_size,
                                          batch_size=config.batch_size), "preprocessed": True}
            layout.record.write_text(json.dumps(record, indent=2))
        self.train(layout, config, schedule)

    def predict(self, cases: Sequence[LabeledCase], config: UtilityConfig, workdir: Path) -> dict[str, np.ndarray]:
        """Segment ``cases`` with the model in ``workdir``; label maps in MAISI IDs on each case's grid."""
        from maisi_core.io import save_image

        check_nnunet_installed()
        check_device(config.device)
        check_case_ids(cases)
        layout = NnUNetLayout(Path(workdir) / "nnunet", self.dataset_id)
        record = json.loads(layout.record.read_text()) if layout.record.is_file() else {}
        trainer = record.get("trainer", "")
        if not (layout.trainer_folder(trainer) / "checkpoint_final.pth").is_file():
            raise CheckpointError(
                f"NnUNetBackend.predict expects a trained model in the workdir, but got workdir={str(workdir)!r} "
                "without checkpoint_final.pth. Call fit first."
            )
        table = {int(k): int(v) for k, v in record["maisi_label_ids"].items()}
        inputs, outputs = layout.root / "predict" / "input", layout.root / "predict" / "output"
        for folder in (inputs, outputs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for case in cases:
            save_image(inputs / f"{case.case_id}_0000{NNUNET_FILE_ENDING}", case.image, case.affine, compresslevel=1)
        kind = config.device.partition(":")[0]
        self._run("nnUNetv2_predict", [
            "-i", str(inputs), "-o", str(outputs), "-d", str(self.dataset_id), "-c", NNUNET_CONFIGURATION,
            "-f", NNUNET_FOLD, "-tr", trainer, "-p", NNUNET_PLANS, "-chk", "checkpoint_final.pth",
            "-device", kind, "--disable_progress_bar", "-npp", "1", "-nps", "1",
        ], layout, config, log="predict")
        return {case.case_id: read_prediction(outputs, case, table) for case in cases}

    def plan_and_preprocess(self, layout: NnUNetLayout, config: UtilityConfig) -> None:
        """Run ``nnUNetv2_plan_and_preprocess`` for ``3d_fullres`` at ``config.spacing_mm``."""
        shutil.rmtree(layout.preprocessed, ignore_errors=True)
        procs = "1" if config.device.startswith("cpu") else str(max(1, min(4, os.cpu_count() or 1)))
        spacing_zyx = [repr(float(s)) for s in reversed(config.spacing_mm)]  # SimpleITK's axis order
        self._run("nnUNetv2_plan_and_preprocess", [
            "-d", str(self.dataset_id), "-c", NNUNET_CONFIGURATION, "--verify_dataset_integrity",
            "-npfp", procs, "-np", procs, "-overwrite_target_spacing", *spacing_zyx, "--no_pbar",
        ], layout, config, log="plan_and_preprocess")
        if not layout.plans().is_file():
            raise NnUNetRunError(f"nnUNetv2_plan_and_preprocess expects to write {layout.plans()}, but got none.")

    def train(self, layout: NnUNetLayout, config: UtilityConfig, schedule: TrainingSchedule) -> None:
        """Train ``nnUNetTrainer`` (fold ``all``) for ``schedule``; resume when nnU-Net left a checkpoint."""
        folder = layout.trainer_folder(NNUNET_TRAINER)
        resume = any((folder / f"checkpoint_{k}.pth").is_file() for k in ("latest", "best"))
        if resume:
            logger.info("NnUNetBackend.fit: resuming %s from its checkpoint", folder)
        args = {"dataset": str(self.dataset_id), "configuration": NNUNET_CONFIGURATION, "fold": NNUNET_FOLD,
                "trainer": NNUNET_TRAINER, "plans": NNUNET_PLANS, "resume": resume,
                "device": config.device.partition(":")[0], "seed": int(config.seed)} | schedule.to_dict()
        workers = self.data_workers if self.data_workers is not None or not config.device.startswith("cpu") else 0
        self._run("nnUNetv2_train", [json.dumps(args)], layout, config, log="train", data_workers=workers)
        if not (folder / "checkpoint_final.pth").is_file():
            raise NnUNetRunError(f"nnUNetv2_train expects to write checkpoint_final.pth, but got none in {folder}.")

    def _check_record(self, layout: NnUNetLayout, record: dict) -> dict:
        if not layout.record.is_file():
            return {}
        old = json.loads(layout.record.read_text())
        for key, value in record.items():
            if old.get(key) != value:
                raise CheckpointError(
                    f"NnUNetBackend.fit expects the workdir's run to match, but got {key}={old.get(key)!r} there "
                    f"(this run: {value!r}). Use a new workdir or delete {layout.root}."
                )
        return old

    def _run(self, command: str, args: list[str], layout: NnUNetLayout, config: UtilityConfig, *, log: str,
             data_workers: int | None = None) -> None:
        env = json.dumps(build_nnunet_env(layout, device=config.device, data_workers=data_workers))
        logs = layout.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if command == "nnUNetv2_train":
            argv = [sys.executable, "-c", _TRAIN, env, str(int(config.seed)), *args]
        else:
            argv = [sys.executable, "-c", _ENTRY, env, str(int(config.seed)), _COMMANDS[command], *args]
        logger.info("running %s %s", command, " ".join(args))
        with open(logs / f"{log}.log", "a") as out:
            out.write(f"$ {command} {' '.join(args)}\n")
            out.flush()
            # its own session, so a timeout or an interrupt also ends nnU-Net's worker processes
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = proc.wait(timeout=self.timeout_s)
            except BaseException as exc:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise NnUNetRunError(
                        f"{command} expects to finish within timeout_s={self.timeout_s}, but got no exit. "
                        f"See {logs / f'{log}.log'}."
                    ) from exc
                raise
        if returncode != 0:
            tail = (logs / f"{log}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise NnUNetRunError(
                f"{command} expects exit status 0, but got returncode={returncode}. "
                f"Last lines of {logs / f'{log}.log'}: " + " | ".join(tail)
            )
