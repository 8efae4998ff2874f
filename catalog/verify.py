"""Verify a catalog against its files: every passing row's files exist and match sha256 and size.

Also lists orphan volumes: image/label files under the output root that no row references (for
example left behind by a crash between writing a file and committing its row).
"""

from __future__ import annotations

import dataclasses
import logging

import pyarrow.compute as pc

from catalog import fs as _fs
from catalog.errors import VerifyError
from catalog.store import Catalog

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
_COLUMNS = ["sample_id", "status", "image_uri", "label_uri", "image_sha256", "label_sha256",
            "image_bytes", "label_bytes"]


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One file that failed verification."""

    sample_id: str
    uri: str
    problem: str  # "missing", "sha256 mismatch" or "size mismatch"

    def __str__(self) -> str:
        return f"{self.sample_id}: {self.problem}: {self.uri}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_catalog`."""

    root_uri: str
    version: int
    rows_checked: int
    files_checked: int
    problems: tuple[FileProblem, ...]
    orphans: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no referenced file is missing or altered (orphans do not count)."""
        return not self.problems

    @property
    def missing(self) -> tuple[FileProblem, ...]:
        """The problems that are missing files."""
        return tuple(p for p in self.problems if p.problem == "missing")

    @property
    def mismatched(self) -> tuple[FileProblem, ...]:
        """The problems that are files whose sha256 or size differ from the catalog."""
        return tuple(p for p in self.problems if p.problem != "missing")

    def summary(self) -> str:
        """Return a short multi-line text summary."""
        lines = [f"catalog {self.root_uri} version {self.version}: {self.rows_checked} passing rows, "
                 f"{self.files_checked} files checked, {len(self.missing)} missing, "
                 f"{len(self.mismatched)} mismatched, {len(self.orphans)} orphan files"]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  orphan: {o}" for o in self.orphans]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise :class:`VerifyError` when a referenced file is missing or altered."""
        if self.problems:
            first = self.problems[0]
            raise VerifyError(
                f"verify expects every passing row's files to exist and match the catalog, but got "
                f"{len(self.problems)} problem(s), first sample_id={first.sample_id!r}: {first.problem} "
                f"({first.uri}). Regenerate or restore the files."
            )


def _check_file(catalog: Catalog, sample_id: str, uri: str, sha256: str, size: int | None) -> FileProblem | None:
    full = _fs.resolve_uri(catalog.root_uri, uri)
    fs, path = _fs.filesystem(full, catalog.storage_options)
    if not fs.exists(path):
        return FileProblem(sample_id, full, "missing")
    if size is not None and fs.size(path) != size:
        return FileProblem(sample_id, full, "size mismatch")
    digest, _ = _fs.sha256_and_size(fs, path)
    if digest != sha256:
        return FileProblem(sample_id, full, "sha256 mismatch")
    return None


def find_orphans(catalog: Catalog, referenced: set[str]) -> tuple[str, ...]:
    """Return volume files under the catalog root (outside ``catalog/``) that no row references."""
    fs, root = _fs.filesystem(catalog.root_uri, catalog.storage_options)
    if not fs.exists(root):
        return ()
    root = root.rstrip("/")
    skip = root + "/catalog/"
    known = {_fs.filesystem(u, catalog.storage_options)[1] for u in referenced}
    orphans = []
    for path in sorted(fs.find(root)):
        if path.startswith(skip) or not path.endswith(VOLUME_SUFFIXES):
            continue
        if path not in known:
            orphans.append(path[len(root) + 1:])
    return tuple(orphans)


def verify_catalog(catalog: Catalog, *, as_of: int | None = None, orphans: bool = True) -> VerifyReport:
    """Check every passing row's image and label against its sha256 and byte size.

    Args:
        catalog: The catalog to verify.
        as_of: A ``samples`` version; latest when None.
        orphans: Also list volume files under the root that no row references.

    Returns:
        A :class:`VerifyReport`; call ``raise_for_problems()`` to turn problems into a
        :class:`VerifyError`.
    """
    version = catalog.delta_table("samples", version=as_of).version()
    table = catalog.read_table("samples", as_of=version, columns=_COLUMNS)
    passing = table.filter(pc.equal(table["status"], "passed"))
    problems: list[FileProblem] = []
    referenced: set[str] = set()
    for row in passing.to_pylist():
        for kind in ("image", "label"):
            uri = row[f"{kind}_uri"]
            referenced.add(_fs.resolve_uri(catalog.root_uri, uri))
            problem = _check_file(catalog, row["sample_id"], uri, row[f"{kind}_sha256"], row[f"{kind}_bytes"])
            if problem is not None:
                problems.append(problem)
    for row in table.to_pylist():  # failed rows should have no files, but never call theirs orphans
        for kind in ("image", "label"):
            if row[f"{kind}_uri"]:
                referenced.add(_fs.resolve_uri(catalog.root_uri, row[f"{kind}_uri"]))
    found = find_orphans(catalog, referenced) if orphans else ()
    report = VerifyReport(catalog.root_uri, version, passing.num_rows, 2 * passing.num_rows,
                          tuple(problems), found)
    logger.info("verify: %s", report.summary().splitlines()[0])
    return report
