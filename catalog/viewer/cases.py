"""The viewer's read-only view of one catalog: the case list, its filters and the volume files of a case.

A :class:`CaseIndex` reads the ``samples`` table once per version into a :class:`CaseSnapshot`; the
server answers every request from the snapshot it holds. Unless a version is pinned (``as_of``),
:meth:`CaseIndex.refresh` moves to the newest version when a run has committed more cases. Volume files
are found from the row's ``image_uri``/``label_uri`` through the one path rule
(:meth:`catalog.root.DatasetRoot.resolve`), so no row can make the viewer read outside the root.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import threading
from collections.abc import Mapping
from typing import Any, BinaryIO
from urllib.parse import quote

import pyarrow.compute as pc

from catalog import fs as _fs
from catalog.errors import QueryError
from catalog.query import table_to_records
from catalog.root import DatasetRoot

logger = logging.getLogger(__name__)

# The columns the case list carries (the full row is one request away).
LIST_COLUMNS: tuple[str, ...] = (
    "sample_id", "cohort", "case_index", "body_region", "pathology", "tumor_label", "tumor_diameter_mm",
    "status", "qc_pass", "modality", "output_size", "spacing_mm", "image_uri", "label_uri", "image_sha256",
    "label_sha256",
)
# Query parameter -> column of the exact-match filters; ``qc`` is ``pass``/``fail`` on ``qc_pass``.
FILTER_COLUMNS: dict[str, str] = {"cohort": "cohort", "body_region": "body_region", "pathology": "pathology",
                                  "status": "status"}
QC_VALUES: dict[str, bool] = {"pass": True, "fail": False}
VOLUME_KINDS: dict[str, str] = {"image": "image_uri", "label": "label_uri"}
DEFAULT_LIMIT = 500
MAX_LIMIT = 100_000
_VOLUME_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class CaseSnapshot:
    """The case list of one ``samples`` version.

    Attributes:
        version: the ``samples`` table version read.
        cases: one JSON-ready dict per row (:data:`LIST_COLUMNS` plus ``image_url``/``label_url``), sorted
            by sample_id.
        by_id: the same dicts by sample_id.
    """

    version: int
    cases: tuple[dict[str, Any], ...]
    by_id: Mapping[str, dict[str, Any]]

    def facets(self) -> dict[str, list[Any]]:
        """The values each filter can take in this version (sorted, without nulls)."""
        out: dict[str, list[Any]] = {}
        for param, column in FILTER_COLUMNS.items():
            out[param] = sorted({c[column] for c in self.cases if c[column] is not None})
        out["qc"] = [v for v in QC_VALUES if any(c["qc_pass"] is QC_VALUES[v] for c in self.cases)]
        return out


def volume_suffix(uri: str) -> str:
    """The NIfTI suffix of ``uri`` (``.nii.gz`` or ``.nii``); the page's URL ends with it so NiiVue reads it."""
    name = posixpath.basename(uri)
    return next((s for s in _VOLUME_SUFFIXES if name.endswith(s)), "")


def _with_urls(case: dict[str, Any]) -> dict[str, Any]:
    folder = f"/volumes/{quote(case['sample_id'], safe='')}"
    for kind, column in VOLUME_KINDS.items():
        uri = case.get(column)
        case[f"{kind}_url"] = None if not uri else f"{folder}/{kind}{volume_suffix(uri)}"
    return case


