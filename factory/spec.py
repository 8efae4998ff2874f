"""The dataset spec: pydantic v2 models (``extra="forbid"`` everywhere), YAML loading and ``spec_id``.

Pure: no Prefect import. A spec names the dataset, the model, where to write, and cohorts of cases;
:func:`load_spec` reads YAML with line numbers so every error names the file, the YAML path and the
line. The spec's content hash :func:`spec_id` excludes ``output_root``, ``runtime`` and ``schedule``
(where and when to run does not change what is generated).

``model`` accepts a string or a mapping:

* ``preset:tiny``: the ``tiny`` preset with seeded random weights (``init_seed=0``). It exists so the
  factory runs end to end on a CPU before real weights are available; its images are not CT-like.
* ``default``: the embedded default model, shipped as package data in ``maisi_core/models/default``
  (trained on procedural phantoms only; see its MODEL_CARD.md).
* a model directory path (``model_index.json`` + safetensors), optionally with ``preset:`` naming the
  preset whose geometry rules apply when the directory is not on the planning machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from factory.errors import SpecError
from factory.spec_source import SourceMap, drop_missing_explained_by_typos, issue_from_pydantic, load_yaml
from maisi_core.engine.decoding import DECODE_PRESETS
from maisi_core.anatomy.labels import TUMOR_TYPES
from maisi_core.anatomy.mask_types import FolderOptions, GeneratorOptions, UserOptions, option_default

MAX_OUTPUT_VOX = 1024  # per axis: beyond any model's geometry, and 1024^3 float32 is already 4 GB
SPEC_ID_HEX = 16  # spec_id = first 16 hex characters (64 bits) of the sha256 of the canonical JSON
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RULE = "a name of letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)"

TumorName = Literal[tuple(TUMOR_TYPES)]  # type: ignore[valid-type]  # the names of maisi_core.anatomy.labels.TUMOR_TYPES
DecodePresetName = Literal[("auto", *DECODE_PRESETS)]  # type: ignore[valid-type]  # maisi_core.engine.decoding's presets


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_model_ref(value: Any) -> Any:
    return {"ref": value} if isinstance(value, str) else value


def _as_mask_source(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


def _as_region_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _none_pathology(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.strip().lower() == "none") else value


class ModelRef(_Strict):
    """Which model generates: ``preset:NAME``, ``default`` or a model directory path."""

    ref: str = Field(min_length=1, description="'preset:tiny', 'default' or a model directory path")
    preset: str | None = Field(None, description="preset whose geometry rules plan a directory that is absent here")


class Tumor(_Strict):
    """A tumour to place in its host organ."""

    type: TumorName
    size_mm: tuple[float, float] = Field(description="[min, max] diameter in mm")
    host_organ: str | None = Field(None, description="implied by type; when given it must match")

    @model_validator(mode="after")
    def _check(self) -> Tumor:
        lo, hi = self.size_mm
        if not 0 < lo <= hi <= 300:
            raise ValueError(f"Tumor expects size_mm [min, max] with 0 < min <= max <= 300, but got "
                             f"size_mm={list(self.size_mm)}.")
        hosts = TUMOR_TYPES[self.type].host_organs
        if self.host_organ is not None and self.host_organ not in hosts:
            raise ValueError(f"Tumor expects host_organ in {list(hosts)} for type={self.type!r}, but got "
                             f"host_organ={self.host_organ!r}. Leave it out: the host is implied by the type.")
        return self

    @property
    def label_id(self) -> int:
        """The tumour's MAISI label ID."""
        return TUMOR_TYPES[self.type].label_id


class PhantomMasks(_Strict):
    """Masks drawn by the procedural phantom (the default)."""

    type: Literal["phantom"] = "phantom"


