"""Runtime helpers of the flows: task runners (threads or Dask), code version, progress listeners."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from flows.lifetime import start_descendant_watch
from flows.spec import Runtime

logger = logging.getLogger(__name__)


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
    import os

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


@dataclass(frozen=True)
class RunnerChoice:
    """The task runner and whether generation tasks need the ``GPU`` Dask resource annotation."""

    runner: Any
    gpu_resources: bool
    description: str


def build_task_runner(runtime: Runtime) -> RunnerChoice:
    """Pick the task runner for a run.

    * ``dask_address``: an existing Dask scheduler (``prefect_dask.DaskTaskRunner(address=...)``).
    * ``dask_local_workers``: a temporary LocalCluster of that many single-threaded worker processes, or a
      ``dask_cuda.LocalCUDACluster`` (one worker per GPU, ``GPU=1`` resource) when CUDA and dask_cuda exist.
    * otherwise a ``ThreadPoolTaskRunner``: ``gpu_slots`` per GPU on CUDA, ``max_workers`` on CPU.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    device = resolved_device(runtime.device)
    if runtime.dask_address:
        from prefect_dask import DaskTaskRunner

        return RunnerChoice(DaskTaskRunner(address=runtime.dask_address), False, f"dask {runtime.dask_address}")
    if runtime.dask_local_workers:
        from prefect_dask import DaskTaskRunner

        if device.startswith("cuda") and _has_dask_cuda():
            kwargs = {"resources": {"GPU": runtime.gpu_slots}, "threads_per_worker": runtime.gpu_slots}
            return RunnerChoice(DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs),
                                True, "dask LocalCUDACluster (one worker per GPU)")
        kwargs = {"n_workers": runtime.dask_local_workers, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None, "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
        return RunnerChoice(DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), False,
                            f"dask LocalCluster ({runtime.dask_local_workers} workers)")
    slots = runtime.gpu_slots * max(1, cuda_device_count()) if device.startswith("cuda") else runtime.max_workers
    return RunnerChoice(ThreadPoolTaskRunner(max_workers=slots), False, f"threads ({slots})")


@contextmanager
def flow_run_settings() -> Iterator[None]:
    """Prefect settings for a flow run started here; with an ephemeral API, its server dies with this process.

    With ``PREFECT_API_URL`` unset the API is an ephemeral server that Prefect starts as a child
    process and stops only from ``atexit``. :func:`flows.lifetime.start_descendant_watch` (once per
    process) makes sure it, and any other child process, is stopped when this process dies, SIGKILL
    included. With ``PREFECT_API_URL`` set the server is not ours and nothing is watched.

    Prefect's sync flow engine joins its heartbeat thread, which sleeps in 1 s steps, when a run ends:
    about 0.7 s added to every run (measured on 2 cores). The heartbeat events let a long-lived server
    mark runs whose process died as crashed. An ephemeral server lives and dies with this process, so
    nothing can act on them, and they are switched off there. With ``PREFECT_API_URL`` set (a shared
    server, its UI, ``ctfactory serve``) they stay on.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    start_descendant_watch()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _has_dask_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("dask_cuda") is not None


# -- progress ---------------------------------------------------------------------------------------

ProgressListener = Callable[[str, dict[str, Any]], None]
_listeners: list[ProgressListener] = []
_listeners_lock = threading.Lock()


@contextmanager
def progress_listener(fn: ProgressListener) -> Iterator[None]:
    """Call ``fn(event, data)`` for the flow's progress events while the block runs (same process).

    Events: ``planned`` (total, skipped, todo), ``case`` (sample_id, status), ``committed`` (version, rows).
    """
    with _listeners_lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(fn)


def notify(event: str, **data: Any) -> None:
    """Send a progress event to the listeners."""
    with _listeners_lock:
        listeners = list(_listeners)
    for fn in listeners:
        fn(event, data)
