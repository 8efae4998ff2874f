"""NIfTI reading and writing with exact affines, atomic writes and fast gzip.

Images are stored as int16 in their modality's range (CT: HU clipped to [-1024, 3071]); label maps as uint8 (max ID <= 255) or uint16.
Both carry the affine in the sform and the qform (code 1, scanner); spacing is read back from the
affine's column norms. A ``uri`` is a local path or any fsspec URI (``s3://...``, ``memory://...``).

Writes are atomic: a local file is written under a temporary name in the same folder and moved into
place with ``os.replace`` (or ``os.link`` when overwriting is refused); a remote object is serialised in
memory and uploaded in one PUT. ``.nii.gz`` bytes go through :mod:`maisi_core.nifti_gzip` (fast,
deterministic, bounded inflation). Files stay readable by plain ``nibabel.load``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np

from maisi_core.errors import (
    AffineError,
    ImageError,
    LabelMapError,
    OutputExistsError,
    VolumeFileError,
    VolumeNotFoundError,
)
from maisi_core.engine.geometry import affine_from_spacing  # re-exported for io users
from maisi_core import nifti_gzip
from maisi_core.modality import CONVENTIONS

logger = logging.getLogger(__name__)

DEFAULT_COMPRESSLEVEL = 1
LABEL_MAX_ID = 65535

__all__ = [
    "DEFAULT_COMPRESSLEVEL", "FileInfo", "ImageVolume", "LabelVolume", "Volume",
    "affine_from_spacing", "load_image", "load_label", "save_image", "save_label",
]


@dataclass(frozen=True)
class FileInfo:
    """What was written: the URI, the sha256 of the stored bytes and their count."""

    uri: str
    sha256: str
    n_bytes: int


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array with its voxel-to-world affine.

    Attributes:
        array: voxel data ``(X, Y, Z)``.
        affine: ``(4, 4)`` float64 voxel-to-RAS-world matrix in mm.
    """

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm: the norms of the affine's first three columns."""
        return _spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The array shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape)


@dataclass(frozen=True, eq=False)
class ImageVolume(Volume):
    """An image ``(X, Y, Z)`` (CT: HU); int16 as written by :func:`save_image`."""


@dataclass(frozen=True, eq=False)
class LabelVolume(Volume):
    """A label map in integer IDs, ``(X, Y, Z)``; uint8 or uint16 as written by :func:`save_label`."""


def save_image(
    uri: str | os.PathLike,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    storage_options: Mapping[str, Any] | None = None,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    overwrite: bool = False,
) -> FileInfo:
    """Write an image as rounded int16 in its modality's stored range to a ``.nii`` or ``.nii.gz`` URI.

    CT is written as HU clipped to [-1024, 3071]; MR to [0, 32767] (see :mod:`maisi_core.modality`).

    Args:
        uri: local path or fsspec URI; ``.gz`` suffix means gzip.
        image: values ``(X, Y, Z)`` in the modality's unit (CT: HU), any real dtype; NaN/inf are refused.
        modality: ``"CT"`` or ``"MR"``, whose stored range the values are clipped to.
        affine: ``(4, 4)`` voxel-to-RAS matrix in mm.
        storage_options: passed to fsspec for remote URIs.
        compresslevel: gzip level (0-9; isal uses 0-3 and caps higher values at 3).
        overwrite: replace an existing file; otherwise :class:`OutputExistsError`.

    Returns:
        The URI, sha256 and size of the bytes written.
    """
    convention = CONVENTIONS.get(modality)
    if convention is None:
        raise ImageError(f"save_image expects modality in {sorted(CONVENTIONS)}, but got modality={modality!r}.")
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ImageError(f"save_image expects a 3D image (X, Y, Z), but got shape={arr.shape}. Squeeze extra axes.")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"save_image expects a real-valued image, but got dtype={arr.dtype}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError(
                f"save_image expects finite values, but got {int(np.count_nonzero(~np.isfinite(arr)))} "
                "NaN/inf voxels. Fix the decoder output before writing."
            )
        arr = np.rint(arr)
    low, high = (int(v) for v in convention.stored_range)
    data = np.clip(arr, low, high).astype(np.int16)
    return _write_nifti(uri, data, affine, storage_options, compresslevel, overwrite, who="save_image")