class FolderMasks(_Strict):
    """Candidate masks from a local folder (the closest by geometry, drawn per case by seed)."""

    type: Literal["folder"]
    path: str = Field(min_length=1, description="folder of NIfTI label maps (with or without mask_index.json)")
    required_labels: list[int | str] = Field(default_factory=list, description="IDs or names a candidate must hold")
    top_k: int = Field(option_default(FolderOptions, "top_k"), ge=1, le=1000,
                       description="draw among the k best candidates")


class UserMasks(_Strict):
    """User label maps (one local NIfTI file, or a folder: case i takes file i mod n in name order)."""

    type: Literal["user"]
    path: str = Field(min_length=1)
    label_mapping: dict[int, int | str] | Literal["maisi", "totalsegmentator"] = Field(
        description="source ID -> MAISI ID or name; 'totalsegmentator' (v2 total task) or 'maisi' (already MAISI IDs)")
    unmapped: Literal["error", "background", "body"] = option_default(UserOptions, "unmapped")
    add_body: bool = Field(option_default(UserOptions, "add_body"),
                           description="add body label 200 around the labelled structures")


class GeneratorMasks(_Strict):
    """Masks from MAISI's mask generator (released checkpoints, or ``preset: tiny`` random weights for tests)."""

    type: Literal["maisi_mask_generator"]
    autoencoder_path: str | None = None
    diffusion_path: str | None = None
    preset: Literal["tiny", "official"] = "official"
    size_vector: list[float] | None = Field(None, min_length=10, max_length=10)
    num_inference_steps: int = Field(option_default(GeneratorOptions, "num_inference_steps"), ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self) -> GeneratorMasks:
        if self.preset == "official" and not (self.autoencoder_path and self.diffusion_path):
            raise ValueError("GeneratorMasks expects autoencoder_path and diffusion_path with preset 'official', "
                             f"but got autoencoder_path={self.autoencoder_path!r}, "
                             f"diffusion_path={self.diffusion_path!r}. Give both released checkpoints.")
        return self


MaskSource = Annotated[
    PhantomMasks | FolderMasks | UserMasks | GeneratorMasks,
    Field(discriminator="type"),
    BeforeValidator(_as_mask_source, json_schema_input_type=str | dict),
]


class QCSettings(_Strict):
    """Quality-check settings of a cohort."""

    thresholds_hu: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="organ -> [low, high] median HU overriding MAISI's reference range")
    organ_hu_check: bool = Field(True, description="false: the image is not expected to be CT (random or untrained "
                                                   "weights, stub generators): organ median-HU ranges and the checks "
                                                   "that read the image against the labels (image orientation, "
                                                   "tumour contrast, label agreement) are skipped; sanity and "
                                                   "label-map checks still run")
    orientation_check: bool = Field(True, description="left/right: lateral structures on the side their names say "
                                                      "(world x, RAS+), and the image not mirrored against the labels")
    tumor_check: bool = Field(True, description="a requested tumour is visible against its host (per-type HU "
                                                "contrast) and its diameter matches the requested size_mm")
    agreement_check: bool = Field(True, description="labelled structures show their tissue's HU (air, bone, soft "
                                                    "tissue, vessel) in at least half their voxels")
    max_retries: int = Field(2, ge=0, le=10, description="re-tries on derived seeds after a failed attempt")

    @model_validator(mode="after")
    def _check(self) -> QCSettings:
        from maisi_core.evaluation.qc import ORGAN_LABEL_IDS
        from maisi_core.errors import did_you_mean

        for organ, (low, high) in self.thresholds_hu.items():
            if organ not in ORGAN_LABEL_IDS:
                raise ValueError(f"QCSettings expects thresholds_hu organs from {sorted(ORGAN_LABEL_IDS)}, but "
                                 f"got organ={organ!r}.{did_you_mean(organ, ORGAN_LABEL_IDS)}")
            if not low < high:
                raise ValueError(f"QCSettings expects thresholds_hu [low, high] with low < high, but got "
                                 f"{organ}={[low, high]}.")
        return self


