"""Sample rows on their way into a commit: the Arrow table, uniqueness, exactly-once app ids, committed rows.

Each ``samples`` commit carries Delta app ids (one per bucket of sample_id hashes), so two commits that
hold the same sample_id cannot both land; :func:`drop_committed` removes rows already committed with the
same content before a retry, and refuses rows whose content changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from catalog.errors import RecordError, RecordExistsError
from catalog.schema import (
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    VOLATILE_COLUMNS,
    SampleRecord,
    check_sample_row,
    conform_table,
    rows_to_table,
    utc_now,
)

APP_ID_PREFIX = "ctfactory.samples/"
APP_ID_BUCKETS = 4096


def sample_app_ids(sample_ids: Iterable[str]) -> list[str]:
    """Return the Delta app ids a commit of ``sample_ids`` carries: one per bucket of sample_id hashes.

    Two commits holding the same sample_id always share its app id, so Delta refuses the second.
    """
    buckets = {int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=4).digest(), "big") % APP_ID_BUCKETS
               for sid in sample_ids}
    return [f"{APP_ID_PREFIX}{b:04d}" for b in sorted(buckets)]


def drop_committed(table: DeltaTable, new: pa.Table) -> pa.Table:
    """Return ``new`` without rows already committed with the same content; raise on changed content."""
    ids = new["sample_id"].to_pylist()
    dataset = table.to_pyarrow_dataset(file_pruning_predicate=[("sample_id", "in", ids)])
    existing = conform_table(dataset.to_table(filter=pc.field("sample_id").isin(ids)), SAMPLES_SCHEMA)
    if existing.num_rows == 0:
        return new
    compare = [c for c in new.column_names if c not in VOLATILE_COLUMNS]
    stored = {r["sample_id"]: r for r in comparable_rows(existing.select(compare))}
    keep = []
    for row in comparable_rows(new.select(compare)):
        old = stored.get(row["sample_id"])
        if old is not None and old != row:
            diff = sorted(k for k in row if old.get(k) != row[k])
            raise RecordExistsError(
                f"append_samples expects committed sample_ids to keep their content, but got "
                f"sample_id={row['sample_id']!r} with different {', '.join(diff)}. "
                f"Rows are append-only; use a new sample_id (e.g. a new attempt)."
            )
        keep.append(old is None)
    return new.filter(pa.array(keep, type=pa.bool_()))


def repeated_ids(ids: pa.Table) -> dict[str, int]:
    """Return ``{sample_id: count}`` for the sample_ids that occur more than once in ``ids``."""
    counts = ids.group_by("sample_id").aggregate([("sample_id", "count")])
    counts = counts.filter(pc.greater(counts["sample_id_count"], 1))
    return dict(zip(counts["sample_id"].to_pylist(), counts["sample_id_count"].to_pylist(), strict=True))


def sample_table(records: Iterable[SampleRecord | Mapping[str, Any]]) -> pa.Table:
    """Rows for a ``samples`` commit: stamped (created_at, schema_version), checked, unique, as a table."""
    rows = [r.to_row() if isinstance(r, SampleRecord) else dict(r) for r in records]
    for row in rows:
        row.setdefault("created_at", utc_now())
        row.setdefault("schema_version", SCHEMA_VERSION)
        check_sample_row(row)
    check_unique([r["sample_id"] for r in rows])
    return rows_to_table(rows, SAMPLES_SCHEMA)


def check_unique(ids: Sequence[str]) -> None:
    """Refuse a batch that names a sample_id twice."""
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            raise RecordError(
                f"append_samples expects each sample_id once per batch, but got sample_id={sid!r} twice."
            )
        seen.add(sid)


def comparable_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Return rows as dicts with map columns turned into dicts, so key order does not matter."""
    rows = table.to_pylist()
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for row in rows:
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
    return rows