def save_label(
    uri: str | os.PathLike,
    label_map: np.ndarray,
    affine: np.ndarray,
    *,
    storage_options: Mapping[str, Any] | None = None,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    overwrite: bool = False,
) -> FileInfo:
    """Write a label map as uint8 (max ID <= 255) or uint16 to a ``.nii`` or ``.nii.gz`` URI.

    Args:
        uri: local path or fsspec URI.
        label_map: non-negative integer IDs ``(X, Y, Z)`` (bool or integral floats accepted).
        affine: ``(4, 4)`` voxel-to-RAS matrix in mm.
        storage_options: passed to fsspec for remote URIs.
        compresslevel: gzip level.
        overwrite: replace an existing file; otherwise :class:`OutputExistsError`.
    """
    arr = np.asarray(label_map)
    if arr.ndim != 3:
        raise LabelMapError(f"save_label expects a 3D label map (X, Y, Z), but got shape={arr.shape}.")
    _check_integral(arr, "save_label", "label_map")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > LABEL_MAX_ID:
        raise LabelMapError(
            f"save_label expects label IDs in 0..{LABEL_MAX_ID}, but got range=({lo}, {hi}). Remap the labels."
        )
    data = arr.astype(np.uint8 if hi <= 255 else np.uint16)
    return _write_nifti(uri, data, affine, storage_options, compresslevel, overwrite, who="save_label")


