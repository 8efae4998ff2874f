"""Exceptions raised by the catalog package (one base class, a few specific ones).

Every exception derives from :class:`CatalogError`; the specific ones also derive from the built-in
exception that fits, so callers may catch either. Messages follow the house pattern
``"<Who> expects <rule>, but got <name>=<value>. <hint>"``.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BACKTRACE_FRAME = re.compile(r"^\d+: ")
_CAUSE_CHARS = 400


class CatalogError(Exception):
    """Raised when the catalog cannot do what it was asked (base class)."""


class CatalogPathError(CatalogError, ValueError):
    """Raised when a path would leave the dataset root (absolute, a URI of its own, or climbing out with ``..``)."""


class CatalogNotFoundError(CatalogError, FileNotFoundError):
    """Raised when no catalog table exists at the given root or a requested version does not exist."""


class RecordExistsError(CatalogError, FileExistsError):
    """Raised when a commit would change a row whose ``sample_id`` is already in the catalog."""


class SchemaMismatchError(CatalogError, ValueError):
    """Raised when rows or a stored table do not fit the catalog schema."""


class RecordError(CatalogError, ValueError):
    """Raised when a record breaks a catalog rule (bad status, URIs on a failed row, wrong length)."""


class QueryError(CatalogError, ValueError):
    """Raised when a query, filter, SQL statement or output format is invalid."""


class VerifyError(CatalogError, ValueError):
    """Raised when files referenced by the catalog are missing or do not match their sha256 or size."""


class ExportError(CatalogError, ValueError):
    """Raised when an export cannot be written (bad destination, nothing to export, bad labels)."""


class ExportExistsError(ExportError, FileExistsError):
    """Raised when an export destination already holds files and overwriting was not asked for."""


class ReportError(CatalogError, ValueError):
    """Raised when the HTML dataset card cannot be built (nothing to report, bad destination)."""


class CommitConflictError(CatalogError):
    """Raised when a commit keeps conflicting with concurrent writers after every retry."""


class CatalogReadError(CatalogError, OSError):
    """Raised when a catalog table, its Delta log or a file it references cannot be read.

    Covers a corrupt or truncated ``_delta_log`` entry, a data file the log references that is missing
    or damaged, an unreadable root and an unreachable object store.
    """

    @classmethod
    def from_exception(cls, who: str, what: str, exc: BaseException, hint: str) -> CatalogReadError:
        """Return the one-line error for a failed read of ``what``, naming the cause ``exc``.

        Args:
            who: The reader (``"Catalog"``, ``"verify"``, ``"catalog query"``, ...).
            what: What could not be read, naming the root, table or file.
            exc: The underlying deltalake, pyarrow or OS error.
            hint: What the user can do about it.
        """
        return cls(f"{who} expects a readable {what}, but got error={type(exc).__name__}: {describe_cause(exc)}. "
                   f"{hint}")


def describe_cause(exc: BaseException) -> str:
    """Return ``str(exc)`` on one line: no ANSI colours, no Rust backtrace, at most 400 characters."""
    lines = []
    for raw in _ANSI.sub("", str(exc)).splitlines():
        line = raw.strip().lstrip("\u21b3").strip()  # delta-rs chains causes with "↳" lines
        if _BACKTRACE_FRAME.match(line):
            break
        if line:
            lines.append(line)
    text = " ".join(": ".join(lines).split()).rstrip(".")
    return text if len(text) <= _CAUSE_CHARS else text[: _CAUSE_CHARS - 3] + "..."
