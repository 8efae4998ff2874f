"""A small real-CT reference set: the two chest CTs shipped in the pyradiomics-bhklab 3.1.4 sdist.

The library only reads a given file (``scripts/fetch_real_ct.py`` downloads it with pip). The sdist and the
two ``.nrrd`` members are checked by sha256, converted from LPS to RAS, and written as NIfTI into a reference
folder with a ``reference.json`` manifest. Scans: ``lung1`` 512x512x48 at 0.570x0.570x5.0 mm, ``lung2``
512x512x61 at 0.627x0.627x5.0 mm (BSD-3, Harvard Medical School). They carry lesion masks only, no organ
labels.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np

from maisi_core.errors import VolumeFileError, VolumeNotFoundError
from maisi_core.io import FileInfo, ImageVolume, load_image, save_image

logger = logging.getLogger(__name__)

__all__ = [
    "REAL_CT_MEMBERS", "SDIST_NAME", "SDIST_SHA256", "build_real_ct_reference", "load_reference_set", "read_nrrd",
]

SDIST_NAME = "pyradiomics_bhklab-3.1.4.tar.gz"
SDIST_REQUIREMENT = "pyradiomics-bhklab==3.1.4"
SDIST_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
# case name -> (member path in the sdist, sha256 of the member)
REAL_CT_MEMBERS: dict[str, tuple[str, str]] = {
    "lung1": ("pyradiomics_bhklab-3.1.4/data/lung1_image.nrrd",
              "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed"),
    "lung2": ("pyradiomics_bhklab-3.1.4/data/lung2_image.nrrd",
              "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651"),
}
MANIFEST_NAME = "reference.json"
_NRRD_TYPES = {
    "short": "i2", "int16": "i2", "signed short": "i2", "ushort": "u2", "unsigned short": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uchar": "u1", "unsigned char": "u1", "uint8": "u1",
    "char": "i1", "signed char": "i1", "int8": "i1", "float": "f4", "double": "f8",
}
_SPACE_FLIP = {  # NRRD space -> sign flip that turns its coordinates into RAS
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _vector(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+0-9.eE]+", text)]


def read_nrrd(data: bytes, *, who: str = "read_nrrd") -> tuple[np.ndarray, np.ndarray]:
    """Parse a 3D NRRD file (attached data, raw or gzip encoding).

    Returns:
        ``(array (X, Y, Z), affine (4, 4) RAS)``; the array keeps the stored dtype.
    """
    end = data.find(b"\n\n")
    if not data.startswith(b"NRRD") or end < 0:
        raise VolumeFileError(f"{who} expects an NRRD file with attached data, but got a file starting {data[:8]!r}.")
    fields = {}
    for line in data[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    if fields.get("dimension") != "3" or fields.get("type", "").lower() not in _NRRD_TYPES:
        raise VolumeFileError(
            f"{who} expects a 3D NRRD of a numeric type, but got dimension={fields.get('dimension')!r}, "
            f"type={fields.get('type')!r}."
        )
    space = fields.get("space", "").lower()
    if space not in _SPACE_FLIP or "space directions" not in fields:
        raise VolumeFileError(f"{who} expects space in {sorted(_SPACE_FLIP)} with space directions, but got space={space!r}.")
    sizes = [int(s) for s in fields["sizes"].split()]
    dtype = np.dtype(_NRRD_TYPES[fields["type"].lower()]).newbyteorder("<" if fields.get("endian", "little") == "little" else ">")
    payload = data[end + 2 :]
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding != "raw":
        raise VolumeFileError(f"{who} expects encoding raw or gzip, but got encoding={encoding!r}.")
    count = int(np.prod(sizes))
    if len(payload) < count * dtype.itemsize:
        raise VolumeFileError(f"{who} expects {count * dtype.itemsize} data bytes, but got {len(payload)}.")
    array = np.frombuffer(payload[: count * dtype.itemsize], dtype=dtype).reshape(sizes, order="F")
    directions = np.array(_vector(fields["space directions"]), dtype=np.float64).reshape(3, 3).T  # columns
    origin = np.array(_vector(fields.get("space origin", "(0,0,0)")), dtype=np.float64)
    flip = np.array(_SPACE_FLIP[space], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = flip[:, None] * directions
    affine[:3, 3] = flip * origin
    affine += 0.0  # no negative zeros
    return np.ascontiguousarray(array.astype(dtype.newbyteorder("="))), affine


def build_real_ct_reference(
    sdist_path: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, FileInfo]:
    """Check the sdist, convert ``lung1``/``lung2`` to ``<out_dir>/<name>.nii.gz`` and write ``reference.json``.

    Args:
        sdist_path: the downloaded ``pyradiomics_bhklab-3.1.4.tar.gz``.
        out_dir: the reference-set folder to fill.
        overwrite: replace existing NIfTI files.

    Raises:
        VolumeNotFoundError: the sdist does not exist.
        VolumeFileError: a sha256 does not match.
    """
    sdist_path, out_dir = Path(sdist_path), Path(out_dir)
    if not sdist_path.is_file():
        raise VolumeNotFoundError(
            f"build_real_ct_reference expects the downloaded sdist {SDIST_NAME}, but got sdist_path={str(sdist_path)!r}, "
            "which does not exist. Run scripts/fetch_real_ct.py."
        )
    digest = _sha256(sdist_path.read_bytes())
    if digest != SDIST_SHA256:
        raise VolumeFileError(
            f"build_real_ct_reference expects sha256={SDIST_SHA256}, but got sha256={digest} for {str(sdist_path)!r}."
        )
    infos, manifest = {}, {"source": SDIST_REQUIREMENT, "sdist_sha256": SDIST_SHA256, "cases": {}}
    with tarfile.open(sdist_path, "r:gz") as tar:
        for name, (member, member_sha) in REAL_CT_MEMBERS.items():
            raw = tar.extractfile(member).read()
            if _sha256(raw) != member_sha:
                raise VolumeFileError(
                    f"build_real_ct_reference expects {member} with sha256={member_sha}, but got {_sha256(raw)}."
                )
            array, affine = read_nrrd(raw, who="build_real_ct_reference")
            info = save_image(out_dir / f"{name}.nii.gz", array, affine, overwrite=overwrite)
            infos[name] = info
            manifest["cases"][name] = {
                "file": f"{name}.nii.gz", "sha256": info.sha256, "source_member": member,
                "source_sha256": member_sha, "shape": list(array.shape),
                "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
            }
            logger.info("reference case %s: shape %s", name, array.shape)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return infos


def load_reference_set(folder: str | Path) -> dict[str, ImageVolume]:
    """Load every case listed in ``<folder>/reference.json``, checking each file's sha256."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise VolumeNotFoundError(
            f"load_reference_set expects a folder with {MANIFEST_NAME}, but got folder={str(folder)!r} without it. "
            "Build it with build_real_ct_reference."
        )
    cases = json.loads(manifest_path.read_text())["cases"]
    out = {}
    for name, entry in cases.items():
        path = folder / entry["file"]
        if _sha256(path.read_bytes()) != entry["sha256"]:
            raise VolumeFileError(f"load_reference_set expects {path.name} with sha256={entry['sha256']}, but got another.")
        out[name] = load_image(path)
    return out
