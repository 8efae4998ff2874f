"""One dataset output root: where it lives, its layout, paths checked both ways, storage options, catalog.

A root is a local folder or an fsspec URI (``s3://bucket/prefix``). Everything a run or a reader touches
lies under it in a fixed layout: ``images/<sample_id>.nii.gz``, ``labels/<sample_id>.nii.gz``, the
Delta tables under ``catalog/`` and the card ``dataset_card.html``. :meth:`DatasetRoot.resolve` is the
one way from a relative path to a file URI, for writing and for reading catalog rows alike: an absolute
path, a URI of its own or a ``..`` that climbs out is refused (:func:`catalog.fs.resolve_inside`).

The storage options are the ones this holder passed; the flows pass only public ones (endpoint,
region) and add credentials where the work runs (``flows.secrets``). ``repr`` names the option keys,
never their values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog import fs as _fs

if TYPE_CHECKING:  # the Delta tables load when asked for: writing a case's files needs only fsspec
    from catalog.store import Catalog

IMAGES_DIR = "images"
LABELS_DIR = "labels"
VOLUME_SUFFIX = ".nii.gz"
CARD_NAME = "dataset_card.html"


@dataclasses.dataclass(frozen=True, repr=False)
class DatasetRoot:
    """A dataset output root and the storage options to reach it.

    Attributes:
        uri: the root, normalised (local paths absolute, no trailing slash).
        storage_options: deltalake-style options (``AWS_ENDPOINT_URL``, ...); empty for local roots.
    """

    uri: str
    storage_options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", _fs.normalize_root(self.uri))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def __repr__(self) -> str:
        return f"DatasetRoot({self.uri!r}, storage_options={sorted(self.storage_options)})"

    @classmethod
    def of(cls, uri: str | Path, storage_options: Mapping[str, str] | None = None) -> DatasetRoot:
        """The root at ``uri`` (a local path or fsspec URI) with ``storage_options``."""
        return cls(str(uri), dict(storage_options or {}))

    def with_storage_options(self, storage_options: Mapping[str, str] | None) -> DatasetRoot:
        """The same root reached with other storage options (e.g. with credentials added)."""
        return dataclasses.replace(self, storage_options=dict(storage_options or {}))

    @property
    def is_remote(self) -> bool:
        """True for an fsspec URI with a scheme other than ``file://``."""
        return _fs.is_remote(self.uri)

    def resolve(self, relative: str) -> str:
        """The URI of ``relative`` under this root; refuses any path that would leave it.

        Raises:
            CatalogPathError: ``relative`` is absolute, a URI, or climbs out of the root.
        """
        return _fs.resolve_inside(self.uri, relative, who="DatasetRoot")

    @property
    def card_uri(self) -> str:
        """Where the dataset card lives."""
        return self.resolve(CARD_NAME)

    def filesystem(self, relative: str | None = None) -> tuple[Any, str]:
        """The fsspec filesystem of the root and the path of ``relative`` (or of the root) inside it."""
        return _fs.filesystem(self.uri if relative is None else self.resolve(relative), self.storage_options)

    def fsspec_options(self) -> dict[str, Any]:
        """fsspec keyword arguments for files under this root (empty for local roots)."""
        return _fs.fsspec_options(self.storage_options) if self.is_remote else {}

    def catalog(self) -> Catalog:
        """The root's catalog (its tables may not exist yet)."""
        from catalog.store import open_catalog

        return open_catalog(self.uri, self.storage_options)
