"""Exports of a dataset version: nnU-Net v2, MSD/MONAI datalist, and Croissant JSON-LD.

Only passing samples are exported. Files are copied, never moved and never hard-linked: an export
is the user's to edit, and a hard link would let an edit change the catalog's own file (issue 11). An export refuses to write into a non-empty
destination unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.compute as pc

from catalog import fs as _fs
from catalog.croissant import build_croissant
from catalog.choices import EXPORT_FORMATS  # re-exported: the CLI reads it without this module
from catalog.errors import ExportError, ExportExistsError
from catalog.store import Catalog

logger = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
_SUBDIRS = ("imagesTr", "labelsTr", "data")
_FILES = ("dataset.json", "croissant.json", "samples.csv")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    format: str
    path: Path
    version: int
    num_cases: int
    label_ids: dict[int, int]  # exported label ID -> MAISI label ID


def passing_rows(catalog: Catalog, *, as_of: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Return the ``samples`` version and its passing rows, sorted by ``sample_id``.

    Raises:
        ExportError: When the version has no passing samples.
    """
    version = catalog.delta_table("samples", version=as_of).version()
    table = catalog.read_table("samples", as_of=version)
    table = table.filter(pc.and_(pc.equal(table["status"], "passed"), pc.equal(table["qc_pass"], True)))
    if table.num_rows == 0:
        raise ExportError(f"export expects at least one passing sample, but got 0 at version={version}.")
    return version, sorted(table.to_pylist(), key=lambda r: r["sample_id"])


