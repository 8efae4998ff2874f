"""The ``generate-dataset`` flow: plan → skip committed → fan out cases → commit in batches → dataset row.

The flow body reads like the architecture picture; each task is one call into the application layer
(:mod:`factory.case`, :mod:`factory.dataset`) with a :class:`catalog.root.DatasetRoot`. Cases go to the
task runner chosen by :func:`flows.runtime.build_task_runner` (threads, or Dask workers); a case task
gets a few :class:`CaseRequest` of one cohort (``runtime.generation_batch``, :func:`factory.plan.batch_cases`),
denoises them together and returns their :class:`SampleRecord`, never arrays. With
``runtime.concurrency_limit`` each case task holds a slot of that Prefect global concurrency limit, which
caps the cases on the GPUs across runs. Records are committed to
the catalog every ``runtime.batch_size`` results, so a crash loses at most the batch in flight; a
re-run skips every committed case (passed or failed) and regenerates the rest with the same seeds; a
re-run that commits nothing reuses the metrics of the dataset row already recorded for that catalog
version instead of validating again. The dataset row's ``timings_s`` say where the flow's time went
(``plan``, ``generate``: fan-out and commits, ``validate``: dataset metrics, ``wall``: their sum).

The flow's parameters hold only public storage options; each task adds this process's credentials
(:mod:`flows.secrets`) to the root it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from catalog.schema import SampleRecord
from catalog.root import DatasetRoot
from factory import dataset
from factory.case import get_generator, run_cases
from factory.errors import CaseInputError, CasesCrashedError, FactoryError
from flows.errors import ConcurrencyLimitError
from factory.plan import CaseRequest, batch_cases, cases_per_task, plan_dataset
from factory.preflight import preflight
from factory.machine import current_code_version, resolved_device, resolved_threads, set_cpu_threads
from factory.models import pipeline_config, take_load_seconds
from maisi_core.engine.geometry import latent_shape
from maisi_core.errors import MaisiError
from flows.runtime import build_task_runner, flow_run_settings, notify, worker_device
from flows.secrets import export_secrets, refuse_secret_options, resolve_storage_options, split_storage_options
from factory.spec import DatasetSpec, validate_spec



def _with_credentials(root: DatasetRoot) -> DatasetRoot:
    """``root`` with the credentials of this process (environment, secret block) added to its public options."""
    return root.with_storage_options(resolve_storage_options(root.storage_options))


@task(name="generate-cases", cache_policy=NO_CACHE, persist_result=False)
def generate_cases(requests: list[CaseRequest], *, root: DatasetRoot, generator: str, device: str,
                   decode_preset: str | None, code_version: str, precision: str = "auto", threads: int | None = None,
                   generation_batch: int | str = 1, concurrency_limit: str | None = None,
                   spread_gpus: bool = False) -> list[SampleRecord | CaseInputError]:
    """Generate, check and write a few cases of one cohort, denoising them together (:func:`factory.case.run_cases`).

    The model is loaded once per worker process; the first case of the task that loaded it records the
    seconds as ``timings_s["model_load"]``. With ``concurrency_limit`` the cases run while holding one
    slot of that Prefect global concurrency limit (a GPU slot shared by every run that names it). With
    ``spread_gpus`` an unindexed CUDA device becomes this Dask worker's GPU (:func:`flows.runtime.worker_device`).

    Returns:
        One result per request: its record, or the :class:`CaseInputError` when its input is unusable
        (nothing recorded; the flow reports it).
    """
    root = _with_credentials(root)
    if threads is not None:
        set_cpu_threads(threads)
    take_load_seconds()
    gen = get_generator(generator, requests[0].model_ref, worker_device(device, spread_gpus=spread_gpus),
                        decode_preset, precision)
    loaded = take_load_seconds()
    if loaded is not None:
        _logger().info("loaded model %s on %s in %.1f s (process %d)", requests[0].model_ref, gen.device, loaded,
                       os.getpid())
    with _slot(concurrency_limit):
        results = run_cases(requests, gen, root=root, code_version=code_version, cpu_threads=threads,
                            batch_size=generation_batch)
    if loaded is not None and isinstance(results[0], SampleRecord):
        results[0] = dataclasses.replace(results[0], timings_s={**results[0].timings_s, "model_load": loaded})
    return results


def check_concurrency_limit(name: str) -> None:
    """Raise :class:`ConcurrencyLimitError` unless the Prefect API has a global concurrency limit ``name``.

    Checked once before the fan-out, so a mistyped name fails the run at once, not every case.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            api = PREFECT_API_URL.value() or "the ephemeral API"
            raise ConcurrencyLimitError(
                f"runtime.concurrency_limit expects a global concurrency limit that exists on the Prefect API, but "
                f"got concurrency_limit={name!r}, which {api} does not have. Create it with: prefect gcl create "
                f"{name} --limit N (N: cases at once on the GPUs it guards)") from None
    if not limit.active:
        get_run_logger().warning("concurrency limit %r is inactive: it does not limit anything", name)


