"""The query engine behind ``Catalog.query`` and ``Catalog.sql``: pushed-down filters and DuckDB SQL.

SQL sees two tables, ``samples`` and ``datasets``. They reach DuckDB as Arrow objects (a lazy
pyarrow dataset for ``samples``), because DuckDB's ``delta``/``httpfs`` extensions cannot be
installed offline.

:mod:`catalog.store` imports this module inside its methods; it reads a catalog only through
:class:`CatalogReader` and imports neither :mod:`catalog.store` nor :mod:`catalog.query`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import QueryError
from catalog.schema import DATASETS_SCHEMA, RENAMED_COLUMNS, SAMPLES_SCHEMA, conform_table

if TYPE_CHECKING:
    from deltalake import DeltaTable


class CatalogReader(Protocol):
    """The reading methods of :class:`catalog.store.Catalog` that the queries use."""

    def read_table(self, name: str = ..., *, as_of: int | None = ..., columns: Sequence[str] | None = ...,
                   filter: pc.Expression | None = ...) -> pa.Table: ...

    def delta_table(self, name: str = ..., *, version: int | None = ...) -> DeltaTable: ...

    def exists(self, name: str = ...) -> bool: ...


def _mapping_filter(where: Mapping[str, Any]) -> pc.Expression | None:
    expr = None
    for column, value in where.items():
        if column not in SAMPLES_SCHEMA.names:
            from maisi_core.errors import did_you_mean

            raise QueryError(f"query expects filter columns of samples, but got column={column!r}."
                             f"{did_you_mean(column, SAMPLES_SCHEMA.names)}")
        if isinstance(value, (list, tuple, set, frozenset)):
            part = pc.field(column).isin(list(value))
        elif value is None:
            part = pc.field(column).is_null()
        else:
            part = pc.field(column) == value
        expr = part if expr is None else expr & part
    return expr


def query_samples(catalog: CatalogReader, where: Any = None, *, as_of: int | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Return the ``samples`` rows matching ``where`` at version ``as_of``.

    Args:
        catalog: The catalog to read.
        where: None (all rows), a pyarrow expression, a ``{column: value | [values]}`` mapping, or
            a SQL boolean expression string (run through DuckDB, e.g. ``"seed > 3 AND qc_pass"``).
        as_of: A ``samples`` version (time travel); latest when None.
        columns: Columns to return (all when None).

    Returns:
        A pyarrow table (call ``.to_pandas()`` for a DataFrame).
    """
    if isinstance(where, str):
        cols = "*" if columns is None else ", ".join(f'"{c}"' for c in columns)
        return query_sql(catalog, f"SELECT {cols} FROM samples WHERE {where}", as_of=as_of)
    if isinstance(where, Mapping):
        where = _mapping_filter(where)
    elif where is not None and not isinstance(where, pc.Expression):
        raise QueryError(f"query expects where as None, a mapping, a SQL string or a pyarrow expression, "
                         f"but got where={type(where).__name__}.")
    return catalog.read_table("samples", as_of=as_of, columns=columns, filter=where)


def _samples_dataset(catalog: CatalogReader, as_of: int | None):
    """Return a lazy pyarrow dataset of ``samples`` whose schema includes every current column."""
    table = catalog.delta_table("samples", version=as_of)
    dataset = table.to_pyarrow_dataset()
    missing = [f for f in SAMPLES_SCHEMA if f.name not in dataset.schema.names]
    renamed = [old for old in RENAMED_COLUMNS.values() if old in dataset.schema.names]
    if not missing and not renamed:
        return dataset
    # An older table: read it eagerly, fill the newer columns with nulls and read renamed ones by their old name.
    return conform_table(dataset.to_table(), SAMPLES_SCHEMA)


def query_sql(catalog: CatalogReader, statement: str, *, as_of: int | None = None) -> pa.Table:
    """Run a DuckDB SQL statement where ``samples`` and ``datasets`` are the catalog tables.

    The statement runs in a sandbox: it sees the two tables only, with no access to local files or the
    network (``enable_external_access`` off and the configuration locked).

    Args:
        catalog: The catalog to read.
        statement: SQL text, e.g. ``"SELECT body_region, count(*) FROM samples GROUP BY 1"``.
        as_of: A ``samples`` version (time travel); ``datasets`` keeps rows up to that version.

    Raises:
        QueryError: When DuckDB rejects the statement.
    """
    samples = _samples_dataset(catalog, as_of)
    if catalog.exists("datasets"):
        datasets = catalog.read_table("datasets", as_of=as_of)
    else:
        datasets = DATASETS_SCHEMA.empty_table()
    con = duckdb.connect()
    try:
        con.register("samples", samples)
        con.register("datasets", datasets)
        # a sandbox: no file or network access beyond the two registered tables (no read_csv('/etc/..'),
        # no COPY ... TO, no ATTACH, no extension loading), and the statement cannot switch it back on
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        relation = con.sql(statement)
        return pa.table({}) if relation is None else relation.to_arrow_table()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise QueryError(f"query_sql expects valid DuckDB SQL over tables samples and datasets, but got "
                         f"sql={statement!r}: {first}") from exc
    finally:
        con.close()
