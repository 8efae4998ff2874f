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
    ``spread_gpus``: the workers all see every GPU (a plain LocalCluster on a CUDA machine), so each
    takes GPU ``worker number mod GPU count`` (:func:`worker_device`).
    """

    runner: Any
    gpu_resources: bool
    description: str
    slots: int | None = None
    spread_gpus: bool = False


def build_task_runner(runtime: Runtime) -> RunnerChoice:
    """Pick the task runner for a run.

    * ``dask_address``: an existing Dask scheduler (``prefect_dask.DaskTaskRunner(address=...)``); when its
      workers advertise ``GPU`` resources (``dask worker ... --resources GPU=1``), generation tasks ask for
      one each, so a worker runs as many cases at once as it has GPU slots (:func:`cluster_gpu_slots`).
    * ``dask_local_workers``: a temporary cluster of that many worker processes. On CUDA with dask_cuda, a
      ``dask_cuda.LocalCUDACluster`` (each worker pinned to its GPU through ``CUDA_VISIBLE_DEVICES``); on CUDA
      without it, a LocalCluster whose workers take GPUs in turn (:func:`worker_device`), so N workers on one
      GPU share it. Either way generation tasks need the ``GPU`` resource, ``gpu_slots`` per worker. On a
      CPU, single-threaded worker processes.
    * otherwise a ``ThreadPoolTaskRunner``: ``gpu_slots`` per GPU on CUDA, ``max_workers`` on CPU.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    device = resolved_device(runtime.device)
    if runtime.dask_address:
        from prefect_dask import DaskTaskRunner

        gpus = cluster_gpu_slots(runtime.dask_address)
        where = f"dask {runtime.dask_address}" + (f" ({gpus} GPU slots)" if gpus else "")
        return RunnerChoice(DaskTaskRunner(address=runtime.dask_address), bool(gpus), where, gpus or None)
    if runtime.dask_local_workers:
        from prefect_dask import DaskTaskRunner

        n = runtime.dask_local_workers
        gpu = {"resources": {"GPU": runtime.gpu_slots}, "threads_per_worker": runtime.gpu_slots, "n_workers": n}
        if device.startswith("cuda") and _has_dask_cuda() and n <= cuda_device_count():
            return RunnerChoice(DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=gpu),
                                True, f"dask LocalCUDACluster ({n} workers, one per GPU)", n * runtime.gpu_slots)
        kwargs = {"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
                  "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
        if device.startswith("cuda"):
            kwargs.update(gpu)
            return RunnerChoice(DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), True,
                                f"dask LocalCluster ({n} workers taking GPUs in turn)", n * runtime.gpu_slots,
                                spread_gpus=True)
        return RunnerChoice(DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), False,
                            f"dask LocalCluster ({n} workers)", n)
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


CLUSTER_TIMEOUT_S = 10.0


def cluster_gpu_slots(address: str, *, timeout_s: float = CLUSTER_TIMEOUT_S) -> int:
    """The ``GPU`` resources the workers of the Dask scheduler at ``address`` advertise, summed (0: none).

    Asked once before a run, so an unreachable scheduler fails the run at once with its address, not
    when the first case is submitted.

    Raises:
        DaskClusterError: no scheduler answered at ``address`` within ``timeout_s``.
    """
    from distributed import Client

    from flows.errors import DaskClusterError

    try:
        with Client(address, timeout=timeout_s, set_as_default=False) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except (OSError, TimeoutError) as exc:
        raise DaskClusterError(
            f"runtime.dask_address expects a reachable Dask scheduler, but got dask_address={address!r}: "
            f"{type(exc).__name__}: {exc}. Start one (dask scheduler; dask worker {address} --resources GPU=1) "
            "or check the address.") from None
    return int(sum(w.get("resources", {}).get("GPU", 0) for w in workers))


def worker_device(device: str, *, spread_gpus: bool) -> str:
    """The device a case task uses: ``cuda:<worker number mod GPUs>`` for an unindexed CUDA device on a
    cluster whose workers see every GPU (``spread_gpus``), else ``device`` as given.

    LocalCluster numbers its workers 0..N-1 (the worker's ``name``); on a worker without a number, or
    outside Dask, the device is left as given.
    """
    if not spread_gpus or device not in ("cuda", "auto"):
        return device
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return device
    count = cuda_device_count()
    if not count:
        return device
    return f"cuda:{index % count}"


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