class Cohort(_Strict):
    """A group of cases sharing region, pathology, geometry and mask source."""

    name: str = Field(pattern=NAME_PATTERN)
    count: int = Field(ge=1, le=1_000_000, strict=True)  # strict: `count: true` is not 1
    body_region: Annotated[list[str], BeforeValidator(_as_region_list, json_schema_input_type=str | list[str])]
    pathology: Annotated[Tumor | None, BeforeValidator(_none_pathology, json_schema_input_type=Literal["none"] | dict)] = None
    output_size: tuple[int, int, int] | None = Field(None, description="(x, y, z) voxels; region default if absent")
    spacing_mm: tuple[float, float, float] | None = Field(None, description="(x, y, z) mm; region default if absent")
    mask_source: MaskSource = Field(default_factory=PhantomMasks)
    qc: QCSettings = Field(default_factory=QCSettings)
    num_inference_steps: int | None = Field(None, ge=1, le=1000, description="model default if absent")

    @field_validator("body_region")
    @classmethod
    def _normalise_regions(cls, value: list[str]) -> list[str]:
        from maisi_core.errors import LabelNameError
        from maisi_core.anatomy.labels import BODY_REGIONS, normalize_region

        out = []
        for r in value:
            try:
                out.append(normalize_region(str(r)))
            except LabelNameError as exc:
                raise ValueError(str(exc).replace("normalize_region", "Cohort.body_region")) from None
        if not out:
            raise ValueError(f"Cohort expects at least one body_region from {list(BODY_REGIONS)}, but got "
                             "body_region=[].")
        return [r for r in BODY_REGIONS if r in out]

    @model_validator(mode="after")
    def _check(self) -> Cohort:
        if self.pathology is not None:
            regions = TUMOR_TYPES[self.pathology.type].regions
            if not set(regions) & set(self.body_region):
                raise ValueError(f"Cohort expects a body_region containing the {self.pathology.type}'s host "
                                 f"({' or '.join(regions)}), but got body_region={self.body_region}. "
                                 f"Add {regions[0]!r} to body_region.")
        for name in ("output_size", "spacing_mm"):
            value = getattr(self, name)
            if value is not None and any(v <= 0 for v in value):
                raise ValueError(f"Cohort expects positive {name}, but got {name}={list(value)}.")
        if self.output_size is not None and max(self.output_size) > MAX_OUTPUT_VOX:
            raise ValueError(f"Cohort expects output_size of at most {MAX_OUTPUT_VOX} voxels per axis (MAISI's "
                             f"largest is 512x512x768), but got output_size={list(self.output_size)}.")
        return self

    @property
    def pathology_name(self) -> str:
        """``none`` or the tumour type."""
        return "none" if self.pathology is None else self.pathology.type


class Schedule(_Strict):
    """When a served deployment runs: a cron expression or a fixed interval."""

    cron: str | None = Field(None, description='five-field cron, e.g. "0 2 * * *"')
    interval_minutes: int | None = Field(None, ge=1)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if (self.cron is None) == (self.interval_minutes is None):
            raise ValueError(f"Schedule expects exactly one of cron or interval_minutes, but got "
                             f"cron={self.cron!r}, interval_minutes={self.interval_minutes!r}.")
        if self.cron is not None:
            from datetime import datetime

            from cronsim import CronSim, CronSimError  # Prefect's own cron parser

            problem = "" if len(self.cron.split()) == 5 else "not five fields"
            if not problem:
                try:
                    CronSim(self.cron, datetime(2026, 1, 1))
                except CronSimError as exc:
                    problem = str(exc).lower()
            if problem:
                raise ValueError(f"Schedule expects a five-field cron expression (minute hour day month weekday), "
                                 f"but got cron={self.cron!r} ({problem}). Example: \"0 2 * * *\".")
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"Schedule expects an IANA timezone such as 'UTC' or 'Europe/Berlin', but got "
                             f"timezone={self.timezone!r}.") from None
        return self


