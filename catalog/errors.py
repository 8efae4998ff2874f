"""Exceptions raised by the catalog package (one base class, a few specific ones).

Every exception derives from :class:`CatalogError`; the specific ones also derive from the built-in
exception that fits, so callers may catch either. Messages follow the house pattern
``"<Who> expects <rule>, but got <name>=<value>. <hint>"``.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Raised when the catalog cannot do what it was asked (base class)."""


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
