"""The ``generate-dataset`` flow: plan → skip committed → fan out cases → commit in batches → dataset row.

The flow body reads like the architecture picture; each task is one library call. Cases go to the
task runner chosen by :func:`flows.runtime.build_task_runner` (threads, or Dask workers); a case task
gets a :class:`CaseRequest` and returns a :class:`SampleRecord`, never arrays. Records are committed to
the catalog every ``runtime.batch_size`` results, so a crash loses at most the batch in flight; a
re-run skips every committed case (passed or failed) and regenerates the rest with the same seeds; a
re-run that commits nothing reuses the metrics of the dataset row already recorded for that catalog
version instead of validating again. The dataset row's ``timings_s`` say where the flow's time went
(``plan``, ``generate``: fan-out and commits, ``validate``: dataset metrics, ``wall``: their sum).

Seams for other packages, used only when present:

* ``flows.validate.validate_dataset(catalog, *, spec, spec_id) -> Mapping[str, float]``: dataset
  metrics (stored in the dataset row's ``metrics``).
* ``catalog.report.build_report_html(catalog)``: the dataset card, written to ``ROOT/dataset_card.html``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from catalog.schema import SampleRecord
from catalog.root import DatasetRoot
from catalog.store import Catalog
from flows.case import get_generator, run_case
from flows.errors import CaseInputError, CasesCrashedError
from flows.plan import CaseRequest, plan_dataset
from flows.preflight import preflight
from flows.runtime import (
    build_task_runner,
    current_code_version,
    flow_run_settings,
    notify,
    resolved_threads,
    set_cpu_threads,
)
from flows.secrets import export_secrets, refuse_secret_options, resolve_storage_options, split_storage_options
from flows.spec import DatasetSpec, canonical_json, validate_spec



def _with_credentials(root: DatasetRoot) -> DatasetRoot:
    """``root`` with the credentials of this process (environment, secret block) added to its public options."""
    return root.with_storage_options(resolve_storage_options(root.storage_options))


@task(name="generate-case", cache_policy=NO_CACHE, persist_result=False)
def generate_case(request: CaseRequest, *, root: DatasetRoot, generator: str, device: str, decode_preset: str | None, code_version: str,
                  precision: str = "auto", threads: int | None = None) -> SampleRecord | CaseInputError:
    """Generate, check and write one case (the model is loaded once per worker process).

    Returns the record, or the :class:`CaseInputError` when the case's input is unusable (nothing
    recorded; the flow reports it).
    """
    root = _with_credentials(root)
    if threads is not None:
        set_cpu_threads(threads)
    gen = get_generator(generator, request.model_ref, device, decode_preset, precision)
    try:
        return run_case(request, gen, root=root, code_version=code_version, cpu_threads=threads)
    except CaseInputError as exc:  # returned, not raised: an input problem is not a task crash to log
        return exc


@task(name="find-committed", cache_policy=NO_CACHE, persist_result=False)
def find_committed(root: DatasetRoot, spec_id: str) -> set[str]:
    """Return the sample_ids of ``spec_id`` that are done: committed (passed or failed), files in place.

    A passed row whose image or label file is gone (deleted by hand, lost with a disk) is not done: the
    run regenerates the case from its seed, which writes the same bytes, and the identical record is a
    no-op for the catalog.
    """
    import pyarrow.compute as pc

    root = _with_credentials(root)
    cat = root.catalog()
    if not cat.exists("samples"):
        return set()
    rows = cat.read_table("samples", columns=["sample_id", "status", "image_uri", "label_uri"],
                          filter=pc.field("spec_id") == spec_id).to_pylist()
    done = {r["sample_id"] for r in rows}
    passed = [r for r in rows if r["status"] == "passed"]
    missing = _missing_files(root, [r[k] for r in passed for k in ("image_uri", "label_uri")])
    for row in passed:
        if row["image_uri"] in missing or row["label_uri"] in missing:
            _logger().warning("case %s is committed but its files are missing; regenerating it", row["sample_id"])
            done.discard(row["sample_id"])
    return done


def _logger() -> Any:
    """The flow-run logger inside a run (shown in Prefect's UI), the module logger outside one."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


def _missing_files(root: DatasetRoot, uris: list[str]) -> set[str]:
    """The URIs of ``uris`` that do not exist; one listing per folder, not one request per file."""
    listed: dict[str, set[str]] = {}
    missing = set()
    for uri in uris:
        fs, path = root.filesystem(uri)
        folder = path.rsplit("/", 1)[0]
        if folder not in listed:
            try:
                listed[folder] = {p.rstrip("/") for p in fs.ls(folder, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if path not in listed[folder]:
            missing.add(uri)
    return missing


@task(name="find-recorded-metrics", cache_policy=NO_CACHE, persist_result=False)
def find_recorded_metrics(spec_id: str, *, root: DatasetRoot) -> dict[str, float] | None:
    """Return the metrics of the dataset row already recorded for the catalog as it is now, else None."""
    cat = _with_credentials(root).catalog()
    row = _recorded_dataset_row(cat, spec_id)
    return None if row is None else {str(k): float(v) for k, v in (row["metrics"] or [])}


def _recorded_dataset_row(cat: Catalog, spec_id: str) -> dict[str, Any] | None:
    """The newest ``datasets`` row of ``spec_id`` at the current ``samples`` version, or None."""
    import pyarrow.compute as pc

    if not cat.exists("datasets"):
        return None
    rows = cat.read_table("datasets", filter=(pc.field("spec_id") == spec_id)
                          & (pc.field("samples_version") == cat.version)).to_pylist()
    return max(rows, key=lambda r: r["created_at"]) if rows else None


@task(name="commit-records", cache_policy=NO_CACHE, persist_result=False)
def commit_records(records: list[SampleRecord], *, root: DatasetRoot, metadata: Mapping[str, Any],
                   retried: frozenset[str] = frozenset()) -> int:
    """Commit one batch of records; return the version.

    New cases are appended; cases in ``retried`` (recorded failures generated again by ``--retry-failed``)
    replace their failed rows in one atomic commit (the failed rows stay in earlier versions).
    """
    cat = _with_credentials(root).catalog()
    again = [r for r in records if r.sample_id in retried]
    fresh = [r for r in records if r.sample_id not in retried]
    version = -1
    if fresh:
        version = cat.append_samples(fresh, commit_metadata=metadata)
    if again:
        version = cat.replace_failed_samples(again, commit_metadata={**metadata, "ctfactory.retry_failed": "true"})
    return version


@task(name="find-failed", cache_policy=NO_CACHE, persist_result=False)
def find_failed(root: DatasetRoot, spec_id: str) -> dict[str, int]:
    """Return ``{sample_id: last attempt}`` of the recorded failures of ``spec_id``."""
    import pyarrow.compute as pc

    cat = _with_credentials(root).catalog()
    if not cat.exists("samples"):
        return {}
    rows = cat.read_table("samples", columns=["sample_id", "attempt"],
                          filter=(pc.field("spec_id") == spec_id) & (pc.field("status") == "failed")).to_pylist()
    return {r["sample_id"]: int(r["attempt"] or 0) for r in rows}


@task(name="record-dataset", cache_policy=NO_CACHE, persist_result=False)
def record_dataset(spec: DatasetSpec, spec_id: str, *, root: DatasetRoot, metrics: Mapping[str, float], timings: Mapping[str, float], code_version: str,
                   new_rows: int) -> dict[str, Any]:
    """Append the dataset row (counts, timings, model, code version); skip it when nothing changed.

    Takes the ``spec_id``, not the plan: Prefect walks every task argument looking for futures, which
    costs 0.5-1 ms per planned case for a plan (0.1-0.2 s for 200 cases on 2 busy cores).
    """
    import pyarrow.compute as pc

    from flows.models import model_name, pipeline_config

    cat = _with_credentials(root).catalog()
    rows = cat.read_table("samples", filter=pc.field("spec_id") == spec_id,
                          columns=["sample_id", "status", "cohort", "model_digest"]).to_pylist()
    summary = {
        "dataset": spec.name, "dataset_version": spec.version, "spec": canonical_json(spec), "spec_id": spec_id,
        "samples_version": cat.version, "n_samples": len(rows),
        "n_passed": sum(r["status"] == "passed" for r in rows), "n_failed": sum(r["status"] == "failed" for r in rows),
        "cohort_counts": {c.name: sum(r["cohort"] == c.name for r in rows) for c in spec.cohorts},
        "metrics": dict(metrics), **dict(metrics), "timings_s": dict(timings), "code_version": code_version,
        "model_name": model_name(spec.model.ref),
        "model_digest": ",".join(sorted({r["model_digest"] for r in rows if r["model_digest"]})),
        "licence": pipeline_config(spec.model_location, preset=spec.model.preset).licence,
    }
    if new_rows == 0 and _recorded_dataset_row(cat, spec_id) is not None:
        return {**summary, "datasets_version": None}
    version = cat.append_dataset(summary, commit_metadata={"spec_id": spec_id, "code_version": code_version})
    return {**summary, "datasets_version": version}


@task(name="validate-dataset", cache_policy=NO_CACHE, persist_result=False)
def validate_dataset(spec: DatasetSpec, spec_id: str, *, root: DatasetRoot) -> dict[str, float]:
    """Dataset metrics from ``flows.validate.validate_dataset``."""
    from flows import validate

    cat = _with_credentials(root).catalog()
    return {str(k): float(v) for k, v in validate.validate_dataset(cat, spec=spec, spec_id=spec_id).items()}


@task(name="publish-card", cache_policy=NO_CACHE, persist_result=False)
def publish_card(root: DatasetRoot) -> str:
    """Write the HTML dataset card to ``ROOT/dataset_card.html`` (``catalog.report.write_report``)."""
    from catalog.report import write_report

    root = _with_credentials(root)
    write_report(root.catalog(), root.card_uri, storage_options=root.storage_options)
    return root.card_uri


def _submit_cases(cases: list[CaseRequest], spec: DatasetSpec, root: DatasetRoot, version: str,
                  gpu_resources: bool) -> dict[PrefectFuture, CaseRequest]:
    import contextlib

    rt = spec.runtime
    threads = resolved_threads(rt)
    annotate = contextlib.nullcontext()
    if gpu_resources:
        import dask

        annotate = dask.annotate(resources={"GPU": 1})
    with annotate:
        return {generate_case.submit(c, root=root, generator=rt.generator, device=rt.device, decode_preset=rt.decode_preset,
                                     precision=rt.precision, code_version=version, threads=threads): c
                for c in cases}


def _collect_and_commit(futures: dict[PrefectFuture, CaseRequest], *, batch_size: int, root: DatasetRoot,
                        metadata: Mapping[str, Any], retried: frozenset[str] = frozenset()
                        ) -> tuple[list[SampleRecord], list[str], int]:
    """Commit records every ``batch_size`` results as they complete.

    Returns:
        The records, the cases that ended without one (``"<sample_id>: <cause>"``), and how many of
        those were refused for an unusable input (:class:`CaseInputError`).
    """
    logger = get_run_logger()
    records: list[SampleRecord] = []
    batch: list[SampleRecord] = []
    crashed: list[str] = []
    inputs = 0

    def flush() -> None:
        if batch:
            version = commit_records(list(batch), root=root, metadata=metadata,
                                     retried=retried & {r.sample_id for r in batch})
            notify("committed", version=version, rows=len(batch))
            logger.info("committed %d records as samples version %s", len(batch), version)
            batch.clear()

    for future in as_completed(list(futures)):
        request = futures[future]
        try:
            record = future.result()
        except Exception as exc:  # a crashed case is not recorded: a re-run retries it
            crashed.append(f"{request.sample_id}: {type(exc).__name__}: {exc}")
            notify("case", sample_id=request.sample_id, status="crashed", reason=f"{type(exc).__name__}: {exc}")
            continue
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
                     retry_failed: bool = False) -> dict[str, Any]:
    """Generate (or complete) the dataset a spec describes and return its dataset summary.

    Args:
        spec: the validated spec (a mapping is validated).
        output_root: overrides ``spec.output_root`` (local path or fsspec URI).
        storage_options: deltalake-style ``AWS_*`` options for remote roots (see :mod:`flows.storage`).
        code_version: code version recorded on every row (computed here when None).
        gpu_resources: annotate case tasks with the Dask ``GPU`` resource.
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
    done = find_committed(root, plan.spec_id)
    failed = find_failed(root, plan.spec_id) if retry_failed else {}
    todo = [c.model_copy(update={"first_attempt": failed[c.sample_id] + 1}) if c.sample_id in failed else c
            for c in plan.cases if c.sample_id not in done or c.sample_id in failed]
    notify("planned", total=len(plan.cases), skipped=len(plan.cases) - len(todo), todo=len(todo))
    logger.info("spec %s: %d cases, %d committed already, %d to generate", plan.spec_id, len(plan.cases),
                len(plan.cases) - len(todo), len(todo))
    t_generate = time.perf_counter()
    futures = _submit_cases(todo, spec, root, version, gpu_resources)
    meta = {"spec_id": plan.spec_id, "dataset": spec.name, "dataset_version": spec.version, "code_version": version}
    records, crashed, inputs = _collect_and_commit(futures, batch_size=spec.runtime.batch_size, root=root,
                                                   metadata=meta, retried=frozenset(failed))
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
                          retry_failed=retry_failed)
