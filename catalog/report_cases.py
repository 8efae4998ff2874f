"""The dataset card's per-case parts: previews of each cohort, structure volumes and tumour sizes.

Volumes are read once each: a case that is previewed is drawn and counted from the same arrays. A file that
cannot be read gives a note on the card, never a traceback.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.export import load_nifti
from catalog.report_html import esc, img, table
from catalog.store import Catalog

logger = logging.getLogger(__name__)

PREVIEW_WINDOWS = ("soft_tissue", "lung", "bone")  # names of maisi_core.preview.CT_WINDOWS
_SLAB = 16  # z slices counted at a time (bounds the memory of the voxel counts on large volumes)


@dataclass
class StructureTally:
    """Voxel volumes per cohort and label, gathered case by case.

    Attributes:
        volumes_ml: cohort -> label ID -> the volume in mL of each case holding the label.
        cases: cohort -> number of cases counted.
        unreadable: sample IDs whose label could not be read.
    """

    volumes_ml: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def add(self, cohort: str, counts: dict[int, int], voxel_ml: float) -> None:
        """Record one case's voxel counts (label ID -> voxels) with its voxel volume."""
        self.cases[cohort] = self.cases.get(cohort, 0) + 1
        per_label = self.volumes_ml.setdefault(cohort, {})
        for label, n in counts.items():
            per_label.setdefault(label, []).append(n * voxel_ml)


def cohort_of(row: dict[str, Any]) -> str:
    """The cohort name of a row ("" when none)."""
    return str(row.get("cohort") or "")


