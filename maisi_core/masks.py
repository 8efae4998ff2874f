"""Where the ControlNet's mask comes from: the phantom, a user's label map, a folder of candidate masks,
or MAISI's own mask generator, all behind one call shape.

``make_mask(MaskRequest(...))`` picks the source by name from :data:`MASK_SOURCES` and returns a
:class:`MaskResult` (label map in MAISI IDs, affine, source name, deterministic ``mask_id`` and the
placed tumours). Every source returns a map of ``output_size_vox`` at ``spacing_mm`` with a
diagonal RAS affine centred on the volume.

Source options (``MaskRequest.options``):

* ``phantom``: none.
* ``user``: ``path`` (NIfTI label map, required); ``mapping`` (source ID -> MAISI ID or name; or the
  string ``"totalsegmentator"`` for the standard v2 ``total`` class map, or ``"maisi"`` when the map
  already holds MAISI IDs, the default); ``class_names`` (source ID -> TotalSegmentator name, for
  other TotalSegmentator tasks or versions); ``unmapped`` (``"error"``, ``"background"`` or
  ``"body"``); ``add_body`` (bool, default True).
* ``folder``: ``folder`` (with an index built by :func:`build_mask_index` saved as ``index_name``,
  default ``mask_index.json``, or scanned on the fly when the file is absent); ``required_labels``
  (IDs or names that must survive resampling); ``top_k`` (draw among the k best, default 1).
* ``maisi_mask_generator``: ``generator`` (a :class:`maisi_core.mask_generator.MaskGenerator`);
  ``size_vector`` (10 values, MAISI.md 4.1); ``num_inference_steps``; ``latent_shape``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from maisi_core import labels
from maisi_core.digest import sha256_file
from maisi_core.errors import (
    LabelNameError,
    MaskSourceError,
    NoCandidateMaskError,
    UnmappedLabelError,
    did_you_mean,
)
from maisi_core.geometry import affine_from_spacing
from maisi_core.phantom import PhantomConfig, PlacedTumor, TumorSpec, generate_phantom, place_tumor
from maisi_core.anatomy import derive_rng

logger = logging.getLogger(__name__)

UNMAPPED_POLICIES = ("error", "background", "body")
INDEX_NAME = "mask_index.json"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class MaskRequest:
    """What mask to make.

    Attributes:
        source: a key of :data:`MASK_SOURCES`.
        regions: body regions (see :class:`maisi_core.phantom.PhantomConfig`).
        output_size_vox: size ``(X, Y, Z)`` of the returned map.
        spacing_mm: its voxel size in mm.
        tumor: an optional tumour to place (or to find, for the folder source).
        seed: the case's seed.
        options: source-specific options (see the module docstring).
    """

    source: str = "phantom"
    regions: tuple[str, ...] | str = ("chest", "abdomen")
    output_size_vox: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    tumor: TumorSpec | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in MASK_SOURCES:
            raise MaskSourceError(
                f"MaskRequest expects source to be one of {sorted(MASK_SOURCES)}, but got "
                f"source={self.source!r}.{did_you_mean(self.source, MASK_SOURCES)}"
            )
        geometry = PhantomConfig(self.regions, self.output_size_vox, self.spacing_mm, self.tumor)
        object.__setattr__(self, "regions", geometry.regions)
        object.__setattr__(self, "output_size_vox", geometry.output_size_vox)
        object.__setattr__(self, "spacing_mm", geometry.spacing_mm)
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def phantom_config(self) -> PhantomConfig:
        """The request as a phantom configuration."""
        return PhantomConfig(self.regions, self.output_size_vox, self.spacing_mm, self.tumor)


@dataclass(frozen=True, eq=False)
class MaskResult:
    """A mask ready for the ControlNet.

    Attributes:
        label_map: MAISI IDs ``(X, Y, Z)`` (uint8).
        affine: ``(4, 4)`` diagonal RAS matrix.
        mask_source: the source's name.
        mask_id: a deterministic identifier (seed, file name and content hash, ...).
        tumors: tumours placed by the source.
    """

    label_map: np.ndarray
    affine: np.ndarray
    mask_source: str
    mask_id: str
    tumors: list[PlacedTumor] = field(default_factory=list)


def make_mask(request: MaskRequest) -> MaskResult:
    """Make the mask a request asks for, with the source it names."""
    return MASK_SOURCES[request.source](request)


# ----------------------------------------------------------------------------- label remapping


def _label_id(name: str) -> int:
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
        out[int(source_id)] = _label_id(table[name])
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
    targets = {int(k): (_label_id(v) if isinstance(v, str) else int(v)) for k, v in mapping.items()}
    bad_targets = sorted({t for t in targets.values() if t not in labels.known_ids()})
    if bad_targets:
        raise LabelNameError(
            f"{who} expects mapping targets that are MAISI IDs (see maisi_core.labels.label_dict()), "
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


def _load_label_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
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
        add_body: add label 200 with :func:`maisi_core.labels.add_body_label` when it is missing.

    Returns:
        The label map ``(X, Y, Z)`` (uint8) and its diagonal RAS affine.
    """
    array, affine = _load_label_file(path)
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


