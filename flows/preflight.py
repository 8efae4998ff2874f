"""Checks a run makes before its first case, so a bad input is one line (exit 2), not a crash per case.

What every case would need is checked once: the output root can hold files, the user mask files the
cases will read have a usable header (a 3D volume of bounded size with a finite, invertible affine),
and a mask folder exists. The model is checked by loading it (:func:`flows.models.load_pipeline`
caches it, so the run's cases reuse it). Problems deeper in a file (a gzip stream truncated halfway)
only show when the file is read in full; the case that reads it is then recorded as failed with the
reason (see :func:`flows.case.run_case`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flows.errors import OutputPathError
from flows.spec import DatasetSpec

_NIFTI = (".nii", ".nii.gz")


def check_output_root(root: str, storage_options: Mapping[str, str] | None = None) -> None:
    """A local output root must be a folder, or absent under a writable folder.

    Raises:
        OutputPathError: the root is a file, lies under a file, or cannot be written.
    """
    if "://" in root and not root.startswith("file://"):
        return  # remote stores are checked by their first write, which names the bucket and the cause
    path = Path(root.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"run expects the output root to be a folder, but got output_root={root!r}, which is "
                              "a file. Pass --out DIR or change output_root.")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"run expects the output root to lie under folders, but got output_root={root!r} "
                              f"under the file {str(probe)!r}. Pass --out DIR or change output_root.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"run expects a writable output root, but got output_root={root!r} where "
                              f"{str(probe)!r} is not writable. Pass --out DIR or fix its permissions.")


def user_mask_files(path: str, count: int, *, who: str = "mask_source") -> list[str]:
    """The files the first ``count`` cases of a ``user`` mask source read (case ``i`` reads file ``i mod n``)."""
    from maisi_core.errors import MaskSourceError

    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_symlink() and not p.exists():
        raise MaskSourceError(f"{who} expects a NIfTI file or folder, but got path={path!r}, a symbolic link "
                              "that does not resolve (a loop or a missing target). Point mask_source.path at the file.")
    if not p.exists():
        raise MaskSourceError(f"{who} expects an existing NIfTI file or folder, but got path={path!r}, which "
                              "does not exist. Fix mask_source.path (relative paths are read from the current folder).")
    if not p.is_dir():
        raise MaskSourceError(f"{who} expects a NIfTI file or a folder, but got path={path!r}, which is neither.")
    files = sorted(str(f) for f in p.iterdir() if f.name.endswith(_NIFTI))
    if not files:
        raise MaskSourceError(f"{who} expects a folder holding .nii or .nii.gz label maps, but got "
                              f"path={path!r} with none.")
    return files[:count]


def check_mask_sources(spec: DatasetSpec) -> None:
    """Every cohort's mask source exists, and every user mask file it reads has a usable header.

    Raises:
        MaskSourceError: a mask path is missing or holds no label maps.
        VolumeFileError, VolumeNotFoundError, AffineError: a mask file's header is unusable.
    """
    from maisi_core.errors import MaskSourceError
    from maisi_core.io import check_nifti_header

    for cohort in spec.cohorts:
        source = cohort.mask_source
        if source.type == "user":
            who = f"Cohort[{cohort.name}] mask_source"
            for file in user_mask_files(source.path, cohort.count, who=who):
                check_nifti_header(file, who=who)
        elif source.type == "folder" and not Path(source.path).is_dir():
            raise MaskSourceError(f"Cohort[{cohort.name}] mask_source expects an existing folder of label maps, but "
                                  f"got path={source.path!r}, which is not a folder.")


def check_model(spec: DatasetSpec) -> None:
    """Load the spec's model as the run will (cached for the run's cases): weights, digests, configs.

    Raises:
        ModelRefError, WeightsError, CheckpointError, ...: the model cannot be loaded.
    """
    from flows.models import load_pipeline

    rt = spec.runtime
    if rt.generator != "maisi":
        return  # other registered generators load their own models in the case task
    load_pipeline(spec.model.ref, rt.device, decode_preset=rt.decode_preset, precision=rt.precision)


def preflight(spec: DatasetSpec, *, output_root: str, storage_options: Mapping[str, str] | None = None,
              load_model: bool = True) -> None:
    """Run every check above; the first problem raises a one-line error naming the file and the cause."""
    check_output_root(output_root, storage_options)
    check_mask_sources(spec)
    if load_model:
        check_model(spec)
