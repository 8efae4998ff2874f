"""The catalog store: two Delta Lake tables under ``ROOT/catalog`` with append-only, versioned commits.

``ROOT/catalog/samples`` holds one row per generated case and ``ROOT/catalog/datasets`` one row per
dataset version. Every commit is a numbered Delta version that can be read back (time travel) and
carries custom commit metadata (spec_id, code version, ...).

A sample_id is committed exactly once, even when several processes or machines append it at the same
instant: each ``append_samples`` commit carries one Delta app transaction (``txn`` action) per bucket of
its sample_ids, and Delta's conflict check refuses a commit whose app ids a concurrent commit also used
(a plain append would be a blind append, which never conflicts). The loser re-reads the table, drops
what is committed now and commits the rest, a few times with jittered backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, WriterProperties
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import Transaction

from catalog import commit as _commits
from catalog import fs as _fs
from catalog import log as _log
from catalog import rows as _rows
from catalog.errors import (
    CatalogError,
    CatalogNotFoundError,
    CatalogReadError,
    RecordError,
)
from catalog.schema import (
    DATASETS_SCHEMA,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    SampleRecord,
    conform_table,
    rows_to_table,
    stored_names,
    utc_now,
)

logger = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("samples", "datasets")
# Layout for fast filtered queries: cluster rows on the usual filter columns, small row groups.
ZORDER_COLUMNS: tuple[str, ...] = ("body_region", "pathology", "qc_pass")
OPTIMIZE_ROW_GROUP_ROWS = 32_768
_SCHEMAS = {"samples": SAMPLES_SCHEMA, "datasets": DATASETS_SCHEMA}
_READ_ERRORS: tuple[type[BaseException], ...] = (DeltaError, OSError, pa.ArrowException)
_READ_HINT = "Check that ROOT is reachable and run `ctfactory catalog verify ROOT`."


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
            CatalogReadError: When the Delta log cannot be read (corrupt entry, unreachable store).
        """
        uri = self.table_uri(name)
        with self.reading(name):
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
        with self.reading(name):
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

        Raises:
            CatalogReadError: When the log or a data file it references cannot be read.
        """
        if name == "datasets":
            with self.reading(name):
                table = self.delta_table("datasets").to_pyarrow_dataset().to_table(filter=filter)
            table = conform_table(table, DATASETS_SCHEMA)
            if as_of is not None:
                keep = pc.fill_null(pc.less_equal(table["samples_version"], as_of), True)
                table = table.filter(keep)
        else:
            with self.reading(name):
                dataset = self.delta_table(name, version=as_of).to_pyarrow_dataset()
                present = set(dataset.schema.names)
                scan_columns = None if columns is None else [c for c in stored_names(columns) if c in present]
                table = dataset.to_table(columns=scan_columns, filter=filter)
            table = conform_table(table, _SCHEMAS[name])
        if columns is not None:
            table = table.select(list(columns))
        return table

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[None]:
        """Turn a deltalake, pyarrow or OS error raised while reading table ``name`` into a :class:`CatalogReadError`.

        Catalog errors pass through unchanged. When the Delta log itself is unreadable, the error
        names the bad log entry.
        """
        try:
            yield
        except CatalogError:
            raise
        except _READ_ERRORS as exc:
            raise self._read_error(name, exc) from exc

    def _read_error(self, name: str, exc: BaseException) -> CatalogReadError:
        if not isinstance(exc, OSError):  # a log the kernel could not parse: find the entry by hand
            try:
                self.logged_data_files(name)
            except CatalogReadError as located:
                return located
        return CatalogReadError.from_exception("Catalog", f"{name} table at {self.table_uri(name)}", exc,
                                               _READ_HINT)

    # -- writing ----------------------------------------------------------------------------
    def append_samples(self, records: Iterable[SampleRecord | Mapping[str, Any]], *,
                       commit_metadata: Mapping[str, Any] | None = None) -> int:
        """Append sample rows in one atomic commit; never overwrite or repeat a committed ``sample_id``.

        Rows identical (ignoring the volatile columns ``created_at`` and ``timings_s``) to committed ones
        are skipped, so re-committing a batch is a no-op that returns the current version without a new
        commit, also when another process committed the same rows a moment earlier. Exactly once per
        sample_id across processes and machines: the commit carries the Delta app ids of its
        sample_ids' buckets, so of two concurrent commits sharing one the second fails Delta's conflict
        check; it is then retried on a fresh read (up to ``catalog.commit.COMMIT_ATTEMPTS`` times, jittered backoff).

        Args:
            records: :class:`SampleRecord` objects or row dicts.
            commit_metadata: Stored in the Delta commit (spec_id, code_version, flow run, ...).

        Returns:
            The table version holding the rows.

        Raises:
            RecordError: When a row breaks a catalog rule or a sample_id repeats within the batch.
            RecordExistsError: When a sample_id is committed already with different content.
            CommitConflictError: When every attempt conflicted with concurrent writers.
        """
        new = _rows.sample_table(records)
        return self._retry_commits("append_samples", lambda: self._append_new_rows(new, commit_metadata))

    def _append_new_rows(self, new: pa.Table, commit_metadata: Mapping[str, Any] | None) -> int:
        """One attempt of :meth:`append_samples`: read, drop committed rows, commit the rest."""
        table = self._open_or_none("samples")
        if table is not None:
            with self.reading("samples"):
                new = _rows.drop_committed(table, new)
            if new.num_rows == 0:
                logger.info("append_samples: every row is committed already; no new version")
                return table.version()
        read_version = -1 if table is None else table.version()
        txns = [Transaction(app_id=a, version=read_version + 1, last_updated=int(time.time() * 1000))
                for a in _rows.sample_app_ids(new["sample_id"].to_pylist())]
        if table is not None:
            return self._commit("samples", new, "append_samples", commit_metadata, table=table,
                                app_transactions=txns)
        # Creating the table: delta-rs checks no conflicts for a create and would retry it on top of a
        # concurrent one, so create with mode="error" and no retry; the loser re-reads and appends.
        try:
            return self._commit("samples", new, "append_samples", commit_metadata, mode="error",
                                app_transactions=txns)
        except DeltaError as exc:
            if not self.exists("samples"):
                raise
            raise _commits.TableCreatedConcurrently(str(exc)) from exc

    def _retry_commits(self, operation: str, attempt: Callable[[], int]) -> int:
        return _commits.retry_commits(operation, attempt, where=self.table_uri("samples"))

    def _commit(self, name: str, data: pa.Table, operation: str, metadata: Mapping[str, Any] | None, *,
                table: DeltaTable | None = None, mode: str = "append", predicate: str | None = None,
                app_transactions: Sequence[Transaction] = ()) -> int:
        target = table if table is not None else self.table_uri(name)
        return _commits.commit(target, data, operation, metadata, table_name=name,
                               storage_options=self.storage_options, reopen=lambda: self.delta_table(name),
                               mode=mode, predicate=predicate, app_transactions=app_transactions)

    def replace_failed_samples(self, records: Iterable[SampleRecord | Mapping[str, Any]], *,
                               commit_metadata: Mapping[str, Any] | None = None) -> int:
        """Replace committed *failed* rows by new records of the same sample_ids, in one atomic commit.

        What ``ctfactory run --retry-failed`` commits: a recorded failure generated again on new attempt
        seeds. The failed row stays readable in earlier versions (time travel), so nothing is lost. A
        sample_id whose row is no longer failed when the commit is made (another run retried it first)
        keeps that row and the new record is dropped; a sample_id not committed at all is appended. The
        commit carries the app ids of its sample_ids like :meth:`append_samples`, so it conflicts with
        any concurrent commit of the same ids and is retried on a fresh read.

        Returns:
            The table version holding the rows.
        """
        new = _rows.sample_table(records)

        def attempt() -> int:
            table = self._open_or_none("samples")
            if table is None:
                return self._append_new_rows(new, commit_metadata)
            ids = new["sample_id"].to_pylist()
            with self.reading("samples"):
                current = table.to_pyarrow_dataset().to_table(columns=["sample_id", "status"],
                                                             filter=pc.field("sample_id").isin(ids)).to_pylist()
            failed = sorted({r["sample_id"] for r in current if r["status"] == "failed"})
            absent = set(ids) - {r["sample_id"] for r in current}
            if absent:
                self._append_new_rows(new.filter(pc.field("sample_id").isin(sorted(absent))), commit_metadata)
            if not failed:
                return self.delta_table("samples").version()
            keep = new.filter(pc.field("sample_id").isin(failed))
            txns = [Transaction(app_id=a, version=table.version() + 1, last_updated=int(time.time() * 1000))
                    for a in _rows.sample_app_ids(failed)]
            listed = ", ".join("'" + sid.replace("'", "''") + "'" for sid in failed)
            return self._commit("samples", keep, "replace_failed_samples", commit_metadata, table=table,
                                mode="overwrite", predicate=f"sample_id IN ({listed})", app_transactions=txns)

        return self._retry_commits("replace_failed_samples", attempt)

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

    def remove_duplicate_samples(self, *, commit_metadata: Mapping[str, Any] | None = None
                                 ) -> tuple[tuple[str, ...], int | None]:
        """Keep one row per ``sample_id`` (the one committed first) in ONE atomic commit.

        Older catalog versions could commit a sample_id twice under concurrent appends. The commit
        replaces the rows of each repeated sample_id by its row from the earliest version (the first
        in its file when one file holds several); older versions stay readable (time travel).

        Returns:
            The repeated sample_ids (sorted) and the new version, or ``((), None)`` when none repeats.
        """
        repeated: list[str] = []

        def attempt() -> int:
            table = self.delta_table("samples")
            keep = self._earliest_rows_of_duplicates(table)
            repeated[:] = [] if keep is None else sorted(keep["sample_id"].to_pylist())
            if keep is None:
                return -1
            ids = ", ".join("'" + sid.replace("'", "''") + "'" for sid in repeated)
            return self._commit("samples", keep, "remove_duplicate_samples", commit_metadata, table=table,
                                mode="overwrite", predicate=f"sample_id IN ({ids})")

        version = self._retry_commits("remove_duplicate_samples", attempt)
        return tuple(repeated), (None if version < 0 else version)

    def duplicate_sample_ids(self, *, as_of: int | None = None) -> dict[str, int]:
        """Return ``{sample_id: row count}`` for every sample_id with more than one row at ``as_of``."""
        return _rows.repeated_ids(self.read_table("samples", as_of=as_of, columns=["sample_id"]))

    def _earliest_rows_of_duplicates(self, table: DeltaTable) -> pa.Table | None:
        with self.reading("samples"):
            dataset = table.to_pyarrow_dataset()
            repeated = list(_rows.repeated_ids(dataset.to_table(columns=["sample_id"])))
            if not repeated:
                return None
            rows = dataset.to_table(columns=[*dataset.schema.names, "__filename"],
                                    filter=pc.field("sample_id").isin(repeated), use_threads=False)
        first_version = self.logged_data_files("samples")
        files = rows["__filename"].to_pylist()
        order = sorted(range(rows.num_rows), key=lambda i: (first_version.get(files[i], 1 << 62), files[i], i))
        seen: set[str] = set()
        keep = []
        for i, sid in ((i, rows["sample_id"][i].as_py()) for i in order):
            if sid not in seen:
                seen.add(sid)
                keep.append(i)
        return rows.drop_columns(["__filename"]).take(sorted(keep))

    def _open_or_none(self, name: str) -> DeltaTable | None:
        with self.reading(name):
            try:
                return DeltaTable(self.table_uri(name), storage_options=self.storage_options or None)
            except TableNotFoundError:
                return None

    def optimize(self, *, z_order: Sequence[str] = ZORDER_COLUMNS,
                 row_group_rows: int = OPTIMIZE_ROW_GROUP_ROWS, checkpoint: bool = False) -> dict[str, Any]:
        """Rewrite the ``samples`` files clustered on ``z_order`` (one new version, same rows).

        Many small commits leave many small files; this compacts them and lets filtered queries
        skip row groups by their statistics. Older versions stay readable until vacuumed. With
        ``checkpoint``, a checkpoint of the result follows (as :meth:`compact` writes one).

        Returns:
            delta-rs optimize metrics (files added and removed, ...).
        """
        table = self.delta_table("samples")
        metrics = table.optimize.z_order(
            list(z_order), writer_properties=WriterProperties(max_row_group_size=row_group_rows),
            commit_properties=CommitProperties(custom_metadata={"ctfactory.operation": "optimize"}),
        )
        if checkpoint:
            table.update_incremental()
            table.create_checkpoint()
        logger.info("optimize: %s", metrics)
        return metrics

    def compact(self, *, checkpoint: bool = True) -> dict[str, Any]:
        """Merge the ``samples`` table's small files (one new version, same rows), then write a checkpoint.

        Each commit of a run adds one small Parquet file, and every later commit and ``committed_ids``
        reads them all; compaction bin-packs the small files and leaves files already at the target
        size alone, so unlike :meth:`optimize` (z-order) it does not rewrite the whole table each time.
        The checkpoint of the new version lets the next reader skip replaying the JSON commits before
        it (benchmarks/SCALE.md). Older versions stay readable until vacuumed.

        Returns:
            delta-rs optimize metrics (``numFilesAdded``, ``numFilesRemoved``, ...) and ``version``.
        """
        table = self.delta_table("samples")
        metrics = table.optimize.compact(
            writer_properties=WriterProperties(max_row_group_size=OPTIMIZE_ROW_GROUP_ROWS),
            commit_properties=CommitProperties(custom_metadata={"ctfactory.operation": "compact"}),
        )
        table.update_incremental()
        if checkpoint:
            table.create_checkpoint()
        logger.info("compact: %s", metrics)
        return {**metrics, "version": table.version()}

    # -- reading helpers ----------------------------------------------------------------------
    def committed_sample_ids(self, *, status: str | None = None) -> set[str]:
        """Return the committed sample_ids (all, or only those with ``status``), for resuming runs."""
        table = self._open_or_none("samples")
        if table is None:
            return set()
        flt = None if status is None else pc.field("status") == status
        with self.reading("samples"):
            ids = table.to_pyarrow_dataset().to_table(columns=["sample_id"], filter=flt)["sample_id"]
        return set(ids.to_pylist())

    def history(self, name: str = "samples") -> list[dict[str, Any]]:
        """Return the commits of table ``name``, newest first (version, timestamp, operation, metadata)."""
        table = self.delta_table(name)
        with self.reading(name):
            entries = table.history()
        return sorted(entries, key=lambda e: e.get("version", -1), reverse=True)

    def query(self, where: Any = None, *, as_of: int | None = None,
              columns: Sequence[str] | None = None) -> pa.Table:
        """Return ``samples`` rows matching ``where`` at version ``as_of`` (see :mod:`catalog.engine`)."""
        from catalog.engine import query_samples

        return query_samples(self, where, as_of=as_of, columns=columns)

    def sql(self, statement: str, *, as_of: int | None = None) -> pa.Table:
        """Run DuckDB SQL over the tables ``samples`` and ``datasets`` (see :mod:`catalog.engine`)."""
        from catalog.engine import query_sql

        return query_sql(self, statement, as_of=as_of)

    def logged_data_files(self, name: str = "samples") -> dict[str, int]:
        """Map every data file any version of table ``name`` mentions to the first version mentioning it.

        See :func:`catalog.log.logged_data_files`, which this calls with the table's URI.
        """
        return _log.logged_data_files(self.table_uri(name), self.storage_options)