class Runtime(_Strict):
    """How to run (not part of ``spec_id``); the CLI may override each field."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|inproc|ucx)://.+")
    dask_local_workers: int | None = Field(None, ge=1, le=256)
    batch_size: int = Field(8, ge=1, le=10_000, description="records per catalog commit")
    gpu_slots: int = Field(1, ge=1, le=16, description="concurrent cases per GPU")
    max_workers: int = Field(1, ge=1, le=256, description="concurrent cases on CPU")
    threads: int | None = Field(None, ge=1, le=256,
                                description="torch CPU threads per worker process; absent: the cores shared "
                                            "by the concurrent cases (at most 8); recorded per sample")
    decode_preset: DecodePresetName | None = None
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="'auto': fp16 autocast on CUDA (upstream), fp32 on a CPU; recorded per sample")
    generator: str = Field("maisi", max_length=200,
                           description="case generator from a closed registry: 'maisi', 'sleep:SECONDS' "
                                       "(benchmark stub) or a name an installed package registers in the "
                                       "'ctfactory.generators' entry-point group; never a code path")

    @field_validator("generator")
    @classmethod
    def _registered_generator(cls, value: str) -> str:
        from factory.case import check_generator_name
        from factory.errors import ModelRefError

        try:
            return check_generator_name(value)
        except ModelRefError as exc:
            raise ValueError(str(exc)) from None


class DatasetSpec(_Strict):
    """A dataset to generate."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")
    description: str = ""
    model: Annotated[ModelRef, BeforeValidator(_as_model_ref, json_schema_input_type=str | dict)]
    output_root: str = Field(min_length=1, description="local path or fsspec URI (s3://bucket/prefix)")
    seed: int = Field(0, ge=0, lt=2**63)
    cohorts: list[Cohort] = Field(min_length=1)
    schedule: Schedule | None = None
    runtime: Runtime = Field(default_factory=Runtime)
    base_dir: str | None = Field(
        None, description="folder that relative paths in this spec (output_root, a model directory, mask "
                          "source paths) resolve against; load_spec sets it to the spec file's folder (a "
                          "relative base_dir resolves against that folder too); not part of the content hash")

    _source: SourceMap | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        names = [c.name for c in self.cohorts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"DatasetSpec expects unique cohort names, but got name={dup[0]!r} more than once.")
        return self

    @property
    def source(self) -> SourceMap:
        """Where the spec was read from (file and lines); ``<dict>`` when built in code."""
        return self._source or SourceMap()

    def resolve_path(self, text: str) -> str:
        """A path written in this spec as this machine reads it.

        URIs (``s3://...``) and absolute paths are returned unchanged; a relative local path is joined to
        :attr:`base_dir` (the spec file's folder), or left relative to the current folder when the spec
        was not read from a file.
        """
        if self.base_dir is None or "://" in text or os.path.isabs(text):
            return text
        return os.path.normpath(os.path.join(self.base_dir, text))

    @property
    def output_uri(self) -> str:
        """``output_root`` resolved against the spec's folder (see :meth:`resolve_path`)."""
        return self.resolve_path(self.output_root)

    @property
    def model_location(self) -> str:
        """The model reference as the loader reads it: ``preset:NAME`` and packaged names such as
        ``default`` unchanged, a model directory resolved against the spec's folder."""
        ref = self.model.ref
        if ref.startswith("preset:") or self.base_dir is None:
            return ref
        local = self.resolve_path(ref)
        if os.path.exists(local) or "/" in ref or os.sep in ref:
            return local
        return ref  # a packaged model name (``default``), or a missing directory the loader reports

    def with_runtime(self, *, output_root: str | None = None, **runtime: Any) -> DatasetSpec:
        """Return a copy with ``output_root`` and runtime fields replaced (None values are ignored)."""
        rt = self.runtime.model_copy(update={k: v for k, v in runtime.items() if v is not None})
        Runtime.model_validate(rt.model_dump())
        update: dict[str, Any] = {"runtime": rt}
        if output_root is not None:
            update["output_root"] = output_root
        new = self.model_copy(update=update)
        new._source = self._source
        return new