def prepare_destination(dest: str | Path, *, overwrite: bool) -> Path:
    """Create ``dest``; refuse a non-empty one unless ``overwrite`` (then clear the export's own files).

    Raises:
        ExportExistsError: When ``dest`` is not empty and ``overwrite`` is False.
        ExportError: When ``dest`` is an existing file.
    """
    path = Path(dest)
    if path.exists() and not path.is_dir():
        raise ExportError(f"export expects --dest to be a directory, but got dest={str(path)!r} (a file).")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ExportExistsError(
                f"export expects an empty or new destination, but got dest={str(path)!r} with files. "
                f"Pass overwrite=True (--overwrite) to replace the export."
            )
        for child in path.iterdir():
            if child.is_dir() and (child.name in _SUBDIRS or child.name.startswith("Dataset")):
                shutil.rmtree(child)
            elif child.name in _FILES:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def case_name(sample_id: str) -> str:
    """Return a file-system-safe case identifier for ``sample_id``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)


def _place(catalog: Catalog, uri: str, target: Path, *, link: bool = False) -> None:
    """Copy ``uri`` to ``target`` (an independent file: editing it never touches the catalog's).

    With ``link``, a local file is hard-linked instead (no extra space, but the export and the catalog
    then share the bytes: editing either edits both, which ``catalog verify`` reports as a digest
    mismatch). A remote file, or one on another file system, is always copied.
    """
    source = _fs.resolve_uri(catalog.root_uri, uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _fs.is_remote(source):
        if link:
            try:
                os.link(source, target)
                return
            except OSError as exc:  # another file system, or links not allowed: copy
                logger.info("export: cannot hard-link %s (%s); copying", uri, exc)
        shutil.copy2(source, target)
        return
    fs, path = _fs.filesystem(source, catalog.storage_options)
    fs.get(path, str(target))


def load_nifti(catalog: Catalog, uri: str) -> nib.Nifti1Image:
    """Load a NIfTI volume from a local path or remote URI relative to the catalog root."""
    source = _fs.resolve_uri(catalog.root_uri, uri)
    if not _fs.is_remote(source):
        return nib.load(source)
    fs, path = _fs.filesystem(source, catalog.storage_options)
    data = fs.cat_file(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return nib.Nifti1Image.from_bytes(data)


def collect_label_ids(catalog: Catalog, rows: list[dict[str, Any]]) -> list[int]:
    """Return the sorted non-background MAISI label IDs present in the rows' label files."""
    present: set[int] = set()
    for row in rows:
        data = np.asanyarray(load_nifti(catalog, row["label_uri"]).dataobj)
        present.update(int(v) for v in np.unique(data))
    present.discard(0)
    return sorted(present)


def _label_names(maisi_ids: list[int]) -> dict[int, str]:
    from maisi_core.errors import LabelNameError
    from maisi_core.anatomy.labels import label_name

    names = {}
    for lid in maisi_ids:
        try:
            names[lid] = label_name(lid)
        except LabelNameError as exc:
            raise ExportError(f"export expects MAISI label IDs in the label files, but got label={lid}. {exc}") from exc
    return names


def _check_file_ending(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for key in ("image_uri", "label_uri"):
            if not row[key].endswith(FILE_ENDING):
                raise ExportError(f"export expects {FILE_ENDING} files, but got {key}={row[key]!r} "
                                  f"for sample_id={row['sample_id']!r}.")


def image_modality(rows: list[dict[str, Any]]) -> str:
    """The one modality of the exported images (``"CT"``, ``"MR"``): a training folder holds one channel."""
    found = sorted({row.get("modality") or "CT" for row in rows})
    if len(found) != 1:
        raise ExportError(f"export expects images of one modality, but got modality={found}. Export each "
                          "modality's rows to its own folder.")
    return found[0]


def export_nnunet(catalog: Catalog, dest: str | Path, *, as_of: int | None = None, dataset_id: int = 500,
                  name: str | None = None, overwrite: bool = False, link: bool = False) -> ExportResult:
    """Write ``dest/DatasetNNN_Name`` in nnU-Net v2 raw layout with consecutive label IDs.

    Args:
        catalog: The catalog to export.
        dest: The nnU-Net raw directory to write the dataset folder into.
        as_of: A ``samples`` version; latest when None.
        dataset_id: nnU-Net dataset ID, 1-999 (1-10 are taken by MSD).
        name: Dataset name (letters, digits, ``_``); the catalog's dataset name when None.
        overwrite: Replace an existing export in ``dest``.

    Returns:
        An :class:`ExportResult` whose ``label_ids`` maps nnU-Net IDs back to MAISI IDs.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ExportError(f"export_nnunet expects dataset_id in 1..999, but got dataset_id={dataset_id}.")
    version, rows = passing_rows(catalog, as_of=as_of)
    modality = image_modality(rows)
    _check_file_ending(rows)
    name = re.sub(r"[^A-Za-z0-9]", "", (name or rows[0]["dataset"] or "Synthetic").title()) or "Synthetic"
    folder = prepare_destination(dest, overwrite=overwrite) / f"Dataset{int(dataset_id):03d}_{name}"
    maisi_ids = collect_label_ids(catalog, rows)
    names = _label_names(maisi_ids)
    lut = np.zeros(max(maisi_ids + [0]) + 1, dtype=np.uint16)
    for new_id, old_id in enumerate(maisi_ids, start=1):
        lut[old_id] = new_id
    dtype = np.uint8 if len(maisi_ids) < 256 else np.uint16
    for row in rows:
        case = case_name(row["sample_id"])
        _place(catalog, row["image_uri"], folder / "imagesTr" / f"{case}_0000{FILE_ENDING}", link=link)
        label = load_nifti(catalog, row["label_uri"])
        remapped = lut[np.asanyarray(label.dataobj).astype(np.int64)].astype(dtype)
        out = nib.Nifti1Image(remapped, label.affine, label.header)
        out.set_data_dtype(dtype)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(out, str(folder / "labelsTr" / f"{case}{FILE_ENDING}"))
    labels = {"background": 0} | {names[old]: new for new, old in enumerate(maisi_ids, start=1)}
    meta = {
        "name": name, "description": f"Synthetic {modality} from {rows[0]['model_name']} (ctfactory)",
        "channel_names": {"0": modality}, "labels": labels, "numTraining": len(rows),
        "file_ending": FILE_ENDING,
        "maisi_label_ids": {str(new): old for new, old in enumerate(maisi_ids, start=1)},
        "ctfactory": _provenance(catalog, rows, version),
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    logger.info("export_nnunet: %d cases to %s", len(rows), folder)
    return ExportResult("nnunet", folder, version, len(rows), {new: old for new, old in enumerate(maisi_ids, start=1)})


def export_msd(catalog: Catalog, dest: str | Path, *, as_of: int | None = None,
               overwrite: bool = False, link: bool = False) -> ExportResult:
    """Write an MSD-style ``dataset.json`` datalist (MONAI ``load_decathlon_datalist``) with files.

    Labels keep their MAISI IDs; ``labels`` names the IDs present.
    """
    version, rows = passing_rows(catalog, as_of=as_of)
    modality = image_modality(rows)
    folder = prepare_destination(dest, overwrite=overwrite)
    maisi_ids = collect_label_ids(catalog, rows)
    names = _label_names(maisi_ids)
    training = []
    for row in rows:
        case = case_name(row["sample_id"])
        image = f"imagesTr/{case}{FILE_ENDING}"
        label = f"labelsTr/{case}{FILE_ENDING}"
        _place(catalog, row["image_uri"], folder / image, link=link)
        _place(catalog, row["label_uri"], folder / label, link=link)
        training.append({
            "image": f"./{image}", "label": f"./{label}", "sample_id": row["sample_id"],
            "dim": row["output_size"], "spacing": row["spacing_mm"], "body_region": row["body_region"],
            "seed": row["seed"], "cohort": row["cohort"],
        })
    meta = {
        "name": rows[0]["dataset"], "description": f"Synthetic {modality} from {rows[0]['model_name']} (ctfactory)",
        "reference": "ctfactory / NVIDIA MAISI", "licence": _licence(catalog, version),
        "release": rows[0]["dataset_version"], "tensorImageSize": "3D", "modality": {"0": modality},
        "labels": {"0": "background"} | {str(i): names[i] for i in maisi_ids},
        "numTraining": len(rows), "numTest": 0, "training": training, "test": [],
        "ctfactory": _provenance(catalog, rows, version),
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    logger.info("export_msd: %d cases to %s", len(rows), folder)
    return ExportResult("msd", folder, version, len(rows), {i: i for i in maisi_ids})


def export_croissant(catalog: Catalog, dest: str | Path, *, as_of: int | None = None, overwrite: bool = False,
                     licence: str | None = None, url: str | None = None, link: bool = False) -> ExportResult:
    """Write ``croissant.json`` (Croissant 1.1 JSON-LD with RAI fields), ``samples.csv`` and ``data/`` files.

    The same catalog version gives byte-identical files: dates come from the catalog rows, paths are
    relative to ``dest``.

    Args:
        catalog: The catalog to export.
        dest: The export folder.
        as_of: A ``samples`` version; latest when None.
        overwrite: Replace an existing export in ``dest``.
        licence: The dataset's SPDX licence id (one of ``catalog.croissant.SPDX_LICENCES``); when None, the
            id that starts the catalog's recorded licence text.
        url: The dataset's web page, an absolute http(s) URL (Croissant 1.1 lists ``url`` as required:
            pass it for a published dataset); the document has no ``url`` when None.

    Raises:
        ExportError: When no SPDX licence can be found or ``url`` is not an absolute http(s) URL.
    """
    from catalog.croissant import (SAMPLES_CSV, check_dataset_url, check_no_local_paths, select_dataset_row,
                                   spdx_licence)

    version, rows = passing_rows(catalog, as_of=as_of)
    datasets = catalog.read_table("datasets", as_of=version).to_pylist() if catalog.exists("datasets") else []
    recorded = select_dataset_row(datasets, rows)
    spdx = spdx_licence(recorded.get("licence") if recorded else None, override=licence)
    url = check_dataset_url(url)
    folder = prepare_destination(dest, overwrite=overwrite)
    for row in rows:
        case = case_name(row["sample_id"])
        row["image_path"] = f"data/images/{case}{FILE_ENDING}"
        row["label_path"] = f"data/labels/{case}{FILE_ENDING}"
        _place(catalog, row["image_uri"], folder / row["image_path"], link=link)
        _place(catalog, row["label_uri"], folder / row["label_path"], link=link)
    document = build_croissant(folder, rows, datasets=datasets, licence=spdx, url=url)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    local_paths = [catalog.root_uri, str(folder.resolve())]
    check_no_local_paths(text, local_paths, file="croissant.json")
    check_no_local_paths((folder / SAMPLES_CSV).read_text(encoding="utf-8"), local_paths, file=SAMPLES_CSV)
    (folder / "croissant.json").write_text(text, encoding="utf-8")
    logger.info("export_croissant: %d cases to %s", len(rows), folder)
    return ExportResult("croissant", folder, version, len(rows), {})


def export_dataset(catalog: Catalog, dest: str | Path, *, format: str, as_of: int | None = None,
                   dataset_id: int = 500, overwrite: bool = False, link: bool = False,
                   licence: str | None = None, url: str | None = None) -> ExportResult:
    """Export in ``format`` (one of ``EXPORT_FORMATS``); see the format-specific functions.

    ``licence`` and ``url`` apply to Croissant only; ``link`` to the formats that place the catalog's files
    unchanged (nnU-Net images, MSD, Croissant); DICOM writes new files.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"export expects format in {list(EXPORT_FORMATS)}, but got format={format!r}.")
    if format != "croissant" and (licence is not None or url is not None):
        given = "licence" if licence is not None else "url"
        raise ExportError(f"export expects {given} only with format='croissant', but got format={format!r}. "
                          "Other formats carry the catalog's licence text.")
    if format == "dicom" and link:
        raise ExportError("export expects link=False with format='dicom', but got link=True. DICOM objects are "
                          "new files: there is nothing to link.")
    if format == "nnunet":
        return export_nnunet(catalog, dest, as_of=as_of, dataset_id=dataset_id, overwrite=overwrite, link=link)
    if format == "msd":
        return export_msd(catalog, dest, as_of=as_of, overwrite=overwrite, link=link)
    if format == "croissant":
        return export_croissant(catalog, dest, as_of=as_of, overwrite=overwrite, licence=licence, url=url, link=link)
    from catalog.dicom import export_dicom  # highdicom and pydicom load only for this format

    return export_dicom(catalog, dest, as_of=as_of, overwrite=overwrite)


def _licence(catalog: Catalog, version: int) -> str:
    if catalog.exists("datasets"):
        rows = catalog.read_table("datasets", as_of=version).to_pylist()
        licences = [r["licence"] for r in rows if r.get("licence")]
        if licences:
            return licences[-1]
    return "unspecified (see the generator model's licence)"


def _provenance(catalog: Catalog, rows: list[dict[str, Any]], version: int) -> dict[str, Any]:
    """Return the generation provenance shared by every export (synthetic data, model, spec)."""
    def distinct(key: str) -> list[Any]:
        return sorted({r[key] for r in rows if r.get(key) is not None})

    seeds = distinct("seed")
    models = sorted({(r["model_name"], r["model_digest"]) for r in rows})
    return {  # no catalog location: an export is read elsewhere, and a local path says nothing there
        "synthetic": True, "generator": "ctfactory (NVIDIA MAISI)",
        "catalog_version": version, "dataset": distinct("dataset"), "dataset_version": distinct("dataset_version"),
        "spec_id": distinct("spec_id"), "models": [{"name": n, "digest": d} for n, d in models],
        "code_version": distinct("code_version"), "seed_range": [seeds[0], seeds[-1]] if seeds else None,
    }
