"""Verify a catalog against its files, find what crashes leave behind, and repair what can be repaired.

:func:`verify_catalog` checks that every passing row's image and label exist and match their sha256
and size, that no sample_id has more than one row, and that every data file the Delta log references
at the verified version is there. It also lists:

- *leftovers*: stray temporary files anywhere under the root (``.<name>.<32 hex>.tmp`` from the atomic
  writers of :mod:`maisi_core.io`, ``_delta_log/_commit_<uuid>.json.tmp`` from a Delta commit) and
  *untracked* Parquet files in ``catalog/samples`` and ``catalog/datasets`` that no version of the
  Delta log references (a kill inside a commit leaves one);
- *orphans*: volume files under the root that no row references (a crash between writing a file and
  committing its row; a later run of the same spec commits them).

:func:`repair_catalog` removes leftovers older than a grace age (so a write or commit in progress is
never touched) and rewrites repeated sample_ids to one row each in one atomic Delta commit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog import fs as _fs
from catalog.errors import CatalogPathError, CatalogReadError, VerifyError
from catalog.log import logged_data_files
from catalog.store import TABLES, Catalog

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_MIN_AGE_S = 900.0  # leftovers younger than this may belong to a write or commit in progress
_COLUMNS = ["sample_id", "status", "image_uri", "label_uri", "image_sha256", "label_sha256",
            "image_bytes", "label_bytes"]
_ATOMIC_TEMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # maisi_core.io: .<name>.<uuid4 hex>.tmp
_COMMIT_TEMP = re.compile(r"_commit_[0-9a-fA-F-]{32,36}\.json\.tmp")  # delta-rs: _delta_log/_commit_<uuid>.json.tmp
_CATALOG_DIR = "catalog/"


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One file that failed verification."""

    sample_id: str
    uri: str
    problem: str  # "missing", "sha256 mismatch", "size mismatch" or "outside the root"

    def __str__(self) -> str:
        return f"{self.sample_id}: {self.problem}: {self.uri}"


