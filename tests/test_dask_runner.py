"""Scale-out through Dask (issue 16, item 3): which cluster a runtime asks for, and which GPU a worker takes."""

from __future__ import annotations

import types

import pytest

import flows.runtime as runtime_module
from factory.spec import Runtime
from flows.runtime import build_task_runner, worker_device


def _machine(monkeypatch, *, gpus: int, dask_cuda: bool) -> None:
    monkeypatch.setattr(runtime_module, "resolved_device", lambda device: "cuda" if gpus else "cpu")
    monkeypatch.setattr(runtime_module, "cuda_device_count", lambda: gpus)
    monkeypatch.setattr(runtime_module, "_has_dask_cuda", lambda: dask_cuda)


def test_dask_local_on_a_cpu_is_a_local_cluster_of_single_threaded_processes(monkeypatch):
    _machine(monkeypatch, gpus=0, dask_cuda=False)
    choice = build_task_runner(Runtime(dask_local_workers=3))
    kwargs = choice.runner.cluster_kwargs
    assert choice.runner.cluster_class.endswith("LocalCluster") and "CUDA" not in choice.runner.cluster_class
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (3, 1, True)
    assert (choice.gpu_resources, choice.slots, choice.spread_gpus) == (False, 3, False)


def test_dask_local_on_gpus_with_dask_cuda_asks_for_n_workers(monkeypatch):
    import sys

    fake = types.ModuleType("dask_cuda")  # dask-cuda needs CUDA to install; the runner only names its class here
    fake.LocalCUDACluster = type("LocalCUDACluster", (), {})
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    _machine(monkeypatch, gpus=4, dask_cuda=True)
    choice = build_task_runner(Runtime(dask_local_workers=2, gpu_slots=2))
    assert choice.runner.cluster_class in ("dask_cuda.LocalCUDACluster", fake.LocalCUDACluster)
    assert choice.runner.cluster_kwargs == {"resources": {"GPU": 2}, "threads_per_worker": 2, "n_workers": 2}
    assert (choice.gpu_resources, choice.slots, choice.spread_gpus) == (True, 4, False)


@pytest.mark.parametrize(("gpus", "dask_cuda"), [(1, False), (1, True), (2, False)])
def test_dask_local_workers_share_gpus_in_turn_without_dask_cuda_or_with_more_workers_than_gpus(
        monkeypatch, gpus, dask_cuda):
    _machine(monkeypatch, gpus=gpus, dask_cuda=dask_cuda)
    choice = build_task_runner(Runtime(dask_local_workers=2))
    kwargs = choice.runner.cluster_kwargs
    assert choice.runner.cluster_class == "distributed.LocalCluster" and kwargs["resources"] == {"GPU": 1}
    assert (kwargs["n_workers"], choice.gpu_resources, choice.spread_gpus, choice.slots) == (2, True, True, 2)


def test_worker_device_takes_gpus_in_turn_only_when_asked(monkeypatch):
    import distributed

    monkeypatch.setattr(runtime_module, "cuda_device_count", lambda: 2)
    assert worker_device("cuda", spread_gpus=True) == "cuda"  # not on a Dask worker: as given
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name=3))
    assert worker_device("cuda", spread_gpus=True) == "cuda:1"
    assert worker_device("auto", spread_gpus=True) == "cuda:1"
    assert worker_device("cuda:0", spread_gpus=True) == "cuda:0"  # an indexed device is the user's choice
    assert worker_device("cuda", spread_gpus=False) == "cuda"  # dask-cuda pins each worker itself
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name="tcp-worker-a"))
    assert worker_device("cuda", spread_gpus=True) == "cuda"  # a worker without a number keeps the device


def test_an_existing_cluster_without_gpu_resources_runs_tasks_unannotated():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        choice = build_task_runner(Runtime(dask_address=cluster.scheduler_address))
    assert (choice.gpu_resources, choice.slots, choice.spread_gpus) == (False, None, False)


@pytest.fixture()
def gpu_cluster():
    """An existing Dask cluster (in this process) whose two workers advertise one GPU each."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        yield cluster


def test_an_existing_cluster_with_gpu_resources_gets_annotated_tasks(gpu_cluster):
    choice = build_task_runner(Runtime(dask_address=gpu_cluster.scheduler_address))
    assert (choice.gpu_resources, choice.slots, choice.spread_gpus) == (True, 2, False)
    assert choice.description.endswith("(2 GPU slots)")


def test_an_unreachable_scheduler_fails_at_once_with_its_address():
    from flows.errors import DaskClusterError
    from flows.runtime import cluster_gpu_slots

    with pytest.raises(DaskClusterError, match=r"^runtime\.dask_address expects a reachable Dask scheduler, but got "
                                               r"dask_address='tcp://127\.0\.0\.1:9'"):
        cluster_gpu_slots("tcp://127.0.0.1:9", timeout_s=1)


def test_a_run_on_an_existing_gpu_cluster_completes(prefect_backend, gpu_cluster, tmp_path):
    """Tasks that ask for a GPU run on the cluster's GPU workers (an annotation no worker could meet would hang)."""
    from _specs import tiny_spec
    from catalog.store import open_catalog
    from flows.generate import run_generate

    spec = tiny_spec(tmp_path / "ds", name="on-cluster", seed=31, count=3,
                     runtime=f"{{generator: 'sleep:0', dask_address: '{gpu_cluster.scheduler_address}'}}")
    assert run_generate(spec)["generated"] == 3
    assert open_catalog(tmp_path / "ds").read_table().num_rows == 3