def preview_rows(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Return up to ``limit`` rows to preview, taking each cohort's cases in turn (so every cohort shows).

    Within a cohort, cases with a tumour come first, so a cohort that asks for one shows it.
    """
    by_cohort: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["sample_id"]):
        by_cohort.setdefault(str(row.get("cohort")), []).append(row)
    for cases in by_cohort.values():
        cases.sort(key=lambda r: r.get("tumor_label") is None)  # stable: sample_id order otherwise
    out: list[dict[str, Any]] = []
    for k in range(max((len(v) for v in by_cohort.values()), default=0)):
        out += [cases[k] for cases in by_cohort.values() if k < len(cases)]
    return out[:limit]


def voxel_counts(label_map: np.ndarray) -> dict[int, int]:
    """Return label ID -> number of voxels (background 0 left out), counted a slab at a time."""
    arr = np.asarray(label_map)
    total: dict[int, int] = {}
    for start in range(0, arr.shape[-1], _SLAB):
        slab = np.ascontiguousarray(arr[..., start:start + _SLAB]).ravel()
        if slab.size == 0:
            continue
        if np.issubdtype(slab.dtype, np.integer) and slab.min() >= 0 and slab.max() < 4096:
            counts = np.bincount(slab, minlength=1)
            pairs = ((int(i), int(counts[i])) for i in np.flatnonzero(counts))
        else:
            values, counts = np.unique(slab, return_counts=True)
            pairs = ((int(v), int(c)) for v, c in zip(values, counts, strict=True))
        for label, n in pairs:
            total[label] = total.get(label, 0) + n
    total.pop(0, None)
    return total


def _reason(exc: Exception, root_uri: str, root_name: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    text = " ".join(str(exc).split()).replace(root_uri, root_name)
    return text[:160]


def _label_name(label: int, unknown: str) -> str:
    """The MAISI name of a label ID, or ``unknown`` when the dictionary has none."""
    from maisi_core.anatomy.labels import label_name
    from maisi_core.errors import LabelNameError

    try:
        return label_name(label)
    except LabelNameError:
        return unknown


def _tumour_caption(row: dict[str, Any], found: int | None, center: tuple[int, ...]) -> str:
    """The caption's sentence on the tumour the slices go through (``found``: its label, None when none)."""
    requested = row.get("tumor_label")
    if found is None:
        if requested is None:
            return "No tumour requested; the slices go through the volume's centre."
        name = _label_name(int(requested), f"label {requested}")
        return (f"The cohort asks for {row.get('pathology')} ({name}, label {requested}) but this label map holds "
                "no voxel of it; the slices go through the volume's centre.")
    text = f"Slices through the {_label_name(found, f'label {found}')} (label {found}) at voxel {center}, circled."
    facts = []
    if row.get("tumor_size_mm") is not None:
        facts.append(f"requested {row['tumor_size_mm']:.0f} mm")
    if row.get("tumor_diameter_mm") is not None:
        facts.append(f"measured {row['tumor_diameter_mm']:.0f} mm")
    if row.get("tumor_contrast_hu") is not None:
        facts.append(f"tumour {row['tumor_contrast_hu']:+.0f} HU against its host")
    sentence = ", ".join(facts)
    return text + (f" {sentence[:1].upper()}{sentence[1:]}." if facts else "")


def preview_figure(row: dict[str, Any], image: np.ndarray, label_map: np.ndarray, zooms: tuple[float, ...]) -> str:
    """Return the ``<figure>`` of one case: plain and windowed slices and the label overlay, with a caption.

    The slices go through the tumour the row asks for (``tumor_label``), or through any tumour the label map
    holds when the row asks for none, else through the volume's centre.
    """
    from maisi_core.anatomy.labels import TUMOR_IDS
    from maisi_core.preview import preview_center_vox, save_preview_png

    requested = row.get("tumor_label")
    center = preview_center_vox(label_map, label_map.shape, tumor_label=None if requested is None else int(requested))
    at_center = int(label_map[center])
    found = at_center if at_center in TUMOR_IDS and requested in (None, at_center) else None
    buffer = io.BytesIO()
    save_preview_png(image, label_map, buffer, center_vox=center, windows=PREVIEW_WINDOWS,
                     spacing_mm=zooms, mark_center=found is not None)
    caption = (f"{row['sample_id']}: cohort {cohort_of(row) or '—'}, {row.get('body_region')}, "
               f"{row.get('pathology')}, seed {row.get('seed')}. {_tumour_caption(row, found, center)}")
    return f"<figure>{img(buffer.getvalue(), caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def _missing_note(row: dict[str, Any], reason: str) -> str:
    note = (f"{row['sample_id']}: no preview, its image or label cannot be read ({reason}). "
            "Run ctfactory catalog verify ROOT; ctfactory run regenerates missing files.")
    return f"<figure><figcaption>{esc(note)}</figcaption></figure>"


def _draw(catalog: Catalog, row: dict[str, Any], label_map: np.ndarray, zooms: tuple[float, ...],
          root_name: str) -> str:
    """The preview figure of a case whose label is read, or the note saying why its image cannot be."""
    try:
        image = np.asanyarray(load_nifti(catalog, row["image_uri"]).dataobj).astype(np.float32)
    except Exception as exc:  # a missing or damaged file must not take the whole card down
        reason = _reason(exc, catalog.root_uri, root_name)
        logger.warning("report: no preview for %s (%s)", row["sample_id"], reason)
        return _missing_note(row, reason)
    return preview_figure(row, image, label_map, zooms)


def read_cases(catalog: Catalog, rows: Iterable[dict[str, Any]], previews: list[dict[str, Any]], *,
               root_name: str) -> tuple[list[str], StructureTally]:
    """Read each row's label (and a preview's image) once; return the preview figures and the structure tally.

    Args:
        catalog: the catalog the rows' URIs are relative to.
        rows: the cases whose structures are counted.
        previews: the cases drawn, in the order shown (counted too).
        root_name: how the card names the root (replaces the local root in error notes).
    """
    tally = StructureTally()
    figures: dict[str, str] = {}
    preview_ids = {r["sample_id"] for r in previews}
    ordered = list(previews) + [r for r in rows if r["sample_id"] not in preview_ids]
    for row in ordered:
        drawn = row["sample_id"] in preview_ids
        try:
            label_img = load_nifti(catalog, row["label_uri"])
            label_map = np.asanyarray(label_img.dataobj)
        except Exception as exc:  # a missing or damaged file must not take the whole card down
            reason = _reason(exc, catalog.root_uri, root_name)
            logger.warning("report: cannot read the label of %s (%s)", row["sample_id"], reason)
            tally.unreadable.append(row["sample_id"])
            if drawn:
                figures[row["sample_id"]] = _missing_note(row, reason)
            continue
        zooms = tuple(float(z) for z in label_img.header.get_zooms()[:3])
        tally.add(cohort_of(row), voxel_counts(label_map), float(np.prod(zooms)) / 1000.0)
        if drawn:
            figures[row["sample_id"]] = _draw(catalog, row, label_map, zooms, root_name)
    return [figures[r["sample_id"]] for r in previews], tally


def _ml(volume: float) -> str:
    """A volume in mL with as many digits as it needs (large organs whole, small structures to 3 digits)."""
    return f"{volume:.0f}" if volume >= 100 else f"{volume:.1f}" if volume >= 1 else f"{volume:.3g}"


def structures_table(tally: StructureTally) -> str:
    """Return the table of structures: per label, each cohort's median volume in mL and how many cases hold it."""
    cohorts = sorted(tally.cases)
    labels_seen = sorted({label for per in tally.volumes_ml.values() for label in per})
    if not labels_seen:
        return '<p class="note">No label volumes could be read.</p>'
    rows = []
    for label in labels_seen:
        cells: list[Any] = [label, _label_name(label, "not a MAISI label")]
        for cohort in cohorts:
            vols = tally.volumes_ml.get(cohort, {}).get(label, [])
            cells.append(f"{_ml(float(np.median(vols)))} ({len(vols)}/{tally.cases[cohort]})" if vols else "—")
        rows.append(cells)
    header = ["ID", "structure", *(f"{c or '—'}: median mL (cases)" for c in cohorts)]
    return f'<div class="scroll">{table(header, rows)}</div>'


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    return f"{np.median(values):{fmt}} ({min(values):{fmt}} … {max(values):{fmt}})"


def tumour_table(rows: list[dict[str, Any]]) -> str:
    """Per cohort with tumours: published cases, tumour type, requested and measured size, contrast to the host."""
    by_cohort: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("tumor_label") is not None or r.get("tumor_contrast_hu") is not None:
            by_cohort.setdefault(cohort_of(r), []).append(r)
    if not by_cohort:
        return '<p class="note">No published case has a tumour.</p>'
    table_rows = []
    for cohort, cases in sorted(by_cohort.items()):
        ids = {int(r["tumor_label"]) for r in cases if r.get("tumor_label") is not None}
        kinds = sorted(_label_name(i, f"label {i}") for i in ids)
        table_rows.append([cohort, len(cases), ", ".join(kinds) or "—",
                           _median_range(_values(cases, "tumor_size_mm"), ".0f"),
                           _median_range(_values(cases, "tumor_diameter_mm"), ".0f"),
                           _median_range(_values(cases, "tumor_contrast_hu"), "+.0f")])
    header = ["cohort", "cases", "tumour", "requested mm, median (range)", "measured diameter mm, median (range)",
              "contrast HU, median (range)"]
    return ("<p>Tumours of the published cases: the size the spec asked for, the equivalent-sphere diameter QC "
            "measured on the label, and the contrast QC measured against a ring of the host organ.</p>"
            + table(header, table_rows))
