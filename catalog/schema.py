"""The catalog schema: one place for the ``samples`` and ``datasets`` tables' columns.

Schema changes are additive: a new column is appended to the pyarrow schema below and
``SCHEMA_VERSION`` goes up by one. Tables written by older code (missing newer columns) still read,
with the missing columns filled with nulls by :func:`conform_table`, and appends add the columns
through Delta Lake's schema merge. A renamed column (:data:`RENAMED_COLUMNS`) reads from its old name
in rows written before the rename; the old column stays in the stored files and is never shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CatalogPathError, RecordError, SchemaMismatchError
from catalog.fs import relative_path

SCHEMA_VERSION = 6  # 2: samples.precision; 3: samples.tumor_contrast_hu, tumor_diameter_mm, label_agreement;
# 4: samples.cpu_threads; 5: samples.modality, organ_hu_median renamed organ_median; datasets.model_card,
# metric_sources, utility_*; 6: samples.generation_batch
STATUSES: tuple[str, ...] = ("passed", "failed")
TIMESTAMP = pa.timestamp("us", tz="UTC")
_FLOAT_MAP = pa.map_(pa.string(), pa.float64())

SAMPLES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string()),
    pa.field("dataset_version", pa.string()),
    pa.field("spec_id", pa.string()),
    pa.field("cohort", pa.string()),
    pa.field("case_index", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("attempt", pa.int32()),
    pa.field("model_name", pa.string()),
    pa.field("model_digest", pa.string()),
    pa.field("code_version", pa.string()),
    pa.field("body_region", pa.string()),
    pa.field("pathology", pa.string()),
    pa.field("tumor_label", pa.int32()),
    pa.field("tumor_size_mm", pa.float64()),
    pa.field("output_size", pa.list_(pa.int32())),
    pa.field("spacing_mm", pa.list_(pa.float64())),
    pa.field("mask_source", pa.string()),
    pa.field("mask_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("label_uri", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("label_sha256", pa.string()),
    pa.field("image_bytes", pa.int64()),
    pa.field("label_bytes", pa.int64()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("qc_pass", pa.bool_(), nullable=False),
    pa.field("qc_failures", pa.list_(pa.string())),
    pa.field("organ_median", _FLOAT_MAP),  # organ -> median intensity, in the modality's unit (CT: HU)
    pa.field("timings_s", _FLOAT_MAP),
    pa.field("device", pa.string()),
    pa.field("failure_reason", pa.string()),
    pa.field("created_at", TIMESTAMP, nullable=False),
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("precision", pa.string()),  # v2: "fp16", "bf16" or "fp32" as run; null in v1 rows
    pa.field("tumor_contrast_hu", pa.float64()),  # v3: median(tumour) - median(host ring), QC-measured
    pa.field("tumor_diameter_mm", pa.float64()),  # v3: equivalent-sphere diameter of the labelled tumour
    pa.field("label_agreement", _FLOAT_MAP),  # v3: structure -> fraction of voxels in its tissue HU range
    pa.field("cpu_threads", pa.int32()),  # v4: torch CPU threads of the worker that made it; null in older rows
    pa.field("modality", pa.string()),  # v5: "CT" or "MR", the unit of the intensity columns (read as CT before)
    pa.field("generation_batch", pa.int32()),  # v6: cases denoised together with it (itself included); 1 before
])

# Columns renamed in a schema version: current name -> the name rows written before it carry.
RENAMED_COLUMNS: dict[str, str] = {"organ_median": "organ_hu_median"}  # v5
# Values that rows written before a column existed implicitly had: every row before v5 is CT, and every case
# before v6 was denoised alone.
IMPLIED_VALUES: dict[str, Any] = {"modality": "CT", "generation_batch": 1}

DATASETS_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("dataset_version", pa.string(), nullable=False),
    pa.field("spec", pa.string()),
    pa.field("spec_id", pa.string()),
    pa.field("samples_version", pa.int64()),
    pa.field("n_samples", pa.int64()),
    pa.field("n_passed", pa.int64()),
    pa.field("n_failed", pa.int64()),
    pa.field("cohort_counts", pa.map_(pa.string(), pa.int64())),
    pa.field("metrics", _FLOAT_MAP),
    pa.field("timings_s", _FLOAT_MAP),
    pa.field("code_version", pa.string()),
    pa.field("model_name", pa.string()),
    pa.field("model_digest", pa.string()),
    pa.field("licence", pa.string()),
    pa.field("created_at", TIMESTAMP, nullable=False),
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_card", pa.string()),  # v5: the generator model's card (Markdown); see catalog.model_card
    pa.field("metric_sources", pa.map_(pa.string(), pa.string())),  # v5: metric -> extractor and its version
    # v5: downstream utility (factory.utility): segmenter trained with and without the synthetic cases
    pa.field("utility_segmenter", pa.string()),
    pa.field("utility_budget", pa.string()),  # JSON: the UtilityConfig every arm trained with
    pa.field("utility_arms", pa.string()),  # JSON: [{name, ratio, n_real, n_synthetic}]
    pa.field("utility_real_fingerprint", pa.string()),  # sha256 of the real cases (never the images)
    pa.field("utility_test", pa.string()),  # which real cases were the test set
    pa.field("utility_results", pa.string()),  # JSON: per arm and structure, Dice and surface Dice with CIs, deltas
    pa.field("utility_mean_dice_delta", _FLOAT_MAP),  # arm -> mean Dice delta against real only
])

# Columns that do not take part in the "same content" check of an idempotent re-commit.
# How and when a row was made, not what it is: two records differing only here are the same record.
VOLATILE_COLUMNS: frozenset[str] = frozenset({"created_at", "timings_s", "cpu_threads", "generation_batch",
                                              "schema_version"})
METRIC_PREFIXES: tuple[str, ...] = ("fd_", "metric_", "diversity_", "memorisation_")


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime (microsecond resolution)."""
    return datetime.now(timezone.utc)