@dataclasses.dataclass(frozen=True)
class DuplicateSample:
    """A sample_id that has more than one row."""

    sample_id: str
    rows: int

    def __str__(self) -> str:
        return f"duplicate: {self.sample_id} ({self.rows} rows)"


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A file a crash left behind: a stray temporary file or an untracked Delta data file."""

    path: str  # relative to the root
    kind: str  # "stray temp" or "untracked data"
    age_s: float

    def __str__(self) -> str:
        return f"{self.kind} ({self.age_s:.0f} s old): {self.path}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_catalog`.

    ``ok`` is False when a referenced file is missing or altered, when a sample_id has more than one
    row, or when a leftover (stray temporary file, untracked data file) is at least ``min_age_s``
    old; ``ctfactory catalog verify --repair`` removes such leftovers and the repeated rows. Younger
    leftovers are listed but may belong to a write in progress, so they do not count. Orphan volumes
    never count (a later run of the spec commits them).
    """

    root_uri: str
    version: int
    rows_checked: int
    files_checked: int
    problems: tuple[FileProblem, ...]
    orphans: tuple[str, ...]
    duplicates: tuple[DuplicateSample, ...] = ()
    leftovers: tuple[Leftover, ...] = ()
    min_age_s: float = DEFAULT_MIN_AGE_S

    @property
    def ok(self) -> bool:
        """True with no missing or altered file, no repeated sample_id and no stale leftover."""
        return not self.problems and not self.duplicates and not self.stale_leftovers

    @property
    def missing(self) -> tuple[FileProblem, ...]:
        """The problems that are missing files."""
        return tuple(p for p in self.problems if p.problem == "missing")

    @property
    def mismatched(self) -> tuple[FileProblem, ...]:
        """The problems that are files whose sha256 or size differ from the catalog."""
        return tuple(p for p in self.problems if p.problem != "missing")

    @property
    def stale_leftovers(self) -> tuple[Leftover, ...]:
        """Leftovers at least ``min_age_s`` old: no write in progress owns them; repair removes them."""
        return tuple(f for f in self.leftovers if f.age_s >= self.min_age_s)

    @property
    def recent_leftovers(self) -> tuple[Leftover, ...]:
        """Leftovers younger than ``min_age_s``: possibly a write in progress, left alone."""
        return tuple(f for f in self.leftovers if f.age_s < self.min_age_s)

    def summary(self) -> str:
        """Return a short multi-line text summary."""
        lines = [(f"catalog {self.root_uri} version {self.version}: {self.rows_checked} passing rows, "
                  f"{self.files_checked} files checked, {len(self.missing)} missing, "
                  f"{len(self.mismatched)} mismatched, {len(self.orphans)} orphan files, "
                  f"{len(self.duplicates)} duplicate sample_ids, {len(self.stale_leftovers)} leftover files "
                  f"(+{len(self.recent_leftovers)} younger than {self.min_age_s:.0f} s)")]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  {d}" for d in self.duplicates]
        lines += [f"  leftover {f}" for f in self.stale_leftovers]
        lines += [f"  recent (may be in progress) {f}" for f in self.recent_leftovers]
        lines += [f"  orphan: {o}" for o in self.orphans]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise :class:`VerifyError` when a referenced file is missing or altered or a sample_id repeats."""
        if self.problems:
            first = self.problems[0]
            raise VerifyError(
                f"verify expects every passing row's files to exist and match the catalog, but got "
                f"{len(self.problems)} problem(s), first sample_id={first.sample_id!r}: {first.problem} "
                f"({first.uri}). Regenerate or restore the files."
            )
        if self.duplicates:
            raise VerifyError(
                f"verify expects one row per sample_id, but got {len(self.duplicates)} repeated, first "
                f"sample_id={self.duplicates[0].sample_id!r} ({self.duplicates[0].rows} rows). "
                f"Run `ctfactory catalog verify ROOT --repair`."
            )

    def after_repair(self, result: RepairResult) -> VerifyReport:
        """Return this report without the leftovers ``result`` removed.

        Only valid when the repair rewrote no rows (``result.deduplicated`` empty); after a
        de-duplicating commit, verify again.
        """
        removed = set(result.removed)
        return dataclasses.replace(self, leftovers=tuple(f for f in self.leftovers if f not in removed))


@dataclasses.dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_catalog` did."""

    removed: tuple[Leftover, ...]
    deduplicated: tuple[str, ...]
    version: int | None  # the samples version of the de-duplicating commit, None when there was none

    def summary(self) -> str:
        """Return one line per action, or one line saying there was nothing to repair."""
        lines = [f"repair: removed {f}" for f in self.removed]
        if self.version is not None:
            lines.append(f"repair: kept the earliest row of {len(self.deduplicated)} repeated sample_ids "
                         f"({', '.join(self.deduplicated)}) in version {self.version}")
        return "\n".join(lines) if lines else "repair: nothing to repair"


def _check_file(catalog: Catalog, sample_id: str, uri: str, sha256: str, size: int | None) -> FileProblem | None:
    try:
        full = _fs.resolve_uri(catalog.root_uri, uri)
    except CatalogPathError:  # a row naming a file elsewhere: reported, never read
        return FileProblem(sample_id, uri, "outside the root")
    fs, path = _fs.filesystem(full, catalog.storage_options)
    if not fs.exists(path):
        return FileProblem(sample_id, full, "missing")
    if size is not None and fs.size(path) != size:
        return FileProblem(sample_id, full, "size mismatch")
    digest, _ = _fs.sha256_and_size(fs, path)
    if digest != sha256:
        return FileProblem(sample_id, full, "sha256 mismatch")
    return None


