"""Queries over the catalog: pushed-down filters, DuckDB SQL, and result formatting.

SQL sees two tables, ``samples`` and ``datasets``. They reach DuckDB as Arrow objects (a lazy
pyarrow dataset for ``samples``), because DuckDB's ``delta``/``httpfs`` extensions cannot be
installed offline.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.choices import OUTPUT_FORMATS, QC_CHOICES  # re-exported: the CLI reads them without this module
from catalog.errors import QueryError
from catalog.schema import DATASETS_SCHEMA, SAMPLES_SCHEMA, conform_table

if TYPE_CHECKING:
    from catalog.store import Catalog

logger = logging.getLogger(__name__)



def sample_filter(*, region: str | None = None, pathology: str | None = None, qc: str | None = None,
                  status: str | None = None) -> pc.Expression | None:
    """Build a pyarrow filter over ``samples`` from the common fields; None when nothing is given.

    Args:
        region: Keep rows whose ``body_region`` equals this.
        pathology: Keep rows whose ``pathology`` equals this.
        qc: ``"pass"`` keeps rows with ``qc_pass`` true, ``"fail"`` those with it false.
        status: Keep rows whose ``status`` equals this (``"passed"`` or ``"failed"``).

    Raises:
        QueryError: When ``qc`` is not ``"pass"`` or ``"fail"``.
    """
    parts = []
    if region is not None:
        parts.append(pc.field("body_region") == region)
    if pathology is not None:
        parts.append(pc.field("pathology") == pathology)
    if qc is not None:
        if qc not in QC_CHOICES:
            raise QueryError(f"sample_filter expects qc in {list(QC_CHOICES)}, but got qc={qc!r}.")
        parts.append(pc.field("qc_pass") == (qc == "pass"))
    if status is not None:
        parts.append(pc.field("status") == status)
    if not parts:
        return None
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr


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


def query_samples(catalog: Catalog, where: Any = None, *, as_of: int | None = None,
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


def _samples_dataset(catalog: Catalog, as_of: int | None):
    """Return a lazy pyarrow dataset of ``samples`` whose schema includes every current column."""
    table = catalog.delta_table("samples", version=as_of)
    dataset = table.to_pyarrow_dataset()
    missing = [f for f in SAMPLES_SCHEMA if f.name not in dataset.schema.names]
    if not missing:
        return dataset
    # An older table: read it eagerly and fill the newer columns with nulls.
    return conform_table(dataset.to_table(), SAMPLES_SCHEMA)


def query_sql(catalog: Catalog, statement: str, *, as_of: int | None = None) -> pa.Table:
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


def _plain(value: Any, dtype: pa.DataType) -> Any:
    """Return ``value`` as JSON-ready Python (maps become dicts, timestamps ISO strings)."""
    if value is None:
        return None
    if pa.types.is_map(dtype):
        return {k: _plain(v, dtype.item_type) for k, v in value}
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return [_plain(v, dtype.value_type) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    """Return the rows of ``table`` as JSON-ready dicts."""
    types = {f.name: f.type for f in table.schema}
    return [{k: _plain(v, types[k]) for k, v in row.items()} for row in table.to_pylist()]


def _flatten_nested(table: pa.Table) -> pa.Table:
    """Replace list/map/struct columns by JSON text (CSV has no nested types)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            values = [None if v is None else json.dumps(_plain(v, field.type))
                      for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(values, type=pa.string()))
    return table


def format_result(table: pa.Table, fmt: str = "table") -> str | bytes:
    """Render a query result as text (``table``, ``json``, ``csv``) or bytes (``parquet``).

    Raises:
        QueryError: When ``fmt`` is not one of ``OUTPUT_FORMATS``.
    """
    if fmt == "table":
        if table.num_rows == 0:
            return f"(0 rows; columns: {', '.join(table.column_names)})\n"
        frame = _flatten_nested(table).to_pandas()
        return frame.to_string(index=False, max_colwidth=60) + f"\n({table.num_rows} rows)\n"
    if fmt == "json":
        return json.dumps(table_to_records(table), indent=1, sort_keys=False) + "\n"
    if fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(_flatten_nested(table), sink)
        return sink.getvalue().decode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    raise QueryError(f"format_result expects fmt in {list(OUTPUT_FORMATS)}, but got fmt={fmt!r}.")


def write_result(table: pa.Table, fmt: str, output: str | Path) -> Path:
    """Write a query result to ``output`` in format ``fmt`` and return the path."""
    path = Path(output)
    rendered = format_result(table, fmt)
    if isinstance(rendered, bytes):
        path.write_bytes(rendered)
    else:
        path.write_text(rendered)
    logger.info("wrote %d rows as %s to %s", table.num_rows, fmt, path)
    return path
