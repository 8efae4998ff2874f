"""Runtime helpers of the flows: task runners (threads or Dask), flow-run settings, progress listeners.

The machine facts (code version, CPU threads, devices) are plain and live in :mod:`factory.machine`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flows.lifetime import start_descendant_watch
from factory.machine import cuda_device_count, resolved_device
from factory.spec import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerChoice:
    """The task runner, whether generation tasks need the ``GPU`` Dask resource annotation, and its slots.

    ``slots`` is how many generation tasks run at once (None when unknown: an existing Dask cluster).
    """

    runner: Any
    gpu_resources: bool
    description: str
    slots: int | None = None


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

        return RunnerChoice(DaskTaskRunner(address=runtime.dask_address), False, f"dask {runtime.dask_address}", None)
    if runtime.dask_local_workers:
        from prefect_dask import DaskTaskRunner

        if device.startswith("cuda") and _has_dask_cuda():
            kwargs = {"resources": {"GPU": runtime.gpu_slots}, "threads_per_worker": runtime.gpu_slots}
            return RunnerChoice(DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs),
                                True, "dask LocalCUDACluster (one worker per GPU)", max(1, cuda_device_count()))
        kwargs = {"n_workers": runtime.dask_local_workers, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None, "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
        return RunnerChoice(DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), False,
                            f"dask LocalCluster ({runtime.dask_local_workers} workers)", runtime.dask_local_workers)
    slots = runtime.gpu_slots * max(1, cuda_device_count()) if device.startswith("cuda") else runtime.max_workers
    return RunnerChoice(ThreadPoolTaskRunner(max_workers=slots), False, f"threads ({slots})", slots)


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