def list_root(catalog: Catalog, under: str = "") -> dict[str, dict[str, Any]]:
    """Return ``{path relative to the root: fsspec info}`` for every file under the root (or ``under``)."""
    fs, root = _fs.filesystem(catalog.root_uri, catalog.storage_options)
    root = root.rstrip("/")
    top = f"{root}/{under.strip('/')}" if under else root
    fs.invalidate_cache(top)
    if not fs.exists(top):
        return {}
    return {path[len(root) + 1:]: info for path, info in fs.find(top, detail=True).items()
            if info.get("type", "file") == "file"}


def _age_s(info: Mapping[str, Any], now: float) -> float:
    stamp = info.get("mtime", info.get("LastModified"))
    if isinstance(stamp, _dt.datetime):
        stamp = stamp.timestamp()
    return max(0.0, now - float(stamp)) if stamp is not None else 0.0


def find_orphans(catalog: Catalog, referenced: set[str], listing: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Return volume files under the catalog root (outside ``catalog/``) that no row references."""
    listing = list_root(catalog) if listing is None else listing
    root = _fs.filesystem(catalog.root_uri, catalog.storage_options)[1].rstrip("/")
    known = set()
    for uri in referenced:
        try:
            known.add(_fs.filesystem(_fs.resolve_uri(catalog.root_uri, uri), catalog.storage_options)[1])
        except CatalogPathError:  # reported by the file check; it cannot make a file under the root known
            continue
    return tuple(sorted(rel for rel in listing if not rel.startswith(_CATALOG_DIR) and rel.endswith(VOLUME_SUFFIXES)
                        and f"{root}/{rel}" not in known))


def find_leftovers(catalog: Catalog, listing: Mapping[str, Mapping[str, Any]]) -> tuple[Leftover, ...]:
    """Return stray temporary files under the root and untracked data files of the catalog tables."""
    now = time.time()
    found = [Leftover(rel, "stray temp", _age_s(info, now)) for rel, info in listing.items()
             if _ATOMIC_TEMP.fullmatch(rel.rsplit("/", 1)[-1])
             or (_COMMIT_TEMP.fullmatch(rel.rsplit("/", 1)[-1]) and "/_delta_log/" in f"/{rel}")]
    for name in TABLES:
        prefix = f"{_CATALOG_DIR}{name}/"
        data = {rel: info for rel, info in listing.items()
                if rel.startswith(prefix) and rel.endswith(".parquet") and "/_delta_log/" not in f"/{rel}"}
        if not data:
            continue
        logged = logged_data_files(catalog.table_uri(name), catalog.storage_options)
        found += [Leftover(rel, "untracked data", _age_s(info, now)) for rel, info in data.items()
                  if rel[len(prefix):] not in logged]
    return tuple(sorted(found, key=lambda f: f.path))


def check_data_files(catalog: Catalog, name: str = "samples", *, version: int | None = None,
                     listing: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Check that every data file table ``name`` references at ``version`` exists with its logged size.

    Raises:
        CatalogReadError: Naming the first missing or resized data file (the version cannot be read).
    """
    table = catalog.delta_table(name, version=version)
    prefix = f"{_CATALOG_DIR}{name}/"
    listing = list_root(catalog, prefix) if listing is None else listing
    with catalog.reading(name):
        actions = pa.table(table.get_add_actions(flatten=True))
    for path, size in zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True):
        info = listing.get(prefix + path)
        if info is None or (size is not None and info.get("size") != size):
            what = "missing" if info is None else f"{info.get('size')} bytes, the log says {size}"
            raise CatalogReadError(
                f"Catalog expects every data file of the {name} table at version {table.version()} to exist "
                f"with its logged size, but got file={_fs.join_uri(catalog.root_uri, prefix + path)} ({what}). "
                f"Restore it from a backup; the rows it holds cannot be read."
            )


