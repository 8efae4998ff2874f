"""Publishing case outputs under a :class:`catalog.root.DatasetRoot` (local paths or fsspec URIs such as ``s3://``).

Storage options follow the catalog's convention (deltalake ``AWS_*`` keys, e.g. ``AWS_ENDPOINT_URL``);
``DatasetRoot.fsspec_options`` translates them for ``maisi_core.io`` (s3fs keyword arguments) with the
catalog's own translation, so both sides agree.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import numpy as np

from catalog.fs import sha256_and_size
from catalog.root import DatasetRoot

logger = logging.getLogger(__name__)

SaveFn = Callable[..., Any]


def sha256_of(uri: str, options: Mapping[str, Any]) -> str:
    """Return the sha256 of an existing file."""
    fs, path = fsspec.core.url_to_fs(uri, **dict(options))
    return sha256_and_size(fs, path)[0]


def publish_volume(save: SaveFn, uri: str, array: np.ndarray, affine: np.ndarray, *,
                   root: DatasetRoot) -> tuple[Any, str]:
    """Write a volume under ``root`` with ``maisi_core.io.save_image``/``save_label``, handling a file already there.

    ``uri`` comes from ``root.resolve`` (checked to stay inside the root). File names are deterministic,
    so a file can only exist already when an earlier run wrote it and crashed before committing its row
    (an orphan). Its bytes are compared with the new ones: the same sha256 keeps it, a different one
    replaces it atomically.

    Returns:
        ``(FileInfo, action)`` with action ``"written"``, ``"kept"`` or ``"replaced"``.
    """
    from maisi_core.errors import OutputExistsError

    opts = root.fsspec_options()
    try:
        return save(uri, array, affine, storage_options=opts), "written"
    except OutputExistsError:
        pass
    existing = sha256_of(uri, opts)
    staging = f"memory://ctfactory-staging/{uuid.uuid4().hex}/{uri.rsplit('/', 1)[-1]}"
    try:
        staged = save(staging, array, affine)
    finally:
        mem = fsspec.filesystem("memory")
        if mem.exists(staging.rsplit("/", 1)[0]):
            mem.rm(staging.rsplit("/", 1)[0], recursive=True)
    if staged.sha256 == existing:
        logger.info("kept existing identical file %s", uri)
        return type(staged)(uri=uri, sha256=staged.sha256, n_bytes=staged.n_bytes), "kept"
    logger.warning("replaced orphan file %s (sha256 differed)", uri)
    return save(uri, array, affine, storage_options=opts, overwrite=True), "replaced"


def written_header(uri: str, root: DatasetRoot) -> tuple[tuple[int, int, int], np.ndarray]:
    """The shape and affine a written NIfTI file under ``root`` declares (its header only: the first kilobytes)."""
    from maisi_core.io import check_nifti_header

    return check_nifti_header(uri, storage_options=root.fsspec_options(), who="written file")


def unpublish(uris: list[str], root: DatasetRoot) -> None:
    """Remove files a case published under ``root`` but must not keep (no catalog row points at them yet)."""
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri, **root.fsspec_options())
        if fs.exists(path):
            fs.rm(path)
            logger.warning("removed %s: the file as written failed its geometry check", uri)
