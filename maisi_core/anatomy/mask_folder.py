"""The ``folder`` mask source: an index of candidate label maps and the pick closest to the request."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maisi_core.anatomy import labels
from maisi_core.anatomy.body import derive_rng
from maisi_core.digest import sha256_file
from maisi_core.errors import MaskSourceError, NoCandidateMaskError
from maisi_core.anatomy.mask_remap import load_label_file, parse_label_list, reorient_to_ras, resample_label_map
from maisi_core.anatomy.mask_types import FolderOptions, MaskRequest, MaskResult, place_requested_tumor

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def build_mask_index(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Scan a folder of label-map NIfTI files (MAISI IDs) and describe each one.

    Returns:
        One entry per file, sorted by name: ``file`` (name relative to the folder), ``spacing_mm``,
        ``dim``, ``label_list``, ``top_region_index`` and ``bottom_region_index`` (MAISI's 0-3
        region order, None when no region marker is present) and ``sha256``. Save it with
        :func:`save_mask_index` as ``mask_index.json`` next to the masks.
    """
    root = Path(folder)
    entries = []
    for path in sorted(p for p in root.iterdir() if p.name.endswith(_NIFTI_SUFFIXES)):
        array, affine = reorient_to_ras(*load_label_file(path))
        regions = labels.regions_in_label_map(array)
        entries.append({
            "file": path.name,
            "spacing_mm": [round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            "dim": [int(v) for v in array.shape],
            "label_list": sorted(int(v) for v in np.unique(array) if v != labels.BACKGROUND_ID),
            "top_region_index": labels.region_index(regions[0]) if regions else None,
            "bottom_region_index": labels.region_index(regions[-1]) if regions else None,
            "sha256": sha256_file(path),
        })
    return entries


def save_mask_index(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write a mask index as JSON."""
    Path(path).write_text(json.dumps({"version": 1, "masks": list(entries)}, indent=1))


def load_mask_index(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a mask index written by :func:`save_mask_index`."""
    return list(json.loads(Path(path).read_text())["masks"])


def score_candidate(entry: Mapping[str, Any], *, spacing_mm: Sequence[float], output_size_vox: Sequence[int]) -> float:
    """Upstream's distance: sum over axes of |FOV difference|/10 + |dim difference|/100 + |spacing difference|."""
    dim, spacing = np.asarray(entry["dim"], float), np.asarray(entry["spacing_mm"], float)
    size, target = np.asarray(output_size_vox, float), np.asarray(spacing_mm, float)
    return float(np.sum(np.abs(dim * spacing - size * target) / 10.0 + np.abs(dim - size) / 100.0
                        + np.abs(spacing - target)))


def select_candidates(
    entries: Sequence[Mapping[str, Any]],
    *,
    required_labels: Sequence[int],
    regions: Sequence[str],
    tumor_id: int | None,
    spacing_mm: Sequence[float],
    output_size_vox: Sequence[int],
) -> list[tuple[float, Mapping[str, Any]]]:
    """Filter index entries and return ``(score, entry)`` pairs, best first (ties by file name).

    An entry qualifies when it holds every required label, its region span covers every
    requested region (entries without region fields pass), and it holds no tumour other than the
    requested one (a tumour-free entry gets the tumour placed later).
    """
    wanted = {labels.region_index(r) for r in regions}
    out = []
    for entry in entries:
        present = set(entry["label_list"])
        if not set(required_labels) <= present:
            continue
        top, bottom = entry.get("top_region_index"), entry.get("bottom_region_index")
        if top is not None and bottom is not None and not all(top <= r <= bottom for r in wanted):
            continue
        if present & set(labels.TUMOR_IDS) - ({tumor_id} if tumor_id is not None else set()):
            continue
        out.append((score_candidate(entry, spacing_mm=spacing_mm, output_size_vox=output_size_vox), entry))
    return sorted(out, key=lambda pair: (pair[0], pair[1]["file"]))


def retrieve_mask(request: MaskRequest) -> MaskResult:
    """Pick the closest candidate mask from a folder, resample it and place the requested tumour.

    Candidates are tried best score first; one that loses a required label when resampled is
    dropped. With ``top_k > 1`` the seed draws among the ``top_k`` best survivors.

    Raises:
        NoCandidateMaskError: no candidate qualifies or survives resampling.
    """
    opts = request.options
    if not isinstance(opts, FolderOptions):
        raise MaskSourceError(f"retrieve_mask expects FolderOptions, but got options={type(opts).__name__}.")
    folder = Path(opts.folder)
    index_path = folder / opts.index_name
    entries = load_mask_index(index_path) if index_path.exists() else build_mask_index(folder)
    required = parse_label_list(opts.required_labels)
    tumor_id = request.tumor.label_id if request.tumor is not None else None
    ranked = select_candidates(entries, required_labels=required, regions=request.regions, tumor_id=tumor_id,
                               spacing_mm=request.spacing_mm, output_size_vox=request.output_size_vox)
    top_k = int(opts.top_k)
    survivors = []
    for _, entry in ranked:
        array, affine = load_label_file(folder / entry["file"])
        out, out_affine = resample_label_map(array, affine, spacing_mm=request.spacing_mm,
                                             output_size_vox=request.output_size_vox)
        if set(required) <= set(np.unique(out).tolist()):
            survivors.append((entry, out.astype(np.uint8), out_affine))
        else:
            logger.info("candidate %s lost a required label when resampled; skipped", entry["file"])
        if len(survivors) >= top_k:
            break
    if not survivors:
        raise NoCandidateMaskError(
            f"retrieve_mask expects at least one mask in {str(folder)!r} with labels {list(required)}, regions "
            f"{list(request.regions)} and no other tumour than {tumor_id}, but got candidates={len(ranked)} "
            f"of {len(entries)} (none kept its required labels after resampling). Relax required_labels or regions."
        )
    pick = int(derive_rng(request.seed, "folder").integers(len(survivors))) if len(survivors) > 1 else 0
    entry, label_map, affine = survivors[pick]
    tumors = place_requested_tumor(label_map, affine, request)
    return MaskResult(label_map, affine, "folder", f"folder:{entry['file']}:{entry['sha256'][:16]}", tumors)
