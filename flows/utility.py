"""The ``downstream-utility`` flow: plan the arms → train each arm as a task → summarise → datasets row → card.

Each training arm is one task (:func:`factory.utility.run_arm`), submitted to the task runner that
:func:`flows.runtime.build_task_runner` picks (threads, or Dask workers with the ``GPU`` resource), so the
arms train in parallel like generation cases. A task gets ids and paths and loads its own cases; it returns
small score tables, never arrays or models. A crashed arm does not stop the others; the flow then raises
:class:`factory.utility.ArmsCrashedError`, and a re-run resumes every arm from the checkpoint in its work
folder (finished arms only predict and score again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from catalog.root import DatasetRoot
from factory import dataset
from factory import utility as fu
from factory.spec import Runtime
from flows.runtime import build_task_runner, flow_run_settings
from flows.secrets import (export_secrets, refuse_secret_options, resolve_storage_options,
                           split_storage_options)


def _with_credentials(root: DatasetRoot) -> DatasetRoot:
    return root.with_storage_options(resolve_storage_options(root.storage_options))


@task(name="plan-utility", cache_policy=NO_CACHE, persist_result=False)
def plan_utility(request: fu.UtilityRequest, *, root: DatasetRoot) -> fu.UtilityPlan:
    """:func:`factory.utility.plan_utility` as a task."""
    return fu.plan_utility(_with_credentials(root), request)


@task(name="train-arm", cache_policy=NO_CACHE, persist_result=False)
def train_arm(arm: Any, *, request: fu.UtilityRequest, plan: fu.UtilityPlan, root: DatasetRoot) -> fu.ArmResult:
    """:func:`factory.utility.run_arm` as a task: train or resume one arm, then score it."""
    return fu.run_arm(_with_credentials(root), request, plan, arm)


@task(name="record-utility", cache_policy=NO_CACHE, persist_result=False)
def record_utility(plan: fu.UtilityPlan, summary: Any, ood: Any, *, config: Any, root: DatasetRoot) -> int | None:
    """:func:`factory.utility.record_utility` as a task."""
    return fu.record_utility(_with_credentials(root), plan, config, summary, ood)


@task(name="publish-card", cache_policy=NO_CACHE, persist_result=False)
def publish_card(root: DatasetRoot) -> str:
    """:func:`factory.dataset.write_card` as a task."""
    return dataset.write_card(_with_credentials(root))


def _submit_arms(plan: fu.UtilityPlan, request: fu.UtilityRequest, root: DatasetRoot,
                 gpu_resources: bool) -> dict[PrefectFuture, str]:
    annotate = contextlib.nullcontext()
    if gpu_resources:
        import dask

        annotate = dask.annotate(resources={"GPU": 1})
    with annotate:
        return {train_arm.submit(arm, request=request, plan=plan, root=root): arm.name for arm in plan.arms}


def _collect(futures: Mapping[PrefectFuture, str]) -> tuple[list[fu.ArmResult], list[str]]:
    logger = get_run_logger()
    results, crashed = [], []
    for future in as_completed(list(futures)):
        try:
            results.append(future.result())
            logger.info("arm %s finished", futures[future])
        except Exception as exc:  # one crashed arm does not stop the others; a re-run resumes it
            crashed.append(f"{futures[future]}: {type(exc).__name__}: {exc}")
    order = {name: i for i, name in enumerate(futures.values())}
    return sorted(results, key=lambda r: order[r.arm]), crashed


@flow(name="downstream-utility", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def downstream_utility(request: fu.UtilityRequest, root: str, storage_options: dict[str, str] | None = None,
                       gpu_resources: bool = False, publish: bool = True) -> dict[str, Any]:
    """Train the arms of ``request`` on ``root``'s synthetic cases, record the results and return them.

    Returns:
        ``plan``, ``summary`` and ``ood`` (``UtilitySummary`` or None), ``datasets_version`` (None when the
        same results were already recorded), ``card_uri`` and ``timings_s``.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    refuse_secret_options(storage_options, who="downstream_utility")
    dataset_root = DatasetRoot.of(root, storage_options)
    config = request.utility_config()
    plan = plan_utility(request, root=dataset_root)
    logger.info("utility %s: %d arms, %d real training / %d test cases, structures %s", plan.key, len(plan.arms),
                len(plan.train_ids), len(plan.test_ids), list(plan.structures))
    results, crashed = _collect(_submit_arms(plan, request, dataset_root, gpu_resources))
    if crashed:
        raise fu.ArmsCrashedError(crashed)
    t_train = time.perf_counter()
    summary, ood = fu.summarise_results(results, config)
    version = record_utility(plan, summary, ood, config=config, root=dataset_root)
    card = publish_card(dataset_root) if publish and version is not None else None
    return {"plan": plan, "summary": summary, "ood": ood, "datasets_version": version, "card_uri": card,
            "timings_s": {"train": t_train - t0, "wall": time.perf_counter() - t0}}


def run_utility(request: fu.UtilityRequest, root: str, *, storage_options: Mapping[str, str] | None = None,
                workers: int = 1, dask_local_workers: int | None = None, dask_address: str | None = None,
                publish: bool = True) -> dict[str, Any]:
    """Run :func:`downstream_utility` on threads (``workers``) or Dask workers; credentials stay out of parameters."""
    public, secret = split_storage_options(storage_options)
    export_secrets(secret)
    device = str(request.utility_config().device)
    runtime = Runtime(device=device if device.startswith("cuda") else "cpu", max_workers=workers,
                      dask_local_workers=dask_local_workers, dask_address=dask_address)
    choice = build_task_runner(runtime)
    configured = downstream_utility.with_options(task_runner=choice.runner)
    with flow_run_settings():
        return configured(request, root, storage_options=dict(public or {}) or None,
                          gpu_resources=choice.gpu_resources, publish=publish)
