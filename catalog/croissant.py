"""Croissant 1.0 JSON-LD for an exported dataset: FileObjects with sha256, a samples RecordSet,
and the Responsible-AI fields that say the data is synthetic and how it was generated."""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path
from typing import Any

import fsspec

from catalog.fs import sha256_and_size

CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "prov": "http://www.w3.org/ns/prov#", "ctfactory": "https://ctfactory.invalid/ns#", "dct": "http://purl.org/dc/terms/",
    "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo", "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract", "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet", "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
    "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated",
    "replace": "cr:replace", "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField",
    "transform": "cr:transform", "samplingRate": "cr:samplingRate", "equivalentProperty": "cr:equivalentProperty",
}
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
SAMPLES_CSV = "samples.csv"
NIFTI_GZ_FORMAT = "application/gzip"
_LOCAL = fsspec.filesystem("file")

# samples.csv columns and their Croissant data types.
CSV_FIELDS: dict[str, str] = {
    "sample_id": "sc:Text", "image_path": "sc:Text", "label_path": "sc:Text", "image_sha256": "sc:Text",
    "label_sha256": "sc:Text", "dataset": "sc:Text", "dataset_version": "sc:Text", "cohort": "sc:Text",
    "case_index": "sc:Integer", "seed": "sc:Integer", "spec_id": "sc:Text", "model_name": "sc:Text",
    "model_digest": "sc:Text", "code_version": "sc:Text", "body_region": "sc:Text", "pathology": "sc:Text",
    "tumor_label": "sc:Integer", "tumor_size_mm": "sc:Float", "mask_source": "sc:Text",
}


def _file_object(folder: Path, relative: str, encoding: str) -> dict[str, Any]:
    sha256, size = sha256_and_size(_LOCAL, str(folder / relative))
    return {"@type": "cr:FileObject", "@id": relative, "name": relative, "contentUrl": relative,
            "encodingFormat": encoding, "contentSize": f"{size} B", "sha256": sha256}


def write_samples_csv(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``samples.csv`` (one line per exported case, columns ``CSV_FIELDS``) into ``folder``."""
    path = folder / SAMPLES_CSV
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})
    return path


def _field(name: str, data_type: str, description: str | None = None) -> dict[str, Any]:
    field = {"@type": "cr:Field", "@id": f"samples/{name}", "name": name, "dataType": data_type,
             "source": {"fileObject": {"@id": SAMPLES_CSV}, "extract": {"column": name}}}
    if description:
        field["description"] = description
    return field


def build_croissant(folder: Path, rows: list[dict[str, Any]], *, provenance: dict[str, Any],
                    licence: str) -> dict[str, Any]:
    """Return the Croissant JSON-LD document for an export in ``folder`` (writes ``samples.csv``).

    Args:
        folder: The export folder holding ``data/images``, ``data/labels``.
        rows: The exported rows, each with ``image_path`` and ``label_path`` relative to ``folder``.
        provenance: Generation provenance (model, digest, spec_id, code version, seed range).
        licence: The licence text or URL.
    """
    write_samples_csv(folder, rows)
    distribution = [_file_object(folder, SAMPLES_CSV, "text/csv")]
    for row in rows:
        distribution.append(_file_object(folder, row["image_path"], NIFTI_GZ_FORMAT))
        distribution.append(_file_object(folder, row["label_path"], NIFTI_GZ_FORMAT))
    fields = [_field(name, dtype) for name, dtype in CSV_FIELDS.items()]
    generated_by = {
        "@type": "prov:Activity", "name": "ctfactory synthetic CT generation",
        "prov:used": [{"name": m, "sha256": d} for m, d in zip(provenance["model_name"], provenance["model_digest"])]
        or [{"name": m} for m in provenance["model_name"]],
        "spec_id": provenance["spec_id"], "code_version": provenance["code_version"],
        "seed_range": provenance["seed_range"],
    }
    name = str((provenance["dataset"] or ["synthetic-ct"])[0])
    return {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO,
        "name": name, "description": f"Synthetic 3D CT volumes with label maps generated by "
                                     f"{', '.join(provenance['model_name'])} through ctfactory (NVIDIA MAISI).",
        "license": licence, "url": "https://github.com/NVIDIA-Medtech/NV-Generate-CTMR",
        "version": str((provenance["dataset_version"] or ["1"])[0]),
        "datePublished": date.today().isoformat(),
        "citeAs": f"{name}, version {(provenance['dataset_version'] or ['1'])[0]}, spec_id "
                  f"{', '.join(map(str, provenance['spec_id']))}: synthetic CT generated with ctfactory (NVIDIA MAISI).",
        "rai:dataCollectionType": ["Synthetic"], "rai:hasSyntheticData": True,
        "rai:dataCollection": "Generated by a latent diffusion model (MAISI) conditioned on label maps; "
                              "no patient data is contained in the volumes.",
        "prov:wasGeneratedBy": generated_by,
        "ctfactory:generator": {"model_name": provenance["model_name"], "model_digest": provenance["model_digest"],
                                "spec_id": provenance["spec_id"], "code_version": provenance["code_version"],
                                "catalog_version": provenance["catalog_version"]},
        "distribution": distribution,
        "recordSet": [{"@type": "cr:RecordSet", "@id": "samples", "name": "samples",
                       "description": "One record per synthetic case (image, label and generation provenance).",
                       "key": {"@id": "samples/sample_id"}, "field": fields}],
    }
