"""The bytes of ``.nii.gz`` files: fast deterministic gzip, and inflation bounded by the NIfTI header.

Compression uses ``isal`` when it is installed and ``zlib`` otherwise, in fixed-size members compressed
in threads, with ``mtime=0`` so equal volumes give equal sha256. Reading inflates no more than the header
inside declares (plus a little slack), so a small file cannot expand into gigabytes (a gzip bomb), and a
header declaring more than :data:`MAX_VOLUME_BYTES` is refused before anything is allocated.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import nibabel as nib
import numpy as np

from maisi_core.errors import VolumeFileError

try:  # optional: Intel ISA-L gzip, several times faster than zlib at the same ratio
    from isal import igzip as _fast_gzip
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - depends on the environment
    _fast_gzip = None
    _inflate = zlib

BACKEND = "isal" if _fast_gzip is not None else "zlib"
GZIP_MAGIC = b"\x1f\x8b"
# The most bytes a volume may declare (header + data) before anything is allocated: 2 GiB holds 512x512x768
# float32 (805 MB) with room; a 1 KB header declaring 4096^3 or a gzip bomb is refused, not inflated.
MAX_VOLUME_BYTES = 2 * 1024**3
NIFTI_HEADER_BYTES = 352  # the 348-byte NIfTI-1 header and its 4-byte extension flag
GZIP_SLACK_BYTES = 1 << 20  # trailing bytes some writers leave after the data
GZIP_CHUNK_BYTES = 8 * 2**20  # zlib and isal release the GIL, so chunks compress in parallel
GZIP_THREADS = max(1, min(8, os.cpu_count() or 1))


def header_bytes(raw: bytes, *, who: str, uri: str) -> bytes:
    """Return the NIfTI header bytes at the start of ``raw`` (inflating only them when it is gzip)."""
    if raw[:2] != GZIP_MAGIC:
        return raw[:NIFTI_HEADER_BYTES]
    try:
        return _inflate.decompressobj(16 + _inflate.MAX_WBITS).decompress(raw, NIFTI_HEADER_BYTES)
    except (zlib.error, _inflate.error) as exc:
        raise VolumeFileError(f"{who} expects a valid gzip stream, but got a corrupt one in uri={uri!r} ({exc}).") from None


def compress(raw: bytes, compresslevel: int) -> bytes:
    """Compress as concatenated gzip members of ``GZIP_CHUNK_BYTES`` each, compressed in threads.

    Chunk boundaries do not depend on the thread count, so the output is deterministic. Multi-member gzip
    is standard (RFC 1952) and is read by ``gzip``, ``nibabel`` and ``zcat``.
    """
    if _fast_gzip is not None:
        level = min(max(compresslevel, 0), 3)
        compress = partial(_fast_gzip.compress, compresslevel=level, mtime=0)
    else:
        compress = partial(gzip.compress, compresslevel=compresslevel, mtime=0)
    view = memoryview(raw)
    chunks = [view[i : i + GZIP_CHUNK_BYTES] for i in range(0, max(len(raw), 1), GZIP_CHUNK_BYTES)]
    if len(chunks) == 1:
        return compress(chunks[0])
    with ThreadPoolExecutor(max_workers=min(len(chunks), GZIP_THREADS)) as pool:
        return b"".join(pool.map(compress, chunks))


def declared_nbytes(head: bytes, *, who: str, uri: str, max_bytes: int) -> int:
    """Return header + data bytes a NIfTI header declares; refuse more than ``max_bytes``."""
    if len(head) < 348:
        raise VolumeFileError(f"{who} expects a NIfTI-1 file, but got {len(head)} bytes, less than a header, "
                              f"in uri={uri!r}.")
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head[:348]), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        declared = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises several types for malformed headers
        raise VolumeFileError(f"{who} expects a NIfTI-1 file, but got uri={uri!r} ({exc}).") from None
    if declared > max_bytes:
        raise VolumeFileError(f"{who} expects a volume of at most {max_bytes} bytes, but got a header declaring "
                              f"shape={shape} ({declared} bytes) in uri={uri!r}.")
    return declared


def inflate_bounded(raw: bytes, *, who: str, uri: str, max_bytes: int) -> bytes:
    """Inflate every gzip member of ``raw``, never beyond what the NIfTI header inside declares."""
    try:
        head = header_bytes(raw, who=who, uri=uri)
        budget = declared_nbytes(head, who=who, uri=uri, max_bytes=max_bytes) + GZIP_SLACK_BYTES
        parts, total, data = [], 0, raw
        while data:
            member = _inflate.decompressobj(16 + _inflate.MAX_WBITS)
            piece = member.decompress(data, budget - total + 1)
            total += len(piece)
            parts.append(piece)
            if total > budget or member.unconsumed_tail:
                raise VolumeFileError(f"{who} expects the data to inflate to the size its header declares, but got "
                                      f"more than {budget} bytes in uri={uri!r} (a gzip bomb or a corrupt file).")
            if not member.eof:
                raise VolumeFileError(f"{who} expects a complete gzip stream, but got a truncated one in uri={uri!r}.")
            data = member.unused_data
    except (zlib.error, _inflate.error) as exc:
        raise VolumeFileError(f"{who} expects a valid gzip stream, but got a corrupt one in uri={uri!r} ({exc}).") from None
    return b"".join(parts)
