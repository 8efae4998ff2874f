"""The dataset spec: pydantic v2 models (``extra="forbid"`` everywhere), YAML loading and ``spec_id``.

Pure: no Prefect import. A spec names the dataset, the model, where to write, and cohorts of cases
(their models are in :mod:`factory.spec_cohort`); :func:`load_spec` reads YAML with line numbers so
every error names the file, the YAML path and the line. The spec's content hash :func:`spec_id` excludes
``output_root``, ``runtime`` and ``schedule`` (where and when to run does not change what is generated).

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

from pydantic import (BeforeValidator, Field, PrivateAttr, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from factory.errors import SpecError
from factory.spec_cohort import (
    NAME_PATTERN,
    Cohort,
    FolderMasks,
    GeneratorMasks,
    QCSettings,
    StrictModel,
    Tumor,
    UserMasks,
)
from factory.spec_source import SourceMap, drop_missing_explained_by_typos, issue_from_pydantic, load_yaml
from maisi_core.engine.decoding import DECODE_PRESETS

SPEC_ID_HEX = 16  # spec_id = first 16 hex characters (64 bits) of the sha256 of the canonical JSON
DecodePresetName = Literal[("auto", *DECODE_PRESETS)]  # type: ignore[valid-type]  # maisi_core.engine.decoding's presets


def _as_model_ref(value: Any) -> Any:
    return {"ref": value} if isinstance(value, str) else value


class ModelRef(StrictModel):
    """Which model generates: ``preset:NAME``, ``default`` or a model directory path."""

    ref: str = Field(min_length=1, description="'preset:tiny', 'default' or a model directory path")
    preset: str | None = Field(None, description="preset whose geometry rules plan a directory that is absent here")


class Schedule(StrictModel):
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


class Runtime(StrictModel):
    """How to run (not part of ``spec_id``); the CLI may override each field."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|inproc|ucx)://.+")
    dask_local_workers: int | None = Field(None, ge=1, le=256)
    batch_size: int = Field(8, ge=1, le=10_000, description="records per catalog commit")
    compact_every: int | None = Field(
        None, ge=1, le=1_000_000,
        description="compact the samples table's small files (as 'ctfactory catalog optimize' does) after every N "
                    "commits of a run; absent: never (benchmarks/SCALE.md: worth it from about 10^5 cases)")
    gpu_slots: int = Field(1, ge=1, le=16, description="concurrent cases per GPU")
    max_workers: int = Field(1, ge=1, le=256, description="concurrent cases on CPU")
    threads: int | None = Field(None, ge=1, le=256,
                                description="torch CPU threads per worker process; absent: the cores shared "
                                            "by the concurrent cases (at most 8); recorded per sample")
    decode_preset: DecodePresetName | None = None
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="'auto': fp16 autocast on CUDA (upstream), fp32 on a CPU; recorded per sample")
    generation_batch: Annotated[int | str, WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 64}, {"const": "auto"}]})] = Field(
        1, description="cases of one cohort (same model, size, spacing and steps) denoised together: a number, or "
                       "'auto' (on CUDA as many as free memory allows, at most 8; on a CPU up to 4 small cases); "
                       "recorded per sample. A case's voxels then differ from batch 1 in the last float bits "
                       "(about 0.005 HU, written as int16: a voxel here and there by 1 HU), so the default, 1, "
                       "gives the same volumes however the run is spread; a pinned number reproduces its own "
                       "volumes")
    concurrency_limit: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$",
        description="name of a Prefect global concurrency limit that every generation task holds one slot of while "
                    "it runs (create it with 'prefect gcl create NAME --limit N'): caps the cases on the GPU(s) "
                    "across every run that names it; the limit must exist on the Prefect API the run uses")
    generator: str = Field("maisi", max_length=200,
                           description="case generator from a closed registry: 'maisi', 'sleep:SECONDS' "
                                       "(benchmark stub) or a name an installed package registers in the "
                                       "'ctfactory.generators' entry-point group; never a code path")

    @field_validator("generation_batch", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
            return value
        raise ValueError(f"Runtime expects generation_batch 'auto' or a whole number from 1 to 64, but got "
                         f"generation_batch={value!r}.")

    @field_validator("generator")
    @classmethod
    def _registered_generator(cls, value: str) -> str:
        from factory.case import check_generator_name
        from factory.errors import ModelRefError

        try:
            return check_generator_name(value)
        except ModelRefError as exc:
            raise ValueError(str(exc)) from None


class DatasetSpec(StrictModel):
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
        try:
            Runtime.model_validate(rt.model_dump())
        except ValidationError as exc:  # a command-line override: the same messages as in a spec file
            names = _field_names()
            where = SourceMap("command line")
            raise SpecError([issue_from_pydantic({**e, "loc": ("runtime", *e["loc"])}, where, names)
                             for e in exc.errors()]) from None
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