class CaseIndex:
    """Reads the ``samples`` table of ``root`` for the viewer (thread-safe; never writes).

    Args:
        root: the dataset root (local or fsspec URI, with its storage options).
        as_of: a ``samples`` version to pin; None follows the newest version on :meth:`refresh`.

    Raises:
        CatalogNotFoundError: the root has no ``samples`` table, or ``as_of`` does not exist.
        CatalogReadError: the table cannot be read.
    """

    def __init__(self, root: DatasetRoot, *, as_of: int | None = None) -> None:
        self.root = root
        self.as_of = as_of
        self._catalog = root.catalog()
        self._lock = threading.Lock()
        self._snapshot = self._read(as_of if as_of is not None else self._catalog.delta_table().version())

    @property
    def snapshot(self) -> CaseSnapshot:
        """The snapshot requests are answered from."""
        return self._snapshot

    def refresh(self) -> CaseSnapshot:
        """Move to the newest ``samples`` version (unless pinned) and return the snapshot."""
        if self.as_of is not None:
            return self._snapshot
        with self._lock:
            latest = self._catalog.delta_table().version()
            if latest != self._snapshot.version:
                logger.info("catalog moved from version %d to %d", self._snapshot.version, latest)
                self._snapshot = self._read(latest)
        return self._snapshot

    def _read(self, version: int) -> CaseSnapshot:
        table = self._catalog.read_table("samples", as_of=version, columns=list(LIST_COLUMNS))
        cases = sorted((_with_urls(c) for c in table_to_records(table)), key=lambda c: c["sample_id"])
        return CaseSnapshot(version, tuple(cases), {c["sample_id"]: c for c in cases})

    def list_cases(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The cases matching the filters in ``params``, at most ``limit`` of them from ``offset``.

        Args:
            params: query parameters: the exact-match filters of :data:`FILTER_COLUMNS`, ``qc``
                (``pass``/``fail``), ``limit`` (default 500) and ``offset``. An empty value means no filter.

        Returns:
            ``{"version", "total", "count", "offset", "samples"}``: ``total`` cases match, ``samples`` holds
            ``count`` of them.

        Raises:
            QueryError: an unknown parameter, an unknown ``qc`` value or a bad ``limit``/``offset``.
        """
        snapshot = self._snapshot
        known = {*FILTER_COLUMNS, "qc", "limit", "offset"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise QueryError(f"viewer expects filters from {sorted(known)}, but got {unknown[0]}="
                             f"{params[unknown[0]]!r}.")
        cases = list(snapshot.cases)
        for param, column in FILTER_COLUMNS.items():
            if params.get(param):
                cases = [c for c in cases if c[column] == params[param]]
        if params.get("qc"):
            if params["qc"] not in QC_VALUES:
                raise QueryError(f"viewer expects qc in {list(QC_VALUES)}, but got qc={params['qc']!r}.")
            cases = [c for c in cases if c["qc_pass"] is QC_VALUES[params["qc"]]]
        limit = _count_param(params, "limit", DEFAULT_LIMIT, low=1)
        offset = _count_param(params, "offset", 0, low=0)
        page = cases[offset:offset + limit]
        return {"version": snapshot.version, "total": len(cases), "count": len(page), "offset": offset,
                "samples": page}

    def find_case(self, sample_id: str) -> dict[str, Any] | None:
        """The listed case ``sample_id`` in the current snapshot, or None when there is none."""
        return self._snapshot.by_id.get(sample_id)

    def read_row(self, sample_id: str) -> dict[str, Any] | None:
        """The full ``samples`` row of ``sample_id`` at the snapshot's version, or None when there is none."""
        snapshot = self._snapshot
        if sample_id not in snapshot.by_id:
            return None
        table = self._catalog.read_table("samples", as_of=snapshot.version,
                                         filter=pc.field("sample_id") == sample_id)
        rows = table_to_records(table)
        return rows[0] if rows else None

    def volume_uri(self, case: Mapping[str, Any], kind: str) -> str | None:
        """The URI of the ``kind`` (``image``/``label``) volume of ``case``; None when the row has none.

        Raises:
            CatalogPathError: the row's URI would leave the root (absolute, a URI, ``..``, a link out).
        """
        relative = case.get(VOLUME_KINDS[kind])
        return None if not relative else self.root.resolve(relative)

    def open_volume(self, uri: str) -> tuple[BinaryIO, int]:
        """Open the volume at ``uri`` (from :meth:`volume_uri`) for reading; return the handle and its size."""
        fs, path = _fs.filesystem(uri, self.root.storage_options)
        size = int(fs.size(path))
        return fs.open(path, "rb"), size


def _count_param(params: Mapping[str, str], name: str, default: int, *, low: int) -> int:
    text = params.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= MAX_LIMIT:
        raise QueryError(f"viewer expects {name} an integer in [{low}, {MAX_LIMIT}], but got {name}={text!r}.")
    return value
