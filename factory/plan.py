"""Planning: a validated spec expands deterministically into one :class:`CaseRequest` per case.

Pure (no Prefect). Each case gets

* ``sample_id = f"{dataset}-{cohort}-{index:05d}-{spec_id[:8]}"`` (letters, digits, ``_ . -`` only),
* ``seed = derive_seed(spec_id, spec.seed, cohort, index)``: the first 8 bytes of a sha256, as an
  integer below 2**31; retry ``k`` uses :func:`attempt_seed` ``(seed, k)``,
* output URIs ``ROOT/images/<sample_id>.nii.gz`` and ``ROOT/labels/<sample_id>.nii.gz``, checked to
  stay inside the output root.

Geometry (size, spacing, field of view) is checked here against the model's preset rules, before
anything touches a GPU; every problem is reported at once with its place in the spec file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from catalog.root import IMAGES_DIR, LABELS_DIR, VOLUME_SUFFIX
from factory.errors import FactoryError, OutputPathError, SpecError, SpecIssue
from factory.spec import DatasetSpec, is_safe_name, spec_id
from factory.spec_cohort import Cohort, MaskSource, QCSettings

SEED_MODULUS = 2**31
# Caps on what one spec may plan (all cohorts together). A spec is user input (``serve``/``submit`` take
# specs from others), so the operator sets the caps, through the environment, never the spec itself.
MAX_PLANNED_CASES = 100_000
MAX_PLANNED_VOXELS = 2 * 10**12  # 10,000 full-size 512x512x768 cases; about 4 TB of int16 before gzip
MAX_CASES_ENV = "CTFACTORY_MAX_CASES"
MAX_VOXELS_ENV = "CTFACTORY_MAX_VOXELS"

# Output size (voxels) and spacing (mm) when a cohort gives none: sizes and fields of view inside the
# released MAISI CT limits (x == y in {256, 384, 512}, FOV >= 256 mm; see maisi_core.engine.geometry).
REGION_DEFAULTS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "head_neck": ((256, 256, 256), (1.0, 1.0, 1.0)),
    "chest": ((512, 512, 128), (0.75, 0.75, 2.5)),
    "abdomen": ((512, 512, 128), (0.8, 0.8, 2.5)),
    "lower": ((512, 512, 256), (0.8, 0.8, 2.5)),
}
MULTI_REGION_DEFAULT = ((512, 512, 256), (0.8, 0.8, 2.5))
# Rough activation bytes per output voxel of a whole-volume decode (models without a decode window).
_WHOLE_DECODE_BYTES_PER_VOXEL = 256
# Peak resident-memory growth per output voxel of one whole-volume case on a CPU (fp32): measured on the
# default model, one step, 2 threads: 688 B at 64^3, 591 B at 128^3, 558 B at 192^3 (ru_maxrss).
CPU_BYTES_PER_VOXEL = 640


class CaseRequest(BaseModel):
    """Everything one generation task needs; small and JSON-serialisable (no arrays, no models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_id: str
    dataset: str
    dataset_version: str
    spec_id: str
    cohort: str
    case_index: int
    seed: int
    model_ref: str
    body_region: tuple[str, ...]
    pathology: str
    tumor_label: int | None = None
    tumor_size_mm: tuple[float, float] | None = None
    output_size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    mask_source: MaskSource  # typed, its paths resolved against the spec's folder
    qc: QCSettings
    num_inference_steps: int | None
    first_attempt: int = 0  # > 0 when ``run --retry-failed`` retries a recorded failure on new attempt seeds
    image_uri: str  # relative to the output root
    label_uri: str

    @property
    def region_name(self) -> str:
        """The body region(s) as one catalog string, e.g. ``chest`` or ``chest+abdomen``."""
        return "+".join(self.body_region)


@dataclass(frozen=True)
class CohortPlan:
    """What one cohort expands to."""

    name: str
    count: int
    body_region: tuple[str, ...]
    pathology: str
    output_size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    num_inference_steps: int
    mask_source: str
    est_gpu_memory_gb: float
    memory_note: str
    est_cpu_memory_gb: float | None = None

    @property
    def voxels_per_case(self) -> int:
        """Voxels of one output volume."""
        x, y, z = self.output_size
        return x * y * z


@dataclass(frozen=True)
class DatasetPlan:
    """The expanded spec: its ID, one request per case, and per-cohort summaries."""

    spec_id: str
    cases: tuple[CaseRequest, ...]
    cohorts: tuple[CohortPlan, ...]

    @property
    def total_voxels(self) -> int:
        """Voxels over every case."""
        return sum(c.voxels_per_case * c.count for c in self.cohorts)


def derive_seed(*parts: object) -> int:
    """Return a seed in [0, 2**31) from the first 8 bytes of sha256 over ``parts`` joined by ``|``."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def case_seed(sid: str, global_seed: int, cohort: str, index: int) -> int:
    """The seed of case ``index`` of ``cohort``: a function of spec_id, global seed, cohort and index."""
    return derive_seed("case", sid, global_seed, cohort, index)


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of retry ``attempt`` (0 is the case seed itself)."""
    return seed if attempt == 0 else derive_seed("retry", seed, attempt)


def make_sample_id(dataset: str, cohort: str, index: int, sid: str) -> str:
    """Return ``f"{dataset}-{cohort}-{index:05d}-{sid[:8]}"``; refuse unsafe characters."""
    sample_id = f"{dataset}-{cohort}-{index:05d}-{sid[:8]}"
    if not is_safe_name(sample_id):
        raise OutputPathError(f"make_sample_id expects letters, digits, '_', '.', '-', but got "
                              f"sample_id={sample_id!r}. Rename the dataset or cohort.")
    return sample_id


def case_paths(sample_id: str) -> tuple[str, str]:
    """Return the (image, label) paths of a case relative to the output root."""
    if not is_safe_name(sample_id):
        raise OutputPathError(f"case_paths expects a safe sample_id, but got sample_id={sample_id!r}.")
    return f"{IMAGES_DIR}/{sample_id}{VOLUME_SUFFIX}", f"{LABELS_DIR}/{sample_id}{VOLUME_SUFFIX}"


def default_geometry(regions: tuple[str, ...]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Return the (output size, spacing) used when a cohort gives none."""
    return REGION_DEFAULTS[regions[0]] if len(regions) == 1 else MULTI_REGION_DEFAULT


def estimate_gpu_memory_gb(config: Any, output_size: tuple[int, int, int], decode_preset: str | None) -> tuple[float, str]:
    """Estimate the peak GPU memory of one case (set by VAE decoding) and say how it was estimated.

    Windowed decoding (released models) is bounded by the decode preset's memory class
    (``maisi_core.engine.decoding``): the named one, or the smallest class measured to fit the size
    (256^3 and 512^2 x 128 in 16 GB, 512^3 in 24 GB, larger in 80 GB). Whole-volume decoding
    (``tiny``) is estimated from the voxel count.
    """
    from maisi_core.engine.decoding import get_decode_preset

    voxels = output_size[0] * output_size[1] * output_size[2]
    if decode_preset not in (None, "auto"):
        p = get_decode_preset(decode_preset)
        return float(p.gpu_memory_gb), f"decode preset {p.name}"
    if config.decode_roi_latent is None:
        gb = voxels * _WHOLE_DECODE_BYTES_PER_VOXEL / 1024**3
        return round(gb, 3), "whole-volume decode, rough"
    name = "16g" if voxels <= 512 * 512 * 128 else "24g" if voxels <= 512**3 else "80g"
    return float(get_decode_preset(name).gpu_memory_gb), f"decode preset {name}"


def estimate_cpu_memory_gb(config: Any, output_size: tuple[int, int, int]) -> float | None:
    """Estimate the peak CPU memory of one case (whole-volume models, fp32); None where not measured.

    Windowed-decoding models (the released ones) have not been measured on a CPU, so they get no estimate
    rather than a guess.
    """
    if config.decode_roi_latent is not None:
        return None
    x, y, z = output_size
    return round(x * y * z * CPU_BYTES_PER_VOXEL / 1024**3, 3)


def _plan_cohort(spec: DatasetSpec, index: int, cohort: Cohort, config: Any, issues: list[SpecIssue]) -> CohortPlan | None:
    from maisi_core.errors import GeometryError
    from maisi_core.engine.geometry import check_geometry

    size, spacing = default_geometry(tuple(cohort.body_region))
    size = tuple(cohort.output_size or size)
    spacing = tuple(cohort.spacing_mm or spacing)
    where = ("cohorts", index, "output_size" if cohort.output_size else "spacing_mm" if cohort.spacing_mm else "name")
    try:
        size, spacing = check_geometry(config.geometry, size, spacing, who=f"Cohort[{cohort.name}] on model {config.name}")
    except GeometryError as exc:
        issues.append(spec.source.issue(where, str(exc)))
        return None
    memory, note = estimate_gpu_memory_gb(config, size, spec.runtime.decode_preset)
    steps = cohort.num_inference_steps or config.scheduler.default_num_inference_steps
    return CohortPlan(cohort.name, cohort.count, tuple(cohort.body_region), cohort.pathology_name, size, spacing,
                      steps, cohort.mask_source.type, memory, note, estimate_cpu_memory_gb(config, size))


def plan_dataset(spec: DatasetSpec) -> DatasetPlan:
    """Expand a spec into cases, checking geometry against the model's rules.

    Raises:
        SpecError: listing every geometry or model-reference problem with its location.
    """
    from factory.models import pipeline_config

    issues: list[SpecIssue] = []
    try:
        config = pipeline_config(spec.model_location, preset=spec.model.preset)
    except FactoryError as exc:
        raise SpecError([spec.source.issue(("model",), str(exc))]) from None
    sid = spec_id(spec)
    cohorts = [_plan_cohort(spec, i, c, config, issues) for i, c in enumerate(spec.cohorts)]
    if issues:
        raise SpecError(issues)
    _check_plan_size(spec, cohorts)
    cases = []
    for cohort, cp in zip(spec.cohorts, cohorts, strict=True):
        tumor = cohort.pathology
        make_sample_id(spec.name, cohort.name, 0, sid)  # checks the name characters once per cohort
        # The first request of a cohort is validated in full; the others copy it with their own ID, index,
        # seed and paths (all built here from checked parts), which keeps planning linear and fast.
        shared = dict(
            dataset=spec.name, dataset_version=spec.version, spec_id=sid, cohort=cohort.name,
            model_ref=spec.model_location, body_region=tuple(cohort.body_region), pathology=cohort.pathology_name,
            tumor_label=None if tumor is None else tumor.label_id,
            tumor_size_mm=None if tumor is None else tumor.size_mm,
            output_size=cp.output_size, spacing_mm=cp.spacing_mm,
            mask_source=_resolved_mask_source(spec, cohort), qc=cohort.qc,
            num_inference_steps=cp.num_inference_steps,
        )
        first = None
        for i in range(cohort.count):
            sample_id = f"{spec.name}-{cohort.name}-{i:05d}-{sid[:8]}"
            image, label = case_paths(sample_id)
            fields = dict(sample_id=sample_id, case_index=i, seed=case_seed(sid, spec.seed, cohort.name, i),
                          image_uri=image, label_uri=label)
            if first is None:
                first = CaseRequest(**fields, **shared)
                cases.append(first)
            else:  # the validated first request's values, shared; only the per-case fields differ
                cases.append(first.model_copy(update=fields))
    return DatasetPlan(spec_id=sid, cases=tuple(cases), cohorts=tuple(c for c in cohorts if c is not None))


def planned_limits() -> tuple[int, int]:
    """The (cases, voxels) caps per spec: the defaults, or the operator's ``CTFACTORY_MAX_CASES``/``_VOXELS``."""
    import os

    limits = []
    for env, default in ((MAX_CASES_ENV, MAX_PLANNED_CASES), (MAX_VOXELS_ENV, MAX_PLANNED_VOXELS)):
        raw = os.environ.get(env, "").strip()
        try:
            value = int(float(raw)) if raw else default
        except ValueError:
            raise SpecError(f"plan_dataset expects {env} to be a positive number, but got {env}={raw!r}. "
                            "Unset it to use the default.") from None
        if value < 1:
            raise SpecError(f"plan_dataset expects {env} to be a positive number, but got {env}={raw!r}.")
        limits.append(value)
    return limits[0], limits[1]


def _check_plan_size(spec: DatasetSpec, cohorts: list[CohortPlan | None]) -> None:
    """Refuse a spec whose cohorts together plan more cases or voxels than the caps allow."""
    max_cases, max_voxels = planned_limits()
    n_cases = sum(c.count for c in spec.cohorts)
    n_voxels = sum(c.voxels_per_case * c.count for c in cohorts if c is not None)
    if n_cases > max_cases:
        raise SpecError([spec.source.issue(("cohorts",), (
            f"plan_dataset expects at most {max_cases:,} cases per spec (all cohorts), but got cases={n_cases:,}. "
            f"Split the dataset into several specs, or raise the cap with {MAX_CASES_ENV}."))])
    if n_voxels > max_voxels:
        raise SpecError([spec.source.issue(("cohorts",), (
            f"plan_dataset expects at most {max_voxels:,} voxels per spec (all cohorts; about "
            f"{2 * max_voxels / 1e12:.0f} TB of int16), but got voxels={n_voxels:,}. Fewer or smaller cases, "
            f"several specs, or raise the cap with {MAX_VOXELS_ENV}."))])


def _resolved_mask_source(spec: DatasetSpec, cohort: Cohort) -> MaskSource:
    """The cohort's mask source as the case reads it: the same typed source, its paths resolved."""
    source = cohort.mask_source
    paths = {key: spec.resolve_path(getattr(source, key)) for key in ("path", "autoencoder_path", "diffusion_path")
             if getattr(source, key, None)}
    return source.model_copy(update=paths) if paths else source


def format_plan(spec: DatasetSpec, plan: DatasetPlan) -> str:
    """Return the plan as a text table (what ``ctfactory check-spec`` prints)."""
    head = (f"dataset {spec.name} v{spec.version}  spec_id {plan.spec_id}  model {spec.model.ref}  "
            f"seed {spec.seed}\noutput_root {spec.output_uri}\n")
    cols = ["cohort", "cases", "region", "pathology", "size (vox)", "spacing (mm)", "steps", "mask", "voxels",
            "GPU mem/case", "CPU mem/case"]
    rows = [[c.name, str(c.count), "+".join(c.body_region), c.pathology, "x".join(map(str, c.output_size)),
             "x".join(f"{s:g}" for s in c.spacing_mm), str(c.num_inference_steps), c.mask_source,
             f"{c.voxels_per_case * c.count:,}", f"{c.est_gpu_memory_gb:g} GB ({c.memory_note})",
             "not measured" if c.est_cpu_memory_gb is None else f"{c.est_cpu_memory_gb:g} GB"]
            for c in plan.cohorts]
    rows.append(["total", str(len(plan.cases)), "", "", "", "", "", "", f"{plan.total_voxels:,}", "", ""])
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [cols, *rows]]
    return head + "\n".join(lines) + "\n"


def cases_per_task(generation_batch: int | str, *, device: str, latent_voxels: int | None = None) -> int:
    """The most cases one generation task takes: ``runtime.generation_batch``, or for ``auto``
    :data:`maisi_core.engine.batching.MAX_AUTO_BATCH` on CUDA (the task's generator then batches as many
    as fit) and :func:`maisi_core.engine.batching.cpu_batch_size` of the case's latent on a CPU (1 when
    unknown)."""
    from maisi_core.engine.batching import MAX_AUTO_BATCH, cpu_batch_size

    if generation_batch != "auto":
        return int(generation_batch)
    if device.startswith("cuda"):
        return MAX_AUTO_BATCH
    return 1 if latent_voxels is None else cpu_batch_size(latent_voxels, limit=MAX_AUTO_BATCH)


def batch_cases(cases: Sequence[CaseRequest], per_task: int | Callable[[CaseRequest], int], *,
                slots: int | None = None) -> list[list[CaseRequest]]:
    """Split cases into tasks of at most ``per_task`` that share model, size, spacing and steps, in plan order.

    ``per_task`` is a number, or a function of a group's first case (the size decides on a CPU). With
    ``slots`` (tasks the runner runs at once), a group is spread over at least that many tasks when it
    has the cases, so a few large batches never leave workers idle: 8 cases on 4 GPUs make 4 tasks of 2.
    """
    groups: dict[tuple, list[CaseRequest]] = {}
    for case in cases:
        groups.setdefault((case.model_ref, case.output_size, case.spacing_mm, case.num_inference_steps),
                          []).append(case)
    tasks = []
    for group in groups.values():
        most = per_task(group[0]) if callable(per_task) else per_task
        if most < 1:
            raise FactoryError(f"batch_cases expects per_task >= 1, but got per_task={most}.")
        size = most if not slots else max(1, min(most, math.ceil(len(group) / slots)))
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    return tasks