def _user_source(request: MaskRequest) -> MaskResult:
    opts = dict(request.options)
    path = _required_option(opts, "path", "user")
    label_map, affine = load_user_mask(
        path, spacing_mm=request.spacing_mm, output_size_vox=request.output_size_vox,
        mapping=opts.get("mapping", "maisi"), class_names=opts.get("class_names"),
        unmapped=opts.get("unmapped", "error"), add_body=bool(opts.get("add_body", True)),
    )
    tumors = _place_requested_tumor(label_map, affine, request)
    mask_id = f"user:{Path(path).name}:{sha256_file(path)[:16]}"
    return MaskResult(label_map, affine, "user", mask_id, tumors)


def _required_option(opts: Mapping[str, Any], name: str, source: str) -> Any:
    if opts.get(name) is None:
        raise MaskSourceError(
            f"make_mask expects option {name!r} for source {source!r}, but got options={sorted(opts)}. "
            f"Pass MaskRequest(source={source!r}, options={{{name!r}: ...}})."
        )
    return opts[name]


def _place_requested_tumor(label_map: np.ndarray, affine: np.ndarray, request: MaskRequest) -> list[PlacedTumor]:
    """Place the requested tumour unless the map already holds it."""
    if request.tumor is None or np.any(label_map == request.tumor.label_id):
        return []
    return [place_tumor(label_map, affine, request.tumor.label_id, request.tumor.diameter_mm,
                        rng=derive_rng(request.seed, "tumor"))]


# ----------------------------------------------------------------------------- phantom source


def _phantom_source(request: MaskRequest) -> MaskResult:
    case = generate_phantom(request.phantom_config(), seed=request.seed)
    return MaskResult(case.label_map, case.affine, "phantom", f"phantom:{request.seed}", case.tumors)


def _generator_source(request: MaskRequest) -> MaskResult:
    from maisi_core.mask_generator import generate_mask_for_request

    return generate_mask_for_request(request)


def _folder_source(request: MaskRequest) -> MaskResult:
    return retrieve_mask(request)


# ----------------------------------------------------------------------------- folder retrieval


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
        array, affine = reorient_to_ras(*_load_label_file(path))
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
    opts = dict(request.options)
    folder = Path(_required_option(opts, "folder", "folder"))
    index_path = folder / opts.get("index_name", INDEX_NAME)
    entries = load_mask_index(index_path) if index_path.exists() else build_mask_index(folder)
    required = parse_label_list(opts.get("required_labels", ()))
    tumor_id = request.tumor.label_id if request.tumor is not None else None
    ranked = select_candidates(entries, required_labels=required, regions=request.regions, tumor_id=tumor_id,
                               spacing_mm=request.spacing_mm, output_size_vox=request.output_size_vox)
    top_k = int(opts.get("top_k", 1))
    survivors = []
    for _, entry in ranked:
        array, affine = _load_label_file(folder / entry["file"])
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
    tumors = _place_requested_tumor(label_map, affine, request)
    return MaskResult(label_map, affine, "folder", f"folder:{entry['file']}:{entry['sha256'][:16]}", tumors)


MASK_SOURCES: dict[str, Callable[[MaskRequest], MaskResult]] = {
    "phantom": _phantom_source,
    "folder": _folder_source,
    "user": _user_source,
    "maisi_mask_generator": _generator_source,
}


def parse_label_list(values: Iterable[int | str]) -> tuple[int, ...]:
    """Return MAISI IDs for a list of IDs or names."""
    return tuple(_label_id(v) if isinstance(v, str) else int(v) for v in values)