def _slot(limit: str | None) -> contextlib.AbstractContextManager[Any]:
    """One slot of the named Prefect global concurrency limit (it must exist), or nothing without a name."""
    if limit is None:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    # a case can hold the GPU for minutes: a lease renewal that fails once must not end it
    return concurrency(limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False)


@task(name="find-committed", cache_policy=NO_CACHE, persist_result=False)
def find_committed(root: DatasetRoot, spec_id: str) -> set[str]:
    """:func:`factory.dataset.committed_ids` as a task (missing files logged to the run)."""
    return dataset.committed_ids(_with_credentials(root), spec_id, log=_logger())


def _logger() -> Any:
    """The flow-run logger inside a run (shown in Prefect's UI), the module logger outside one."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


@task(name="find-recorded-metrics", cache_policy=NO_CACHE, persist_result=False)
def find_recorded_metrics(spec_id: str, *, root: DatasetRoot) -> dict[str, float] | None:
    """:func:`factory.dataset.recorded_metrics` as a task."""
    return dataset.recorded_metrics(_with_credentials(root), spec_id)


@task(name="commit-records", cache_policy=NO_CACHE, persist_result=False)
def commit_records(records: list[SampleRecord], *, root: DatasetRoot, metadata: Mapping[str, Any],
                   retried: frozenset[str] = frozenset()) -> int:
    """:func:`factory.dataset.commit` as a task: one batch of records, appended or replacing failures."""
    return dataset.commit(_with_credentials(root), records, metadata=metadata, retried=retried)


@task(name="compact-catalog", cache_policy=NO_CACHE, persist_result=False)
def compact_catalog(root: DatasetRoot) -> dict[str, Any]:
    """:meth:`catalog.store.Catalog.compact` as a task (``runtime.compact_every``)."""
    return _with_credentials(root).catalog().compact()


@task(name="find-failed", cache_policy=NO_CACHE, persist_result=False)
def find_failed(root: DatasetRoot, spec_id: str) -> dict[str, int]:
    """:func:`factory.dataset.failed_attempts` as a task."""
    return dataset.failed_attempts(_with_credentials(root), spec_id)


@task(name="record-dataset", cache_policy=NO_CACHE, persist_result=False)
def record_dataset(spec: DatasetSpec, spec_id: str, *, root: DatasetRoot, metrics: Mapping[str, float],
                   timings: Mapping[str, float], code_version: str, new_rows: int) -> dict[str, Any]:
    """:func:`factory.dataset.record_dataset` as a task.

    Takes the ``spec_id``, not the plan: Prefect walks every task argument looking for futures, which
    costs 0.5-1 ms per planned case for a plan (0.1-0.2 s for 200 cases on 2 busy cores).
    """
    return dataset.record_dataset(spec, spec_id, _with_credentials(root), metrics=metrics, timings=timings,
                                  code_version=code_version, new_rows=new_rows)


@task(name="validate-dataset", cache_policy=NO_CACHE, persist_result=False)
def validate_dataset(spec: DatasetSpec, spec_id: str, *, root: DatasetRoot) -> dict[str, float]:
    """:func:`factory.dataset.dataset_metrics` as a task."""
    return dataset.dataset_metrics(spec, spec_id, _with_credentials(root))


@task(name="publish-card", cache_policy=NO_CACHE, persist_result=False)
def publish_card(root: DatasetRoot) -> str:
    """:func:`factory.dataset.write_card` as a task."""
    return dataset.write_card(_with_credentials(root))


def _submit_cases(cases: list[CaseRequest], spec: DatasetSpec, root: DatasetRoot, version: str, *,
                  gpu_resources: bool, slots: int | None, spread_gpus: bool
                  ) -> dict[PrefectFuture, list[CaseRequest]]:
    """Submit one ``generate-cases`` task per batch of cases (:func:`factory.plan.batch_cases`)."""
    rt = spec.runtime
    threads = resolved_threads(rt)
    annotate = contextlib.nullcontext()
    if gpu_resources:
        import dask

        annotate = dask.annotate(resources={"GPU": 1})
    per_task = _cases_per_task(spec)
    with annotate:
        return {generate_cases.submit(batch, root=root, generator=rt.generator, device=rt.device,
                                      decode_preset=rt.decode_preset, precision=rt.precision, code_version=version,
                                      threads=threads, generation_batch=rt.generation_batch,
                                      concurrency_limit=rt.concurrency_limit, spread_gpus=spread_gpus): batch
                # a pinned batch keeps its composition whatever the workers; auto spreads over them
                for batch in batch_cases(cases, per_task, slots=slots if rt.generation_batch == "auto" else None)}


def _cases_per_task(spec: DatasetSpec) -> Callable[[CaseRequest], int]:
    """How many cases of a cohort one task takes (:func:`factory.plan.cases_per_task`).

    ``auto`` batches only for the ``maisi`` generator (the stub and registered generators make one case
    at a time, so a task of several would only coarsen the progress); on a CPU the size decides.
    """
    rt = spec.runtime
    if rt.generation_batch == "auto" and rt.generator != "maisi":
        return lambda case: 1
    device = resolved_device(rt.device)

    def per_task(case: CaseRequest) -> int:
        try:
            config = pipeline_config(case.model_ref, preset=spec.model.preset)
            voxels = math.prod(latent_shape(config, case.output_size)[1:])
        except (FactoryError, MaisiError):  # the model is not readable here (a worker's path): one case per task
            voxels = None
        return cases_per_task(rt.generation_batch, device=device, latent_voxels=voxels)

    return per_task


def _collect_and_commit(futures: dict[PrefectFuture, list[CaseRequest]], *, batch_size: int, root: DatasetRoot,
                        metadata: Mapping[str, Any], retried: frozenset[str] = frozenset(),
                        compact_every: int | None = None) -> tuple[list[SampleRecord], list[str], int]:
    """Commit records every ``batch_size`` results as they complete (and compact every ``compact_every`` commits).

    Returns:
        The records, the cases that ended without one (``"<sample_id>: <cause>"``), and how many of
        those were refused for an unusable input (:class:`CaseInputError`).
    """
    logger = get_run_logger()
    records: list[SampleRecord] = []
    batch: list[SampleRecord] = []
    crashed: list[str] = []
    inputs = 0
    commits = 0

    def flush() -> None:
        nonlocal commits
        if batch:
            version = commit_records(list(batch), root=root, metadata=metadata,
                                     retried=retried & {r.sample_id for r in batch})
            notify("committed", version=version, rows=len(batch))
            logger.info("committed %d records as samples version %s", len(batch), version)
            batch.clear()
            commits += 1
            if compact_every and commits % compact_every == 0:
                try:
                    metrics = compact_catalog(root)
                except Exception as exc:  # upkeep, not the run's work: another writer may have won a race
                    logger.warning("compaction skipped, the run goes on (catalog optimize can do it later): %s: %s",
                                   type(exc).__name__, exc)
                    return
                logger.info("compacted %s files into %s (samples version %s)", metrics.get("numFilesRemoved"),
                            metrics.get("numFilesAdded"), metrics.get("version"))

    for future in as_completed(list(futures)):
        requests = futures[future]
        try:
            results = future.result()
        except Exception as exc:  # crashed cases are not recorded: a re-run retries them
            for request in requests:
                crashed.append(f"{request.sample_id}: {type(exc).__name__}: {exc}")
                notify("case", sample_id=request.sample_id, status="crashed", reason=f"{type(exc).__name__}: {exc}")
            continue
        for request, record in zip(requests, results, strict=True):
            if isinstance(record, CaseInputError):  # an unusable input is not the case's failure: not recorded
                inputs += 1
                crashed.append(str(record))
                notify("case", sample_id=request.sample_id, status="crashed", reason=str(record))
                continue
            records.append(record)
            batch.append(record)
            notify("case", sample_id=record.sample_id, status=record.status, reason=record.failure_reason)
            if len(batch) >= batch_size:
                flush()
    flush()
    return records, crashed, inputs


def _dataset_metrics(spec: DatasetSpec, spec_id: str, *, changed: bool, root: DatasetRoot) -> dict[str, float]:
    """Validate the dataset, unless this run committed nothing and its metrics are already recorded.

    Validation reads up to 64 passing cases and extracts their features (about 10 s on 2 CPU cores), so a
    re-run that finds every case committed reuses the metrics of the row recorded for this catalog version.
    """
    if not changed:
        recorded = find_recorded_metrics(spec_id, root=root)
        if recorded is not None:
            get_run_logger().info("catalog unchanged since its dataset row; reusing the recorded metrics")
            return recorded
    return validate_dataset(spec, spec_id, root=root)


@flow(name="generate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def generate_dataset(spec: DatasetSpec, output_root: str | None = None, storage_options: dict[str, str] | None = None,
                     code_version: str | None = None, gpu_resources: bool = False,
                     retry_failed: bool = False, parallel_slots: int | None = None,
                     spread_gpus: bool = False) -> dict[str, Any]:
    """Generate (or complete) the dataset a spec describes and return its dataset summary.

    Args:
        spec: the validated spec (a mapping is validated).
        output_root: overrides ``spec.output_root`` (local path or fsspec URI).
        storage_options: deltalake-style ``AWS_*`` options for remote roots (see :mod:`factory.storage`).
        code_version: code version recorded on every row (computed here when None).
        gpu_resources: annotate case tasks with the Dask ``GPU`` resource.
        parallel_slots: how many case tasks the task runner runs at once (None: unknown); ``auto``
            generation batches are sized so that every slot gets work.
        spread_gpus: the Dask workers see every GPU and take one each (:func:`flows.runtime.worker_device`).
        retry_failed: generate the recorded failures again, on the attempt seeds after their last one, and
            replace their rows (``ctfactory run --retry-failed``).
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    spec = validate_spec(spec)
    refuse_secret_options(storage_options, who="generate_dataset")
    root = DatasetRoot.of(output_root or spec.output_uri, storage_options)  # public options only
    version = code_version or current_code_version()
    plan = plan_dataset(spec)
    preflight(spec, output_root=root.uri, storage_options=storage_options, load_model=False)
    if spec.runtime.concurrency_limit:
        check_concurrency_limit(spec.runtime.concurrency_limit)
    done = find_committed(root, plan.spec_id)
    failed = find_failed(root, plan.spec_id) if retry_failed else {}
    todo = [c.model_copy(update={"first_attempt": failed[c.sample_id] + 1}) if c.sample_id in failed else c
            for c in plan.cases if c.sample_id not in done or c.sample_id in failed]
    notify("planned", total=len(plan.cases), skipped=len(plan.cases) - len(todo), todo=len(todo))
    logger.info("spec %s: %d cases, %d committed already, %d to generate", plan.spec_id, len(plan.cases),
                len(plan.cases) - len(todo), len(todo))
    t_generate = time.perf_counter()
    futures = _submit_cases(todo, spec, root, version, gpu_resources=gpu_resources, slots=parallel_slots,
                            spread_gpus=spread_gpus)
    meta = {"spec_id": plan.spec_id, "dataset": spec.name, "dataset_version": spec.version, "code_version": version}
    records, crashed, inputs = _collect_and_commit(futures, batch_size=spec.runtime.batch_size, root=root,
                                                   metadata=meta, retried=frozenset(failed),
                                                   compact_every=spec.runtime.compact_every)
    if crashed and not _with_credentials(root).catalog().exists("samples"):
        raise CasesCrashedError(crashed, inputs)
    t_validate = time.perf_counter()
    metrics = _dataset_metrics(spec, plan.spec_id, changed=bool(records), root=root)
    t_end = time.perf_counter()
    timings = {"wall": t_end - t0, "cases": float(len(records)), "plan": t_generate - t0,
               "generate": t_validate - t_generate, "validate": t_end - t_validate}
    summary = record_dataset(spec, plan.spec_id, root=root, metrics=metrics, timings=timings, code_version=version,
                             new_rows=len(records))
    summary["card_uri"] = publish_card(root) if summary["n_samples"] else None
    if crashed:
        raise CasesCrashedError(crashed, inputs)
    return {**summary, "generated": len(records), "skipped": len(plan.cases) - len(todo), "retried": len(failed)}


def run_generate(spec: DatasetSpec, *, output_root: str | None = None,
                 storage_options: Mapping[str, str] | None = None, retry_failed: bool = False) -> dict[str, Any]:
    """Run :func:`generate_dataset` with the task runner the spec's runtime section asks for.

    Credentials among ``storage_options`` (``AWS_SECRET_ACCESS_KEY``, ...) never reach the flow's
    parameters: they move into this process's environment, where the flow's tasks and the workers it
    starts find them (see :mod:`flows.secrets`).
    """
    storage_options, secret = split_storage_options(storage_options)
    export_secrets(secret)
    choice = build_task_runner(spec.runtime)
    configured = generate_dataset.with_options(task_runner=choice.runner)
    with flow_run_settings():
        return configured(spec, output_root=output_root, storage_options=dict(storage_options or {}) or None,
                          code_version=current_code_version(), gpu_resources=choice.gpu_resources,
                          retry_failed=retry_failed, parallel_slots=choice.slots, spread_gpus=choice.spread_gpus)
