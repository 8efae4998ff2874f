"""Exceptions raised by the catalog package (one base class, a few specific ones)."""

from __future__ import annotations


class CatalogError(Exception):
    """Raised when the catalog cannot do what it was asked (base class)."""