def _field_names() -> dict[tuple[str, ...], list[str]]:
    names: dict[tuple[str, ...], list[str]] = {(): list(DatasetSpec.model_fields)}
    names[("model",)] = list(ModelRef.model_fields)
    names[("cohorts",)] = list(Cohort.model_fields)
    names[("cohorts", "pathology")] = list(Tumor.model_fields)
    names[("cohorts", "qc")] = list(QCSettings.model_fields)
    names[("cohorts", "mask_source")] = sorted({*FolderMasks.model_fields, *UserMasks.model_fields,
                                                *GeneratorMasks.model_fields})
    names[("schedule",)] = list(Schedule.model_fields)
    names[("runtime",)] = list(Runtime.model_fields)
    return names


def validate_spec(data: Any, smap: SourceMap | None = None) -> DatasetSpec:
    """Validate spec data (a mapping); raise :class:`SpecError` listing every problem with its location."""
    smap = smap or SourceMap()
    if isinstance(data, DatasetSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError([smap.issue((), f"DatasetSpec expects a mapping at the top level, but got "
                                        f"{type(data).__name__}.")])
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as exc:
        names = _field_names()
        errors = drop_missing_explained_by_typos(list(exc.errors()), names)
        issues = [issue_from_pydantic(e, smap, names) for e in errors]
        issues.sort(key=lambda i: (i.line or 0, i.path))
        raise SpecError(issues) from None
    spec._source = smap
    return spec


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a YAML spec file; raise :class:`SpecError` naming file, YAML path and line."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"load_spec expects an existing YAML file, but got path={str(path)!r}.")
    from factory.spec_source import MAX_SPEC_BYTES

    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"load_spec expects a spec file of at most {MAX_SPEC_BYTES} bytes, but got "
                        f"size={p.stat().st_size} for path={str(path)!r}.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"load_spec expects UTF-8 text, but got an undecodable byte at offset {exc.start} "
                        f"of path={str(path)!r}.") from None
    spec = parse_spec(text, source=str(path))
    folder = p.resolve().parent
    base = folder if spec.base_dir is None else folder / spec.base_dir
    new = spec.model_copy(update={"base_dir": str(base.resolve())})
    new._source = spec._source
    return new


def parse_spec(text: str, *, source: str = "<string>") -> DatasetSpec:
    """Validate YAML text as a spec (see :func:`load_spec`)."""
    data, smap, issues = load_yaml(text, source)
    if issues and data is None:
        raise SpecError(issues)
    try:
        spec = validate_spec(data, smap)
    except SpecError as exc:
        raise SpecError(sorted([*issues, *exc.issues], key=lambda i: (i.line or 0, i.path))) from None
    if issues:
        raise SpecError(issues)
    return spec


def canonical_json(spec: DatasetSpec) -> str:
    """The spec's content as canonical JSON (sorted keys, no spaces), without where/when/how to run.

    Paths are hashed as written (relative ones stay relative) and ``base_dir`` is left out, so the same
    spec file gives the same ``spec_id`` wherever it is checked out.
    """
    content = spec.model_dump(mode="json", exclude={"output_root", "runtime", "schedule", "base_dir"})
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_id(spec: DatasetSpec) -> str:
    """Return the spec's content hash: the first 16 hex characters of sha256(canonical JSON)."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:SPEC_ID_HEX]


def json_schema() -> dict[str, Any]:
    """Return the JSON schema of :class:`DatasetSpec` (what ``specs/schema.json`` holds)."""
    schema = DatasetSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ctfactory dataset spec"
    return schema


def write_json_schema(path: str | Path) -> Path:
    """Write :func:`json_schema` to ``path`` (``specs/schema.json``) and return the path."""
    p = Path(path)
    p.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p


_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def is_safe_name(text: str) -> bool:
    """Return True when ``text`` is made of letters, digits, '_', '.', '-' only and is not '.' or '..'."""
    return bool(_SAFE.match(text)) and text not in (".", "..")
