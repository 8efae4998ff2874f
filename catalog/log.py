"""Reading a Delta table's ``_delta_log`` by hand: the data files its JSON commits and checkpoints name.

:mod:`catalog.verify` uses it to tell untracked data files from logged ones, and :mod:`catalog.store`
to name the damaged log entry when deltalake cannot read a table.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import fs as _fs
from catalog.errors import CatalogReadError

_COMMIT_FILE = re.compile(r"(\d{20})\.json")
_CHECKPOINT_FILE = re.compile(r"(\d{20})\.checkpoint(\.[^/]+)?\.(parquet|json)")
_FILE_ACTIONS = ("add", "remove", "cdc")


def logged_data_files(table_uri: str, storage_options: Mapping[str, str] | None = None) -> dict[str, int]:
    """Map every data file any version of the table at ``table_uri`` mentions to the first version mentioning it.

    Reads every JSON commit and checkpoint of ``_delta_log`` through fsspec (so it works on S3
    too) and collects the paths of ``add``, ``remove`` and ``cdc`` actions, relative to the table
    folder. Files that a later version removed (optimize, repair) are included: older versions
    still reference them (time travel). A file only found in a checkpoint maps to its version.

    Raises:
        CatalogReadError: When a log entry cannot be read or parsed (the message names it).
    """
    fs, log = _fs.filesystem(_fs.join_uri(table_uri, "_delta_log"), storage_options)
    prefix = _fs.filesystem(table_uri, storage_options)[1].rstrip("/") + "/"
    files: dict[str, int] = {}
    with _reading_log_entry(log):
        fs.invalidate_cache(log)
        entries = sorted(fs.ls(log, detail=False))
    for path in entries:
        base = path.rsplit("/", 1)[-1]
        match = _COMMIT_FILE.fullmatch(base) or _CHECKPOINT_FILE.fullmatch(base)
        if match is None:
            continue
        version = int(match.group(1))
        with _reading_log_entry(path):
            found = (_parquet_log_paths(fs, path, log) if base.endswith(".parquet")
                     else _json_log_paths(fs.cat_file(path), path))
        for found_path in found:
            rel = unquote(found_path)
            rel = rel.split("://", 1)[-1] if "://" in rel else rel
            rel = rel.removeprefix(prefix)
            files[rel] = min(version, files.get(rel, version))
    return files


@contextlib.contextmanager
def _reading_log_entry(path: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, pa.ArrowException) as exc:  # json.JSONDecodeError is a ValueError
        raise CatalogReadError.from_exception(
            "Catalog", f"Delta log entry {path}", exc,
            "The Delta log is damaged; restore it from a backup (or re-run the commit that wrote it)."
        ) from exc


def _json_log_paths(raw: bytes, path: str) -> list[str]:
    """Return the data-file paths of the actions in one JSON commit (or JSON checkpoint)."""
    paths = []
    lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty (a Delta commit holds at least its commitInfo)")
    for line in lines:
        action = json.loads(line)
        for kind in _FILE_ACTIONS:
            if isinstance(action.get(kind), dict) and action[kind].get("path"):
                paths.append(action[kind]["path"])
    return paths


def _parquet_log_paths(fs: Any, path: str, log: str) -> list[str]:
    """Return the data-file paths in one checkpoint part, following v2 checkpoint sidecars."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        paths = []
        for kind in (*_FILE_ACTIONS, "sidecar"):
            if kind in names:
                column = parquet.read(columns=[f"{kind}.path"]).column(0)
                if pa.types.is_struct(column.type):  # pyarrow reads a nested column as its parent struct
                    column = pc.struct_field(column, "path")
                found = [p for p in column.to_pylist() if p]
                if kind == "sidecar":
                    for sidecar in found:
                        paths += _parquet_log_paths(fs, f"{log}/_sidecars/{unquote(sidecar)}", log)
                else:
                    paths += found
    return paths
