"""Checks a run makes before its first case, so a bad input is one line (exit 2), not a crash per case.

What every case would need is checked once: the output root can hold files, the user mask files the
cases will read have a usable header (a 3D volume of bounded size with a finite, invertible affine),
and a mask folder exists. The model is checked by loading it (:func:`factory.models.load_pipeline`
caches it, so the run's cases reuse it). Problems deeper in a file (a gzip stream truncated halfway)
only show when the file is read in full; the case that reads it is then recorded as failed with the
reason (see :func:`factory.case.run_case`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from factory.errors import OutputPathError, SpecError
from factory.plan import DatasetPlan
from factory.spec import DatasetSpec

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


_RELATIVE_HINT = "Relative paths in a spec are read from the spec file's folder."


def user_mask_files(path: str, count: int, *, who: str = "mask_source") -> list[str]:
    """The files the first ``count`` cases of a ``user`` mask source read (case ``i`` reads file ``i mod n``)."""
    return user_mask_candidates(path, who=who)[:count]


def user_mask_candidates(path: str, *, who: str = "mask_source") -> list[str]:
    """Every file a ``user`` mask source may read: the file itself, or a folder's NIfTI files in name order.

    Raises:
        MaskSourceError: the path is missing, a broken link, or a folder without NIfTI files.
    """
    from maisi_core.errors import MaskSourceError

    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_symlink() and not p.exists():
        raise MaskSourceError(f"{who} expects a NIfTI file or folder, but got path={path!r}, a symbolic link "
                              "that does not resolve (a loop or a missing target). Point mask_source.path at the file.")
    if not p.exists():
        raise MaskSourceError(f"{who} expects an existing NIfTI file or folder, but got path={path!r}, which "
                              f"does not exist. Fix mask_source.path. {_RELATIVE_HINT}")
    if not p.is_dir():
        raise MaskSourceError(f"{who} expects a NIfTI file or a folder, but got path={path!r}, which is neither.")
    files = sorted(str(f) for f in p.iterdir() if f.name.endswith(_NIFTI))
    if not files:
        raise MaskSourceError(f"{who} expects a folder holding .nii or .nii.gz label maps, but got "
                              f"path={path!r} with none.")
    return files


def check_mask_sources(spec: DatasetSpec) -> None:
    """Every cohort's mask source exists, and every user mask file it reads has a usable header.

    Raises:
        MaskSourceError: a mask path or mask-generator checkpoint is missing, or a folder holds no label maps.
        VolumeFileError, VolumeNotFoundError, AffineError: a mask file's header is unusable.
    """
    from maisi_core.errors import MaskSourceError
    from maisi_core.io import check_nifti_header

    for i, cohort in enumerate(spec.cohorts):
        source = cohort.mask_source
        who = f"cohorts[{i}].mask_source ({cohort.name})"
        if source.type == "user":
            for file in user_mask_files(spec.resolve_path(source.path), cohort.count, who=who):
                check_nifti_header(file, who=who)
        elif source.type == "folder" and not Path(spec.resolve_path(source.path)).is_dir():
            raise MaskSourceError(f"{who} expects an existing folder of label maps, but got "
                                  f"path={spec.resolve_path(source.path)!r}, which is not a folder. "
                                  f"{_RELATIVE_HINT}")
        else:
            for key in ("autoencoder_path", "diffusion_path"):
                given = getattr(source, key, None)
                if given and not Path(spec.resolve_path(given)).is_file():
                    raise MaskSourceError(f"{who} expects {key} to be an existing checkpoint file, but got "
                                          f"{key}={spec.resolve_path(given)!r}, which is not a file. "
                                          f"{_RELATIVE_HINT}")


def cases_at_once(spec: DatasetSpec, device: str) -> int:
    """How many cases run at once on this machine: GPU slots, local Dask workers or CPU workers."""
    rt = spec.runtime
    if device.startswith("cuda"):
        return rt.gpu_slots
    return rt.dask_local_workers or rt.max_workers


def check_memory(spec: DatasetSpec, plan: DatasetPlan, *, device: str, memory_bytes: int) -> None:
    """Refuse cohorts whose cases, run as many at once as the runtime allows, exceed this machine's memory.

    ``device`` is ``cpu`` or ``cuda[:N]`` (resolved); ``memory_bytes`` is the RAM or the GPU's memory.
    CPU estimates are measured on whole-volume models (``factory.plan.CPU_BYTES_PER_VOXEL``); the GPU
    estimate is the decode class of the size (see ``factory.plan.estimate_gpu_memory_gb``). A spec run
    on a remote Dask cluster is not checked here: its cases run on the cluster's machines.

    Raises:
        SpecError: one line per cohort that does not fit, with the estimate and the limit.
    """
    if spec.runtime.dask_address:
        return
    gpu = device.startswith("cuda")
    at_once = cases_at_once(spec, device)
    limit_gb = memory_bytes / 1024**3
    issues = []
    for i, c in enumerate(plan.cohorts):
        per_case = c.est_gpu_memory_gb if gpu else c.est_cpu_memory_gb
        if per_case is None or per_case * min(at_once, c.count) <= limit_gb:
            continue
        n = min(at_once, c.count)
        kind = f"GPU ({device})" if gpu else "CPU"
        hint = ("Use a smaller output_size, fewer runtime.gpu_slots or a larger GPU." if gpu else
                "Use a smaller output_size, fewer runtime.max_workers, or a GPU (runtime.device).")
        issues.append(spec.source.issue(("cohorts", i, "output_size"), (
            f"cohorts[{i}] expects cases that fit this machine's {kind} memory of {limit_gb:.1f} GB, but got "
            f"output_size={list(c.output_size)} needing about {per_case:.1f} GB per case x {n} at once = "
            f"{per_case * n:.1f} GB. {hint}")))
    if issues:
        raise SpecError(issues)


def machine_memory_bytes(device: str) -> int:
    """Total memory of the resolved device on this machine: RAM for ``cpu``, the GPU's for ``cuda[:N]``."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def cuda_driver_visible() -> bool:
    """Whether an NVIDIA GPU looks present, without importing torch (for the light ``check-spec``)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_model(spec: DatasetSpec) -> None:
    """Load the spec's model as the run will (cached for the run's cases): weights, digests, configs.

    Raises:
        ModelRefError, WeightsError, CheckpointError, ...: the model cannot be loaded.
    """
    from factory.models import load_pipeline

    rt = spec.runtime
    if rt.generator != "maisi":
        return  # other registered generators load their own models in the case task
    load_pipeline(spec.model_location, rt.device, decode_preset=rt.decode_preset, precision=rt.precision)


def check_machine(spec: DatasetSpec, plan: DatasetPlan, *, load_model: bool = True) -> None:
    """The checks that need this machine: its memory against the plan, then the model, loaded as the run will."""
    from factory.machine import resolved_device

    device = resolved_device(spec.runtime.device)
    check_memory(spec, plan, device=device, memory_bytes=machine_memory_bytes(device))
    if load_model:
        check_model(spec)


def preflight(spec: DatasetSpec, *, output_root: str, storage_options: Mapping[str, str] | None = None,
              load_model: bool = True, plan: DatasetPlan | None = None) -> None:
    """Run every check above; the first problem raises a one-line error naming the file and the cause.

    The machine checks (:func:`check_machine`) run when ``plan`` is given; ``load_model`` alone loads the model.
    """
    check_output_root(output_root, storage_options)
    check_mask_sources(spec)
    if plan is not None:
        check_machine(spec, plan, load_model=load_model)
    elif load_model:
        check_model(spec)
