"""Label maps from elsewhere in MAISI IDs: name and TotalSegmentator tables, remapping, RAS resampling.

Used by the ``user`` and ``folder`` mask sources and by the mask generator to bring any label map to
MAISI IDs on the requested grid (``output_size_vox`` at ``spacing_mm``, diagonal RAS affine).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.errors import LabelNameError, MaskSourceError, UnmappedLabelError, did_you_mean
from maisi_core.engine.geometry import affine_from_spacing
from maisi_core.anatomy.mask_types import UNMAPPED_POLICIES


def label_id_of(name: str) -> int:
    """MAISI ID of a name; exact names first (``labels.label_id`` lower-cases, which misses 'vertebrae L5')."""
    table = labels.label_dict()
    if name in table and not name.startswith("dummy"):
        return table[name]
    return labels.label_id(name)


@lru_cache(maxsize=1)
def _totalsegmentator_doc() -> dict[str, Any]:
    text = resources.files("maisi_core").joinpath("data/totalsegmentator_to_maisi.json").read_text()
    return json.loads(text)


def totalsegmentator_names() -> dict[str, str]:
    """Return the shipped TotalSegmentator v2 class name -> MAISI name table."""
    return dict(_totalsegmentator_doc()["names"])


def totalsegmentator_mapping(class_names: Mapping[int, str] | None = None) -> dict[int, int]:
    """Return source ID -> MAISI ID for a TotalSegmentator label map.

    Args:
        class_names: the user's ID -> TotalSegmentator name list; None uses the standard v2
            ``total`` task class map (117 classes).

    Raises:
        LabelNameError: a class name has no MAISI counterpart in the table.
    """
    if class_names is None:
        class_names = {int(k): v for k, v in _totalsegmentator_doc()["class_map_total_v2"].items()}
    table = totalsegmentator_names()
    out = {}
    for source_id, name in class_names.items():
        if name not in table:
            raise LabelNameError(
                f"totalsegmentator_mapping expects TotalSegmentator v2 class names with a MAISI counterpart, "
                f"but got name={name!r} for id={source_id}.{did_you_mean(name, table)} "
                "Map it yourself with an explicit mapping instead."
            )
        out[int(source_id)] = label_id_of(table[name])
    return out


def remap_labels(
    label_map: np.ndarray,
    mapping: Mapping[int, int | str],
    *,
    unmapped: str = "error",
    who: str = "remap_labels",
) -> np.ndarray:
    """Return a uint8 copy of a label map with source IDs replaced by MAISI IDs.

    Args:
        label_map: source IDs ``(X, Y, Z)``; 0 stays background unless the mapping says otherwise.
        mapping: source ID -> MAISI ID or MAISI name.
        unmapped: what to do with source IDs the mapping lacks: ``"error"`` raises,
            ``"background"`` sets them to 0, ``"body"`` to 200.
        who: the caller's name, used in messages.

    Raises:
        UnmappedLabelError: some source IDs are not mapped and ``unmapped="error"``.
        LabelNameError: a mapping target is not a MAISI name.
        MaskSourceError: ``unmapped`` is not a known policy.
    """
    if unmapped not in UNMAPPED_POLICIES:
        raise MaskSourceError(
            f"{who} expects unmapped to be one of {list(UNMAPPED_POLICIES)}, but got unmapped={unmapped!r}."
            f"{did_you_mean(unmapped, UNMAPPED_POLICIES)}"
        )
    arr = np.asarray(label_map)
    targets = {int(k): (label_id_of(v) if isinstance(v, str) else int(v)) for k, v in mapping.items()}
    bad_targets = sorted({t for t in targets.values() if t not in labels.known_ids()})
    if bad_targets:
        raise LabelNameError(
            f"{who} expects mapping targets that are MAISI IDs (see maisi_core.anatomy.labels.label_dict()), "
            f"but got targets={bad_targets[:10]}."
        )
    targets.setdefault(labels.BACKGROUND_ID, labels.BACKGROUND_ID)
    present = np.unique(arr).astype(np.int64).tolist()
    missing = [i for i in present if i not in targets]
    if missing and unmapped == "error":
        raise UnmappedLabelError(
            f"{who} expects every source label to be mapped to a MAISI ID, but got unmapped "
            f"ids={missing[:20]}{' ...' if len(missing) > 20 else ''}. Add them to the mapping, or pass "
            "unmapped='background' or unmapped='body'."
        )
    fill = labels.BODY_ID if unmapped == "body" else labels.BACKGROUND_ID
    lut_keys = np.asarray(present, dtype=np.int64)
    lut_vals = np.asarray([targets.get(i, fill) for i in present], dtype=np.uint8)
    return lut_vals[np.searchsorted(lut_keys, arr.astype(np.int64))]


# ----------------------------------------------------------------------------- resampling


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return a volume ``(X, Y, Z)`` flipped and transposed to the closest RAS axis order, with its affine."""
    import nibabel as nib

    arr = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("RAS"))
    return (np.asarray(nib.orientations.apply_orientation(arr, transform)),
            affine @ nib.orientations.inv_ornt_aff(transform, arr.shape))


