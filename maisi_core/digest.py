"""The one sha256-of-a-file helper of ``maisi_core`` (model files, user mask files), torch-free."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a local file, read in ``chunk_size`` chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
