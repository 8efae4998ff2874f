"""The catalog's named choices (output and export formats, QC verdicts), importable without the heavy modules.

``ctfactory``'s argument parser needs them for every command, so they live apart from
:mod:`catalog.query` / :mod:`catalog.engine` (DuckDB) and :mod:`catalog.export` (nibabel, NumPy); query and
export re-export them.
"""

from __future__ import annotations

QC_CHOICES: tuple[str, ...] = ("pass", "fail")
OUTPUT_FORMATS: tuple[str, ...] = ("table", "json", "csv", "parquet")
EXPORT_FORMATS: tuple[str, ...] = ("nnunet", "msd", "croissant", "dicom")