def resample_label_map(
    label_map: np.ndarray,
    affine: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    output_size_vox: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a label map to RAS, resample it (nearest) and pad/crop it around its centre.

    Oblique affines are reoriented to the closest axis order; their shear is ignored.

    Args:
        label_map: IDs ``(X, Y, Z)``.
        affine: its ``(4, 4)`` voxel-to-world matrix.
        spacing_mm: target voxel size.
        output_size_vox: target size ``(X, Y, Z)``; voxels outside the source become background.

    Returns:
        The resampled map (same dtype) and its diagonal RAS affine ``(4, 4)``.
    """
    arr_ras, affine_ras = reorient_to_ras(label_map, affine)
    src_spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    src_center = (np.asarray(arr_ras.shape, dtype=np.float64) - 1.0) / 2.0
    center_mm = affine_ras[:3, :3] @ src_center + affine_ras[:3, 3]
    out_size = np.asarray(output_size_vox, dtype=np.int64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    index, valid = [], []
    for a in range(3):
        out_pos = (np.arange(out_size[a]) - (out_size[a] - 1) / 2.0) * spacing[a]
        src = np.floor(out_pos / src_spacing[a] + src_center[a] + 0.5).astype(np.int64)
        valid.append((src >= 0) & (src < arr_ras.shape[a]))
        index.append(np.clip(src, 0, arr_ras.shape[a] - 1))
    out = arr_ras[np.ix_(*index)]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    out = np.where(inside, out, np.zeros((), dtype=out.dtype))
    new_affine = affine_from_spacing(spacing, out_size)
    new_affine[:3, 3] += center_mm
    return np.ascontiguousarray(out), new_affine


# ----------------------------------------------------------------------------- user label maps


def load_label_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A label map file's IDs ``(X, Y, Z)`` and its affine, as stored (``maisi_core.io.load_label``)."""
    from maisi_core.io import load_label

    volume = load_label(path)
    return np.asarray(volume.array), np.asarray(volume.affine, dtype=np.float64)


def load_user_mask(
    path: str | os.PathLike,
    *,
    spacing_mm: Sequence[float],
    output_size_vox: Sequence[int],
    mapping: Mapping[int, int | str] | str = "maisi",
    class_names: Mapping[int, str] | None = None,
    unmapped: str = "error",
    add_body: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a label map from another segmenter, remap it to MAISI IDs, add the body, resample it.

    Args:
        path: a NIfTI label map.
        spacing_mm: target voxel size.
        output_size_vox: target size ``(X, Y, Z)``.
        mapping: source ID -> MAISI ID or name; ``"totalsegmentator"`` for TotalSegmentator
            (with ``class_names``, or the standard v2 ``total`` map); ``"maisi"`` for maps already
            in MAISI IDs.
        class_names: TotalSegmentator ID -> name list for ``mapping="totalsegmentator"``.
        unmapped: policy for source IDs the mapping lacks (see :func:`remap_labels`).
        add_body: add label 200 with :func:`maisi_core.anatomy.labels.add_body_label` when it is missing.

    Returns:
        The label map ``(X, Y, Z)`` (uint8) and its diagonal RAS affine.
    """
    array, affine = load_label_file(path)
    if isinstance(mapping, str):
        if mapping == "totalsegmentator":
            mapping = totalsegmentator_mapping(class_names)
        elif mapping == "maisi":
            mapping = {i: i for i in labels.known_ids()}
        else:
            raise MaskSourceError(
                f"load_user_mask expects mapping to be a dict, 'totalsegmentator' or 'maisi', "
                f"but got mapping={mapping!r}.{did_you_mean(mapping, ('totalsegmentator', 'maisi'))}"
            )
    remapped = remap_labels(array, mapping, unmapped=unmapped, who="load_user_mask")
    if add_body and not np.any(remapped == labels.BODY_ID):
        remapped = labels.add_body_label(remapped)
    return resample_label_map(remapped, affine, spacing_mm=spacing_mm, output_size_vox=output_size_vox)


def parse_label_list(values: Iterable[int | str]) -> tuple[int, ...]:
    """Return MAISI IDs for a list of IDs or names."""
    return tuple(label_id_of(v) if isinstance(v, str) else int(v) for v in values)
