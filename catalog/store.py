"""The catalog store: two Delta Lake tables under ``ROOT/catalog`` with append-only, versioned commits.

``ROOT/catalog/samples`` holds one row per generated case and ``ROOT/catalog/datasets`` one row per
dataset version. Every commit is a numbered Delta version that can be read back (time travel) and
carries custom commit metadata (spec_id, code version, ...). Delta Lake makes concurrent appends
from several processes safe, locally and on S3.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from catalog import fs as _fs
from catalog.errors import CatalogNotFoundError, RecordError, RecordExistsError
from catalog.schema import (
    DATASETS_SCHEMA,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    VOLATILE_COLUMNS,
    SampleRecord,
    check_sample_row,
    conform_table,
    rows_to_table,
    utc_now,
)

logger = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("samples", "datasets")
_HISTORY_SEARCH = 64
# Layout for fast filtered queries: cluster rows on the usual filter columns, small row groups.
ZORDER_COLUMNS: tuple[str, ...] = ("body_region", "pathology", "qc_pass")
OPTIMIZE_ROW_GROUP_ROWS = 32_768
_SCHEMAS = {"samples": SAMPLES_SCHEMA, "datasets": DATASETS_SCHEMA}


def open_catalog(root_uri: str | Path, storage_options: Mapping[str, str] | None = None) -> Catalog:
    """Open the catalog of the dataset output root ``root_uri`` (the tables may not exist yet).

    Args:
        root_uri: Local path or fsspec URI (``s3://bucket/ds``) of the dataset output root.
        storage_options: deltalake storage options (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
            ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ...).

    Returns:
        A :class:`Catalog`; reading methods raise :class:`CatalogNotFoundError` until a first append.
    """
    if not str(root_uri).strip():
        raise CatalogNotFoundError(f"open_catalog expects a path or URI, but got root_uri={root_uri!r}.")
    return Catalog(_fs.normalize_root(root_uri), storage_options=storage_options)


class Catalog:
    """The versioned record of one dataset output root (see :func:`open_catalog`)."""

    def __init__(self, root_uri: str, *, storage_options: Mapping[str, str] | None = None) -> None:
        self.root_uri = root_uri
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"Catalog({self.root_uri!r})"

    # -- tables -----------------------------------------------------------------------------
    def table_uri(self, name: str) -> str:
        """Return the URI of table ``name`` (``"samples"`` or ``"datasets"``)."""
        return _fs.join_uri(self.root_uri, "catalog", name)

    def delta_table(self, name: str = "samples", *, version: int | None = None) -> DeltaTable:
        """Return the Delta table ``name``, at ``version`` when given.

        Raises:
            CatalogNotFoundError: When the table or the version does not exist.
        """
        uri = self.table_uri(name)
        try:
            table = DeltaTable(uri, storage_options=self.storage_options or None)
        except TableNotFoundError as exc:
            raise CatalogNotFoundError(
                f"Catalog expects a {name} table at {uri}, but got none. Append rows first or check ROOT."
            ) from exc
        if version is not None:
            if not 0 <= version <= table.version():
                raise CatalogNotFoundError(
                    f"Catalog expects a {name} version in [0, {table.version()}], but got version={version}."
                )
            table.load_as_version(version)
        return table

    def exists(self, name: str = "samples") -> bool:
        """Return True when table ``name`` has at least one commit."""
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.storage_options or None)

    @property
    def version(self) -> int | None:
        """The latest version of the ``samples`` table, or None when it does not exist yet."""
        table = self._open_or_none("samples")
        return None if table is None else table.version()

    def read_table(self, name: str = "samples", *, as_of: int | None = None,
                   columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """Read table ``name`` (conformed to the current schema), optionally filtered.

        Args:
            name: ``"samples"`` or ``"datasets"``.
            as_of: A ``samples`` version. For ``datasets`` it keeps rows whose ``samples_version``
                is at most ``as_of``.
            columns: Columns to return (all when None).
            filter: A pyarrow expression pushed down to the Parquet scan.
        """
        if name == "datasets":
            table = self.delta_table("datasets").to_pyarrow_dataset().to_table(filter=filter)
            table = conform_table(table, DATASETS_SCHEMA)
            if as_of is not None:
                keep = pc.fill_null(pc.less_equal(table["samples_version"], as_of), True)
                table = table.filter(keep)
        else:
            dataset = self.delta_table(name, version=as_of).to_pyarrow_dataset()
            present = set(dataset.schema.names)
            scan_columns = None if columns is None else [c for c in columns if c in present]
            table = conform_table(dataset.to_table(columns=scan_columns, filter=filter), _SCHEMAS[name])
        if columns is not None:
            table = table.select(list(columns))
        return table

    # -- writing ----------------------------------------------------------------------------
    def append_samples(self, records: Iterable[SampleRecord | Mapping[str, Any]], *,
                       commit_metadata: Mapping[str, Any] | None = None) -> int:
        """Append sample rows in one atomic commit; never overwrite an existing ``sample_id``.

        Rows identical (ignoring ``created_at``) to committed ones are skipped, so re-committing a
        batch is a no-op that returns the current version without a new commit.

        Args:
            records: :class:`SampleRecord` objects or row dicts.
            commit_metadata: Stored in the Delta commit (spec_id, code_version, flow run, ...).

        Returns:
            The table version holding the rows.

        Raises:
            RecordError: When a row breaks a catalog rule or a sample_id repeats within the batch.
            RecordExistsError: When a sample_id is committed already with different content.
        """
        rows = [r.to_row() if isinstance(r, SampleRecord) else dict(r) for r in records]
        for row in rows:
            row.setdefault("created_at", utc_now())
            row.setdefault("schema_version", SCHEMA_VERSION)
            check_sample_row(row)
        _check_unique([r["sample_id"] for r in rows])
        new = rows_to_table(rows, SAMPLES_SCHEMA)
        table = self._open_or_none("samples")
        if table is not None:
            new = _drop_committed(table, new)
            if new.num_rows == 0:
                logger.info("append_samples: every row is committed already; no new version")
                return table.version()
        return self._commit("samples", new, "append_samples", commit_metadata, table=table)

    def append_dataset(self, row: Mapping[str, Any], *, commit_metadata: Mapping[str, Any] | None = None) -> int:
        """Append one dataset-version row (spec, counts, metrics, model, licence) to ``datasets``.

        Extra numeric keys named like metrics (``fd_*``, ``metric_*``) become float columns through
        schema merge.

        Returns:
            The new version of the ``datasets`` table.
        """
        values = dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row)
        for key in ("dataset", "dataset_version"):
            if not values.get(key):
                raise RecordError(f"append_dataset expects a non-empty {key}, but got {key}={values.get(key)!r}.")
        values.setdefault("created_at", utc_now())
        values.setdefault("schema_version", SCHEMA_VERSION)
        if values.get("samples_version") is None:
            values["samples_version"] = self.version
        table = rows_to_table([values], DATASETS_SCHEMA)
        return self._commit("datasets", table, "append_dataset", commit_metadata)

    def _open_or_none(self, name: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None

    def _commit(self, name: str, data: pa.Table, operation: str, metadata: Mapping[str, Any] | None, *,
                table: DeltaTable | None = None) -> int:
        custom = {str(k): str(v) for k, v in (metadata or {}).items()}
        token = uuid.uuid4().hex
        custom.update({"ctfactory.operation": operation, "ctfactory.rows": str(data.num_rows),
                       "ctfactory.schema_version": str(SCHEMA_VERSION), "ctfactory.commit_id": token})
        write_deltalake(
            table if table is not None else self.table_uri(name), data, mode="append", schema_mode="merge",
            storage_options=self.storage_options or None,
            commit_properties=CommitProperties(custom_metadata=custom),
        )
        # Another writer may have committed right after us, so find our commit by its token.
        table = table if table is not None else self.delta_table(name)
        table.update_incremental()
        version = table.version()
        for entry in table.history(limit=_HISTORY_SEARCH):
            if entry.get("ctfactory.commit_id") == token:
                version = int(entry["version"])
                break
        logger.info("%s: committed %d rows to %s as version %d", operation, data.num_rows, name, version)
        return version

    def optimize(self, *, z_order: Sequence[str] = ZORDER_COLUMNS,
                 row_group_rows: int = OPTIMIZE_ROW_GROUP_ROWS) -> dict[str, Any]:
        """Rewrite the ``samples`` files clustered on ``z_order`` (one new version, same rows).

        Many small commits leave many small files; this compacts them and lets filtered queries
        skip row groups by their statistics. Older versions stay readable until vacuumed.

        Returns:
            delta-rs optimize metrics (files added and removed, ...).
        """
        table = self.delta_table("samples")
        metrics = table.optimize.z_order(
            list(z_order), writer_properties=WriterProperties(max_row_group_size=row_group_rows),
            commit_properties=CommitProperties(custom_metadata={"ctfactory.operation": "optimize"}),
        )
        logger.info("optimize: %s", metrics)
        return metrics

    # -- reading helpers ----------------------------------------------------------------------
    def committed_sample_ids(self, *, status: str | None = None) -> set[str]:
        """Return the committed sample_ids (all, or only those with ``status``), for resuming runs."""
        table = self._open_or_none("samples")
        if table is None:
            return set()
        flt = None if status is None else pc.field("status") == status
        ids = table.to_pyarrow_dataset().to_table(columns=["sample_id"], filter=flt)["sample_id"]
        return set(ids.to_pylist())

    def history(self, name: str = "samples") -> list[dict[str, Any]]:
        """Return the commits of table ``name``, newest first (version, timestamp, operation, metadata)."""
        entries = self.delta_table(name).history()
        return sorted(entries, key=lambda e: e.get("version", -1), reverse=True)

    def query(self, where: Any = None, *, as_of: int | None = None,
              columns: Sequence[str] | None = None) -> pa.Table:
        """Return ``samples`` rows matching ``where`` at version ``as_of`` (see :mod:`catalog.query`)."""
        from catalog.query import query_samples

        return query_samples(self, where, as_of=as_of, columns=columns)

    def sql(self, statement: str, *, as_of: int | None = None) -> pa.Table:
        """Run DuckDB SQL over the tables ``samples`` and ``datasets`` (see :mod:`catalog.query`)."""
        from catalog.query import query_sql

        return query_sql(self, statement, as_of=as_of)


def _drop_committed(table: DeltaTable, new: pa.Table) -> pa.Table:
    """Return ``new`` without rows already committed with the same content; raise on changed content."""
    ids = new["sample_id"].to_pylist()
    dataset = table.to_pyarrow_dataset(file_pruning_predicate=[("sample_id", "in", ids)])
    existing = conform_table(dataset.to_table(filter=pc.field("sample_id").isin(ids)), SAMPLES_SCHEMA)
    if existing.num_rows == 0:
        return new
    compare = [c for c in new.column_names if c not in VOLATILE_COLUMNS]
    stored = {r["sample_id"]: r for r in _comparable(existing.select(compare))}
    keep = []
    for row in _comparable(new.select(compare)):
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


def _check_unique(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            raise RecordError(
                f"append_samples expects each sample_id once per batch, but got sample_id={sid!r} twice."
            )
        seen.add(sid)


def _comparable(table: pa.Table) -> list[dict[str, Any]]:
    """Return rows as dicts with map columns turned into dicts, so key order does not matter."""
    rows = table.to_pylist()
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for row in rows:
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
    return rows