def load_image(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> ImageVolume:
    """Read a CT image: int16 data as stored, float32 when the file is float or scaled.

    Returns:
        :class:`ImageVolume` with ``array`` ``(X, Y, Z)`` and ``affine`` ``(4, 4)`` float64.
    """
    img = _read_nifti(uri, storage_options, who="load_image")
    if _is_scaled(img) or not np.issubdtype(img.get_data_dtype(), np.integer):
        array = np.asarray(img.get_fdata(dtype=np.float32))
    else:
        array = np.asarray(img.dataobj)
    return ImageVolume(array=array, affine=_affine_of(img))


def load_label(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> LabelVolume:
    """Read a label map; the stored data must be integer IDs (integral floats are converted).

    Raises:
        VolumeFileError: the file stores scaled or non-integer values, or negative IDs.
    """
    img = _read_nifti(uri, storage_options, who="load_label")
    if _is_scaled(img):
        raise VolumeFileError(
            f"load_label expects unscaled integer label IDs, but got scl_slope/scl_inter in uri={str(uri)!r}. "
            "This looks like an image, not a label map; use load_image."
        )
    array = np.asarray(img.dataobj)
    try:
        _check_integral(array, "load_label", f"the data of {str(uri)!r}")
    except LabelMapError as exc:
        raise VolumeFileError(f"{exc} This looks like an image, not a label map; use load_image.") from None
    if not np.issubdtype(array.dtype, np.integer):
        hi = int(array.max()) if array.size else 0
        array = array.astype(np.uint8 if hi <= 255 else np.uint16)
    return LabelVolume(array=array, affine=_affine_of(img))


# ---------------------------------------------------------------------------------------------- helpers


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def _check_affine(affine: np.ndarray, who: str) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise AffineError(f"{who} expects a finite (4, 4) affine, but got affine with shape={aff.shape}.")
    if not np.allclose(aff[3], (0, 0, 0, 1)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise AffineError(
            f"{who} expects an invertible affine with last row (0, 0, 0, 1), but got affine={aff.tolist()}. "
            "Build one with affine_from_spacing."
        )
    return aff


def _check_integral(arr: np.ndarray, who: str, name: str) -> None:
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0):
        return
    raise LabelMapError(
        f"{who} expects integer label IDs, but got {name} with dtype={arr.dtype} and non-integer values. "
        "Resample label maps with nearest-neighbour interpolation only."
    )


def _is_scaled(img: nib.Nifti1Image) -> bool:
    slope, inter = img.header.get_slope_inter()
    return not (slope in (None, 1.0) and inter in (None, 0.0))


def _affine_of(img: nib.Nifti1Image) -> np.ndarray:
    """Return the affine as float64; sform entries (float32 on disk) become their shortest decimal.

    NIfTI-1 stores the sform in float32, so 0.8 comes back as 0.800000011920929. The shortest decimal that
    rounds to the same float32 is what the writer meant for every value with up to 7 significant digits
    (spacings and origins in mm), and it is within float32 rounding of the stored value in any case.
    """
    header = img.header
    if int(header["sform_code"]) > 0:
        stored = header.get_sform().astype(np.float32)
        affine = np.array([float(np.format_float_positional(v, unique=True)) for v in stored.ravel()])
        return affine.reshape(4, 4)
    return np.asarray(header.get_best_affine(), dtype=np.float64)


def _to_nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    return img.to_bytes()


def _write_nifti(uri, data, affine, storage_options, compresslevel, overwrite, *, who: str) -> FileInfo:
    aff = _check_affine(affine, who)
    uri = os.fspath(uri)
    if not uri.endswith((".nii", ".nii.gz")):
        raise VolumeFileError(f"{who} expects a URI ending in .nii or .nii.gz, but got uri={uri!r}.")
    if not 0 <= int(compresslevel) <= 9:
        raise VolumeFileError(f"{who} expects compresslevel in 0..9, but got compresslevel={compresslevel}.")
    payload = _to_nifti_bytes(data, aff)
    if uri.endswith(".gz"):
        payload = nifti_gzip.compress(payload, int(compresslevel))
    _put_atomic(uri, payload, storage_options, overwrite, who)
    logger.debug("%s wrote %s (%d bytes)", who, uri, len(payload))
    return FileInfo(uri=uri, sha256=hashlib.sha256(payload).hexdigest(), n_bytes=len(payload))


def _exists_error(who: str, uri: str) -> OutputExistsError:
    return OutputExistsError(
        f"{who} expects a URI that does not exist yet, but got uri={uri!r}, which exists. "
        "Pass overwrite=True to replace it."
    )


def _put_atomic(uri: str, payload: bytes, storage_options, overwrite: bool, who: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if "file" not in fs.protocol:
        if not overwrite and fs.exists(path):
            raise _exists_error(who, uri)
        fs.pipe_file(path, payload)  # one object, one PUT: atomic per object
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and final.exists():
        raise _exists_error(who, uri)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # fails atomically if another writer got there first
            except FileExistsError:
                raise _exists_error(who, uri) from None
            except OSError:  # the filesystem has no hard links: check, then replace
                if final.exists():
                    raise _exists_error(who, uri) from None
                os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _read_nifti(uri, storage_options, *, who: str) -> nib.Nifti1Image:
    uri = os.fspath(uri)
    raw = _read_bytes(uri, storage_options, who=who)
    if raw[:2] == nifti_gzip.GZIP_MAGIC:
        raw = nifti_gzip.inflate_bounded(raw, who=who, uri=uri, max_bytes=nifti_gzip.MAX_VOLUME_BYTES)
    else:
        declared = nifti_gzip.declared_nbytes(raw[:nifti_gzip.NIFTI_HEADER_BYTES], who=who, uri=uri,
                                              max_bytes=nifti_gzip.MAX_VOLUME_BYTES)
        if declared > len(raw):
            raise VolumeFileError(f"{who} expects the {declared} bytes its header declares, but got a file of "
                                  f"{len(raw)} bytes in uri={uri!r} (truncated).")
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:  # nibabel raises several types for malformed headers
        raise VolumeFileError(f"{who} expects a NIfTI-1 file, but got uri={uri!r} ({exc}).") from None
    if len(img.shape) != 3:
        raise VolumeFileError(f"{who} expects a 3D volume (X, Y, Z), but got shape={img.shape} in uri={uri!r}.")
    _check_file_affine(_affine_of(img), who=who, uri=uri)
    return img


def _read_bytes(uri: str, storage_options, *, who: str, size: int = -1) -> bytes:
    """Read ``size`` bytes (all when -1) of a file; a missing or unreadable file is a one-line error."""
    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as fh:
            return fh.read(size)
    except FileNotFoundError:
        raise VolumeNotFoundError(f"{who} expects an existing NIfTI file, but got uri={uri!r}, which does not exist.") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        reason = exc.strerror or str(exc)
        raise VolumeFileError(f"{who} expects a readable NIfTI file, but got uri={uri!r} ({reason}).") from None


def _check_file_affine(affine: np.ndarray, *, who: str, uri: str) -> np.ndarray:
    """The file's affine must be finite and invertible: it places every voxel in the patient."""
    try:
        return _check_affine(affine, who)
    except AffineError:
        raise AffineError(f"{who} expects a finite, invertible voxel-to-world affine (sform or qform), but got "
                          f"affine={np.asarray(affine).round(4).tolist()} in uri={uri!r}. Fix the file's header "
                          "(e.g. re-save it from the segmenter that made it).") from None


def check_nifti_header(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
                       who: str = "check_nifti_header") -> tuple[tuple[int, int, int], np.ndarray]:
    """Read only the header of a NIfTI file and check it: a 3D volume of bounded size with a usable affine.

    Cheap (the first kilobytes of the file), so a run can check every input file before its first case;
    problems deeper in the file (a truncated or corrupt gzip stream) surface when the file is loaded.

    Returns:
        The shape ``(X, Y, Z)`` and the affine the header declares.

    Raises:
        VolumeNotFoundError: no such file.
        VolumeFileError: unreadable, empty, not NIfTI-1, not 3D, or declaring more than ``nifti_gzip.MAX_VOLUME_BYTES``.
        AffineError: a NaN, infinite or singular affine.
    """
    uri = os.fspath(uri)
    raw = _read_bytes(uri, storage_options, who=who, size=1 << 16)
    head = nifti_gzip.header_bytes(raw, who=who, uri=uri)
    nifti_gzip.declared_nbytes(head, who=who, uri=uri, max_bytes=nifti_gzip.MAX_VOLUME_BYTES)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(head[:348]), check=False)
    shape = tuple(int(n) for n in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeFileError(f"{who} expects a 3D volume (X, Y, Z), but got shape={shape} in uri={uri!r}.")
    try:
        declared = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception:  # nibabel raises several types for a qform it cannot decompose
        declared = np.full((4, 4), np.nan)
    return shape, _check_file_affine(declared, who=who, uri=uri)  # type: ignore[return-value]
