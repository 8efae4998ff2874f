"""Deployments from a folder of specs: ``ctfactory serve`` serves them, ``ctfactory submit`` starts one.

Every spec becomes a deployment ``run-spec/<spec name>`` of :func:`run_spec` with the spec as its
parameter and the schedule it declares (cron or interval); one more deployment ``run-spec/adhoc``
has no spec of its own and takes whatever ``ctfactory submit`` sends. :func:`run_spec` is a thin
flow that calls :func:`flows.generate.run_generate` as a subflow, so served runs honour the spec's
runtime section (threads or Dask) like ``ctfactory run`` does.

Several ``ctfactory serve`` processes (one per GPU, say) can serve the same folder against one Prefect
server: each run goes to one of them. A serve process started with a concurrency limit
(``--concurrency-limit gpu-0``) passes it to the runs it executes through the environment variable
:data:`CONCURRENCY_LIMIT_ENV`, which overrides the spec's ``runtime.concurrency_limit``: the specs are
shared, the GPU is the worker's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from factory.errors import SpecError
from factory.spec import DatasetSpec, load_spec, validate_spec

FLOW_NAME = "run-spec"
ADHOC = "adhoc"
CONCURRENCY_LIMIT_ENV = "CTFACTORY_CONCURRENCY_LIMIT"  # set by serve_specs for the runs it executes


@flow(name=FLOW_NAME)
def run_spec(spec: dict[str, Any], output_root: str | None = None,
             storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Generate the dataset of ``spec`` (a spec as JSON data) with its runtime settings."""
    from flows.generate import run_generate
    from flows.secrets import refuse_secret_options

    refuse_secret_options(storage_options, who="run_spec")
    checked = validate_spec(spec)
    limit = os.environ.get(CONCURRENCY_LIMIT_ENV)
    if limit:  # this worker's GPU limit (serve --concurrency-limit), whatever the shared spec says
        checked = checked.with_runtime(concurrency_limit=limit)
    return run_generate(checked, output_root=output_root, storage_options=storage_options)


def load_spec_folder(folder: str | Path) -> list[DatasetSpec]:
    """Load every ``*.yaml``/``*.yml`` spec of a folder; raise :class:`SpecError` with every problem."""
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix in (".yaml", ".yml"))
    if not paths:
        raise SpecError(f"serve expects a folder with *.yaml specs, but got folder={str(folder)!r} without any.")
    specs, issues = [], []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            issues.extend(exc.issues)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1 or n == ADHOC})
    if dup:
        issues.append(SpecError(f"serve expects unique dataset names other than {ADHOC!r}, but got "
                                f"name={dup[0]!r} twice or reserved.").issues[0])
    if issues:
        raise SpecError(issues)
    return specs


def build_deployments(specs: list[DatasetSpec]) -> list[Any]:
    """Return the deployments to serve: one per spec (with its schedule) plus ``adhoc``."""
    deployments = [run_spec.to_deployment(name=ADHOC, description="runs the spec that ctfactory submit sends")]
    for spec in specs:
        kwargs: dict[str, Any] = {}
        if spec.schedule is not None and spec.schedule.cron:
            kwargs["cron"] = spec.schedule.cron
        elif spec.schedule is not None:
            kwargs["interval"] = spec.schedule.interval_minutes * 60
        deployments.append(run_spec.to_deployment(
            name=spec.name, parameters={"spec": spec.model_dump(mode="json")},
            description=spec.description or f"dataset {spec.name} v{spec.version}", **kwargs))
    return deployments


def serve_specs(folder: str | Path, *, limit: int | None = None, keep_schedules: bool = False,
                concurrency_limit: str | None = None) -> None:
    """Serve the folder's specs as deployments until interrupted.

    Args:
        limit: at most this many runs at once in this process (None: no limit).
        keep_schedules: leave the deployments' schedules on when this process stops (Prefect pauses them
            by default); for several serve processes sharing the deployments, where one stopping must
            not pause the others' schedules.
        concurrency_limit: the Prefect global concurrency limit the runs of this process use (see the
            module docstring).
    """
    from prefect import serve

    deployments = build_deployments(load_spec_folder(folder))
    if concurrency_limit:
        os.environ[CONCURRENCY_LIMIT_ENV] = concurrency_limit
    serve(*deployments, limit=limit, pause_on_shutdown=not keep_schedules)


def submit_spec(spec: DatasetSpec, *, deployment: str = ADHOC, output_root: str | None = None,
                storage_options: dict[str, str] | None = None) -> str:
    """Start a run of a served deployment with ``spec`` and return its flow-run ID (does not wait)."""
    from prefect.deployments import run_deployment

    from flows.secrets import refuse_secret_options

    refuse_secret_options(storage_options, who="submit_spec")
    params: dict[str, Any] = {"spec": spec.model_dump(mode="json")}
    if output_root:
        params["output_root"] = output_root
    if storage_options:
        params["storage_options"] = storage_options
    run = run_deployment(f"{FLOW_NAME}/{deployment}", parameters=params, timeout=0)
    return str(run.id)
