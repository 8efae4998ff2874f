"""Queries over the catalog: the common ``samples`` filter and result formatting.

``Catalog.query`` and ``Catalog.sql`` run in :mod:`catalog.engine` (pushed-down filters, DuckDB SQL).
"""

from __future__ import annotations

import io
import json
import logging
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.choices import OUTPUT_FORMATS, QC_CHOICES  # re-exported: the CLI reads them without this module
from catalog.errors import QueryError

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