# The fields a row takes unchanged from the case that made it (a ``factory.plan.CaseRequest`` has each).
CASE_FIELDS: tuple[str, ...] = ("sample_id", "dataset", "dataset_version", "spec_id", "cohort", "case_index",
                                "pathology", "output_size", "spacing_mm", "tumor_label")


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One generated case (or one failed attempt) as a row of the ``samples`` table.

    A passing row carries its image and label URIs, sha256 digests and byte sizes; a failed row has
    ``status="failed"``, ``qc_pass=False`` and no URIs, so it is never published as passing.
    """

    sample_id: str
    dataset: str
    dataset_version: str
    spec_id: str
    cohort: str
    case_index: int
    seed: int
    attempt: int
    model_name: str
    model_digest: str
    code_version: str
    body_region: str
    pathology: str
    output_size: Sequence[int]
    spacing_mm: Sequence[float]
    mask_source: str
    status: str
    qc_pass: bool
    tumor_label: int | None = None
    tumor_size_mm: float | None = None
    mask_id: str | None = None
    image_uri: str | None = None
    label_uri: str | None = None
    image_sha256: str | None = None
    label_sha256: str | None = None
    image_bytes: int | None = None
    label_bytes: int | None = None
    qc_failures: Sequence[str] = ()
    organ_median: Mapping[str, float] = dataclasses.field(default_factory=dict)
    timings_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
    device: str = ""
    precision: str = ""
    cpu_threads: int | None = None
    tumor_contrast_hu: float | None = None
    tumor_diameter_mm: float | None = None
    label_agreement: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modality: str = "CT"
    generation_batch: int | None = None
    failure_reason: str | None = None
    created_at: datetime = dataclasses.field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_sample_row(self.to_row())

    def to_row(self) -> dict[str, Any]:
        """Return the record as a plain dict keyed by ``SAMPLES_SCHEMA`` column names."""
        row = dataclasses.asdict(self)
        row["output_size"] = [int(v) for v in self.output_size]
        row["spacing_mm"] = [float(v) for v in self.spacing_mm]
        row["qc_failures"] = [str(v) for v in self.qc_failures]
        row["organ_median"] = {str(k): float(v) for k, v in self.organ_median.items()}
        row["timings_s"] = {str(k): float(v) for k, v in self.timings_s.items()}
        row["label_agreement"] = {str(k): float(v) for k, v in self.label_agreement.items()}
        return {name: row[name] for name in SAMPLES_SCHEMA.names}


def check_sample_row(row: Mapping[str, Any]) -> None:
    """Check the catalog rules of one ``samples`` row.

    Args:
        row: A row dict (as from :meth:`SampleRecord.to_row`).

    Raises:
        RecordError: When the status is unknown, a failed row carries URIs or ``qc_pass=True``, a
            passing row lacks its URIs or digests, or the size/spacing lists do not have 3 values.
    """
    sid = row.get("sample_id")
    if not sid:
        raise RecordError(f"SampleRecord expects a non-empty sample_id, but got sample_id={sid!r}.")
    status = row.get("status")
    if status not in STATUSES:
        raise RecordError(
            f"SampleRecord expects status in {list(STATUSES)}, but got status={status!r} "
            f"for sample_id={sid!r}."
        )
    for name in ("output_size", "spacing_mm"):
        value = row.get(name)
        if value is None or len(value) != 3:
            raise RecordError(
                f"SampleRecord expects {name} with 3 values, but got {name}={value!r} for sample_id={sid!r}."
            )
    uris = ("image_uri", "label_uri", "image_sha256", "label_sha256")
    if status == "failed":
        if row.get("qc_pass"):
            raise RecordError(f"SampleRecord expects qc_pass=False on a failed row, but got qc_pass=True "
                              f"for sample_id={sid!r}.")
        present = [u for u in uris if row.get(u)]
        if present:
            raise RecordError(f"SampleRecord expects no files on a failed row, but got {present[0]}="
                              f"{row[present[0]]!r} for sample_id={sid!r}. Failed cases are never published.")
    else:
        for key in ("image_uri", "label_uri"):
            if row.get(key):
                try:
                    relative_path(row[key], who="SampleRecord")
                except CatalogPathError:
                    raise RecordError(f"SampleRecord expects {key} relative to the output root, but got {key}="
                                      f"{row[key]!r} for sample_id={sid!r}. No absolute paths, URIs or '..'.") from None
        missing = [u for u in uris if not row.get(u)]
        if missing:
            raise RecordError(f"SampleRecord expects {missing[0]} on a passed row, but got {missing[0]}="
                              f"{row.get(missing[0])!r} for sample_id={sid!r}.")


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table of ``schema`` from row dicts, adding extra float columns for unknown metric keys.

    Args:
        rows: Row dicts; keys missing from a row become nulls.
        schema: The table schema (``SAMPLES_SCHEMA`` or ``DATASETS_SCHEMA``).

    Returns:
        A pyarrow table whose first columns follow ``schema``.

    Raises:
        SchemaMismatchError: When a row has a key that is not in ``schema`` and is not a numeric
            metric column (named with one of ``METRIC_PREFIXES``), or a value of the wrong type.
    """
    fields = list(schema)
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    for key in extra:
        values = [r.get(key) for r in rows]
        numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
        if not key.startswith(METRIC_PREFIXES) or not numeric:
            raise SchemaMismatchError(
                f"Catalog expects only schema columns or numeric metric columns starting with "
                f"{list(METRIC_PREFIXES)}, but got column={key!r}. Known columns: {', '.join(schema.names)}."
            )
        fields.append(pa.field(key, pa.float64()))
    full = pa.schema(fields)
    try:
        return pa.Table.from_pylist([dict(r) for r in rows], schema=full)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaMismatchError(
            f"Catalog expects rows matching the schema, but got a value that does not convert: {exc}."
        ) from exc


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with ``schema``'s columns first (missing ones as nulls) and extra columns after.

    A column renamed since the table was written (:data:`RENAMED_COLUMNS`) takes its values from the old
    name where the new one is null; the old column is dropped. A column added with a value that older
    rows implicitly had (:data:`IMPLIED_VALUES`) is filled with it.

    Args:
        table: A table read from storage, maybe written by an older schema version.
        schema: The current schema.

    Raises:
        SchemaMismatchError: When a stored column cannot be cast to its current type.
    """
    arrays, fields, merged = [], [], set()
    for field in schema:
        column = _stored_column(table, field.name, field.type)
        old_name = RENAMED_COLUMNS.get(field.name)
        if old_name is not None and old_name in table.column_names:
            old = _stored_column(table, old_name, field.type)
            column = old if column is None else pc.coalesce(column, old)
            merged.add(old_name)
        if column is None:
            column = pa.nulls(table.num_rows, type=field.type)
        if field.name in IMPLIED_VALUES:
            column = pc.fill_null(column, pa.scalar(IMPLIED_VALUES[field.name], type=field.type))
        arrays.append(column)
        fields.append(field.with_nullable(True))
    for name in table.column_names:
        if name not in schema.names and name not in merged:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def stored_names(names: Sequence[str]) -> list[str]:
    """Return ``names`` plus the old names of any renamed among them: the columns to scan for them."""
    out = list(names)
    out += [RENAMED_COLUMNS[n] for n in names if n in RENAMED_COLUMNS and RENAMED_COLUMNS[n] not in out]
    return out


def _stored_column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | None:
    if name not in table.column_names:
        return None
    column = table.column(name)
    if column.type == type_:
        return column
    try:
        return column.cast(type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatchError(
            f"Catalog expects column {name!r} of type {type_}, but got type={column.type}. The stored table "
            "was written by incompatible code."
        ) from exc
