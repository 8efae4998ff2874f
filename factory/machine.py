"""Facts about the machine a run uses: the code version, torch CPU threads, CUDA devices (no Prefect)."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from factory.spec import Runtime


@lru_cache(maxsize=1)
def current_code_version() -> str:
    """Return ``<ctfactory version>`` plus ``+git.<describe>`` when the source is a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("ctfactory")
    except PackageNotFoundError:
        base = "0+unknown"
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=repo, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return base
    describe = out.stdout.strip() if out.returncode == 0 else ""
    return f"{base}+git.{describe}" if describe else base


MAX_AUTO_THREADS = 8  # past this, one case on CPU gains little (and big boxes run several workers)


def resolved_threads(runtime: Runtime, cpu_count: int | None = None) -> int:
    """The torch CPU threads a case worker uses: ``runtime.threads``, else an automatic choice.

    Automatic: the cores divided among the cases that run at once in one process (``max_workers``
    threads; a Dask worker runs one), at least 1 and at most :data:`MAX_AUTO_THREADS`, so concurrent
    cases never oversubscribe the box. Measured on the 2-core box (``benchmarks/bench_demo.py``, cold
    demo runs): 2 threads 69.8 s median (generate 40.0 s) against 77.5 s (51.9 s) with 1 thread, so the
    orchestration's own CPU (the ephemeral server, commits, gzip) is not worth a reserved core there.
    A box already busy with other work is better served by ``--threads 1``.
    """
    if runtime.threads is not None:
        return int(runtime.threads)
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    concurrent = 1 if (runtime.dask_address or runtime.dask_local_workers) else max(1, runtime.max_workers)
    return max(1, min(MAX_AUTO_THREADS, cores // concurrent))


def set_cpu_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads for this process (a no-op when already so)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


def cuda_device_count() -> int:
    """Number of visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolved_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    return "cuda" if cuda_device_count() else "cpu"