def verify_catalog(catalog: Catalog, *, as_of: int | None = None, orphans: bool = True,
                   min_age_s: float = DEFAULT_MIN_AGE_S) -> VerifyReport:
    """Check every passing row's files, repeated sample_ids, the Delta data files and leftovers.

    Args:
        catalog: The catalog to verify.
        as_of: A ``samples`` version; latest when None.
        orphans: Also list volume files under the root that no row references.
        min_age_s: Leftovers younger than this are reported as possibly in progress (not a problem).

    Returns:
        A :class:`VerifyReport`; call ``raise_for_problems()`` to turn problems into a
        :class:`VerifyError`.

    Raises:
        CatalogReadError: When the Delta log or a data file it references at the version cannot be
            read (missing, resized, corrupt), or the root cannot be listed.
    """
    version = catalog.delta_table("samples", version=as_of).version()
    try:
        listing = list_root(catalog)
    except OSError as exc:
        raise CatalogReadError.from_exception("verify", f"root {catalog.root_uri}", exc,
                                              "Check that ROOT exists and can be listed.") from exc
    check_data_files(catalog, "samples", version=version, listing=listing)
    if catalog.exists("datasets"):
        check_data_files(catalog, "datasets", listing=listing)
    table = catalog.read_table("samples", as_of=version, columns=_COLUMNS)
    passing = table.filter(pc.equal(table["status"], "passed"))
    problems: list[FileProblem] = []
    for row in passing.to_pylist():
        for kind in ("image", "label"):
            problem = _check_file(catalog, row["sample_id"], row[f"{kind}_uri"], row[f"{kind}_sha256"],
                                  row[f"{kind}_bytes"])
            if problem is not None:
                problems.append(problem)
    # failed rows should have no files, but never call theirs orphans
    referenced = {row[f"{kind}_uri"] for row in table.to_pylist() for kind in ("image", "label") if row[f"{kind}_uri"]}
    repeated = sorted(catalog.duplicate_sample_ids(as_of=version).items())
    duplicates = tuple(DuplicateSample(sid, n) for sid, n in repeated)
    report = VerifyReport(catalog.root_uri, version, passing.num_rows, 2 * passing.num_rows, tuple(problems),
                          find_orphans(catalog, referenced, listing) if orphans else (), duplicates,
                          find_leftovers(catalog, listing), min_age_s)
    logger.info("verify: %s", report.summary().splitlines()[0])
    return report


def repair_catalog(catalog: Catalog, report: VerifyReport, *,
                   commit_metadata: Mapping[str, Any] | None = None) -> RepairResult:
    """Remove ``report``'s stale leftovers and keep one row per repeated sample_id.

    Only leftovers at least ``report.min_age_s`` old are removed, and an untracked data file only
    while no version of the log references it (checked again just before). Repeated sample_ids are
    rewritten in ONE atomic Delta commit that keeps each one's earliest committed row; older versions
    stay readable.

    Returns:
        A :class:`RepairResult` listing what was removed and the version of the de-duplicating commit.
    """
    fs, root = _fs.filesystem(catalog.root_uri, catalog.storage_options)
    logged = {name: logged_data_files(catalog.table_uri(name), catalog.storage_options)
              for name in TABLES if catalog.exists(name)}
    removed = []
    for leftover in report.stale_leftovers:
        if leftover.kind == "untracked data":
            name = leftover.path[len(_CATALOG_DIR):].split("/", 1)[0]
            if leftover.path[len(_CATALOG_DIR) + len(name) + 1:] in logged.get(name, {}):
                continue  # committed since the report: not a leftover any more
        fs.rm_file(f"{root.rstrip('/')}/{leftover.path}")
        removed.append(leftover)
        logger.info("repair: removed %s", leftover)
    deduplicated, version = (), None
    if report.duplicates:
        deduplicated, version = catalog.remove_duplicate_samples(
            commit_metadata={"ctfactory.repair": "verify --repair", **dict(commit_metadata or {})})
    return RepairResult(tuple(removed), deduplicated, version)
