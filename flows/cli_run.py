"""``ctfactory run | check-spec | serve | submit``: specs in, flows out.

The handlers turn arguments into typed objects (a validated spec, overrides) and call the flows.
Prefect's ephemeral server needs no setup; this edge sets ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(120), turns analytics off and quiets Prefect's console log unless the user set them. With
``PREFECT_API_URL`` set, runs report to that server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any

from flows.cli import parse_storage_options
from factory.errors import FactoryError

EXIT_OK = 0
EXIT_FAILED_CASES = 1
EXIT_BAD_INPUT = 2
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _prefect_env(verbose: bool) -> None:
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _bad(command: str, exc: Exception) -> int:
    print(f"ctfactory {command}: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _generation_batch(text: str) -> int | str:
    """``--generation-batch``: ``auto`` or a whole number (the spec's rules check its range)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects 'auto' or a whole number, but got {text!r}") from None


def _public_options(args: argparse.Namespace, *, command: str) -> dict[str, str]:
    """The storage options a flow may take as parameters; credentials go by reference (``flows.secrets``).

    ``run`` executes its flow in this process, so credentials given with ``--storage-option`` move into
    this process's environment (its workers inherit it) and out of the parameters. ``submit`` hands the
    run to a server whose worker cannot see this environment, so it refuses them.
    """
    from flows.secrets import SECRET_BLOCK_OPTION, export_secrets, refuse_secret_options, split_storage_options

    public, secret = split_storage_options(parse_storage_options(args.storage_option))
    if secret and command == "submit":
        refuse_secret_options(secret, who="submit")
    export_secrets(secret)
    if getattr(args, "storage_secret_block", None):
        public[SECRET_BLOCK_OPTION] = args.storage_secret_block
    return public


def run_check_spec(args: argparse.Namespace) -> int:
    """Validate a spec (every problem at once), then print the expanded plan."""
    from factory.models import preset_name
    from factory.plan import format_plan, plan_dataset
    from factory.spec import load_spec

    from maisi_core.errors import MaisiError

    from factory.preflight import check_mask_sources, check_memory, cuda_driver_visible, machine_memory_bytes

    try:
        spec = load_spec(args.spec)
        plan = plan_dataset(spec)
        check_mask_sources(spec)  # every mask path exists and each user mask file has a usable header
        device = spec.runtime.device
        if device == "cpu" or (device == "auto" and not cuda_driver_visible()):
            check_memory(spec, plan, device="cpu", memory_bytes=machine_memory_bytes("cpu"))
    except (FactoryError, MaisiError) as exc:
        return _bad("check-spec", exc)
    sys.stdout.write(format_plan(spec, plan))
    if preset_name(spec.model.ref) is None and spec.model.preset:
        from factory.models import _model_dir_available

        if not _model_dir_available(spec.model_location):
            sys.stdout.write(f"note: model directory {spec.model_location} is not on this machine; geometry was checked "
                             f"against preset {spec.model.preset}. The spec is valid but needs the weights to run.\n")
    return EXIT_OK


class _Progress:
    """A tqdm bar fed by the flow's progress events: cases done / passed / failed, with ETA."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.counts = {"passed": 0, "failed": 0, "crashed": 0}
        self.commits = 0
        self.first_failure = ""

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "planned" and self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=data["todo"], unit="case", desc="cases", file=sys.stderr,
                            postfix=f"skipped {data['skipped']}")
        elif event == "case":
            self.counts[data["status"]] = self.counts.get(data["status"], 0) + 1
            if data["status"] != "passed" and not self.first_failure:
                reason = str(data.get("reason") or "").split(" | ")[-1]
                self.first_failure = f"{data['sample_id']}: {reason[:600]}"
            if self.bar is not None:
                self.bar.set_postfix(passed=self.counts["passed"], failed=self.counts["failed"], refresh=False)
                self.bar.update(1)
        elif event == "committed":
            self.commits += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary_table(summary: dict[str, Any], wall_s: float) -> str:
    lines = [f"dataset {summary['dataset']} v{summary['dataset_version']}  spec_id {summary['spec_id']}  "
             f"catalog samples version {summary['samples_version']}",
             f"generated {summary['generated']}  skipped (already committed) {summary['skipped']}  "
             + (f"retried failures {summary['retried']}  " if summary.get("retried") else "")
             + f"wall {wall_s:.1f} s",
             f"{'cohort':<20} {'rows':>6}"]
    lines += [f"{name:<20} {count:>6}" for name, count in summary["cohort_counts"].items()]
    lines.append(f"{'total':<20} {summary['n_samples']:>6}  passed {summary['n_passed']}  failed {summary['n_failed']}")
    if summary.get("metrics"):
        lines.append("metrics " + " ".join(f"{k}={v:.4g}" for k, v in sorted(summary["metrics"].items())))
    if summary.get("card_uri"):
        lines.append(f"dataset card {summary['card_uri']}")
    return "\n".join(lines) + "\n"


def run_run(args: argparse.Namespace) -> int:
    """Run the generate-dataset flow on a spec (ephemeral Prefect unless PREFECT_API_URL is set)."""
    _prefect_env(args.verbose)
    from factory.spec import load_spec

    from maisi_core.errors import MaisiError

    try:
        options = _public_options(args, command="run")
        spec = load_spec(args.spec).with_runtime(
            device=args.device, dask_address=args.dask_address, dask_local_workers=args.dask_local,
            batch_size=args.batch_size, max_workers=args.max_workers, precision=args.precision,
            threads=args.threads, generation_batch=args.generation_batch, concurrency_limit=args.concurrency_limit)
        from factory.plan import plan_dataset
        from factory.preflight import check_machine, preflight

        plan = plan_dataset(spec)
        preflight(spec, output_root=args.out or spec.output_uri, storage_options=options, load_model=False)
    except (FactoryError, MaisiError, ValueError) as exc:
        return _bad("run", exc)
    boot = _boot_ephemeral_server()  # starts while torch, the model and the flow's modules load
    try:
        check_machine(spec, plan)  # the cases fit this machine's memory; the model loads as the cases use it
    except (FactoryError, MaisiError, ValueError) as exc:
        if boot is not None:
            _abort_boot(boot)
        return _bad("run", exc)
    from flows.generate import run_generate
    from flows.runtime import progress_listener

    if boot is not None:
        boot.join()

    if not args.verbose:
        _quiet_prefect_console()
    progress = _Progress(enabled=not args.no_progress)
    t0 = time.perf_counter()
    try:
        with progress_listener(progress):
            summary = run_generate(spec, output_root=args.out, storage_options=options,
                                   retry_failed=args.retry_failed)
    except Exception as exc:  # the cause is the last line, after whatever Prefect logged
        from factory.errors import CasesCrashedError

        progress.close()
        _drain_prefect()
        print(f"ctfactory run: {_cause(exc)}", file=sys.stderr)
        from flows.errors import ConcurrencyLimitError, DaskClusterError

        if isinstance(exc, (ConcurrencyLimitError, DaskClusterError)) or (
                isinstance(exc, CasesCrashedError) and exc.only_inputs):
            return EXIT_BAD_INPUT
        return EXIT_FAILED_CASES
    finally:
        progress.close()
    _drain_prefect()
    sys.stdout.write(_summary_table(summary, time.perf_counter() - t0))
    if progress.first_failure:
        done = progress.counts["passed"] + progress.counts["failed"]
        print(f"ctfactory run: {progress.counts['failed']} of {done} case(s) failed QC and were recorded as failed; "
              f"first {progress.first_failure}. Try new seeds with: ctfactory run SPEC --retry-failed",
              file=sys.stderr)
        return EXIT_FAILED_CASES
    return EXIT_OK


class _PrefectErrorsOff:
    """Drop Prefect's own ERROR records (run-failure tracebacks, shutdown noise) from the terminal.

    ``ctfactory run`` prints the cause itself as its last line; ``-v`` shows Prefect's records again.
    Records still reach Prefect's API handler, so a server's UI keeps the tracebacks.
    """

    _SERVICES = ("EventsWorker", "APILogWorker")  # Prefect's background senders; they log their shutdown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in self._SERVICES:
            return False
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


def _boot_ephemeral_server() -> threading.Thread | None:
    """Start Prefect's ephemeral API server in a background thread; None with a server of one's own.

    The server is a child process that imports Prefect's server and migrates its SQLite database
    (about 14 s on 2 cores for a new ``PREFECT_HOME``). Started when the first flow runs, that time
    adds to the run; started here, it overlaps with loading torch, the model and the flow's modules.
    ``run`` joins the thread before the flow starts, so the flow finds the server up (Prefect keeps one
    server per process). A failed boot is left to the flow, which starts the server again and reports.
    The decision is made in this thread: Prefect's settings context (a test harness's API URL) does
    not reach new threads.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from flows.lifetime import start_descendant_watch

    start_descendant_watch()  # the server is stopped even if this process is killed while it boots

    def boot() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception as exc:  # the flow's own start tries again and reports the cause
            logging.getLogger(__name__).debug("early start of the ephemeral server failed: %s", exc)

    thread = threading.Thread(target=boot, name="ctfactory-prefect-boot", daemon=True)
    thread.start()
    return thread


def _abort_boot(boot: threading.Thread) -> None:
    """Stop an early-started ephemeral server as soon as its process exists (the run ends with an input error).

    Stopping it makes the boot thread's health polling fail at once, so the thread ends too; nothing is
    left for exit time, and the input error stays the last line.
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    while boot.is_alive() and server.server_process is None:
        time.sleep(0.05)
    _stop_ephemeral_server()
    boot.join(timeout=10)


def _drain_prefect() -> None:
    """Send Prefect's queued events and logs now, so its shutdown prints nothing after our last line."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:  # pragma: no cover - Prefect moved them; the exit drain still runs
        return
    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=10)
        except Exception as exc:  # the run's outcome is decided; a failed flush is not news for the terminal
            logging.getLogger(__name__).debug("draining %s failed: %s", service.__name__, exc)
    _stop_ephemeral_server()


def _stop_ephemeral_server() -> None:
    """Stop Prefect's ephemeral server now (Prefect would at exit): its teardown output comes before our last line.

    The server is a child process sharing this terminal; stopped from ``atexit`` it sometimes logs its
    asyncio and database teardown after the run's own last line, burying the cause. No-op with a server
    of one's own (``PREFECT_API_URL``), which is not ours to stop.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        if server.running:
            server.stop()
    except Exception as exc:  # Prefect's atexit stop still runs, and the watchdog covers the rest
        logging.getLogger(__name__).debug("stopping the ephemeral server early failed: %s", exc)


def _quiet_prefect_console() -> None:
    """Filter the terminal handlers: the root logger's (where Prefect's records propagate) and Prefect's own."""
    loggers = [logging.getLogger(), *(lg for name, lg in logging.Logger.manager.loggerDict.items()
                                      if name.startswith("prefect") and isinstance(lg, logging.Logger))]
    for lg in loggers:
        for handler in lg.handlers:
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if terminal and not any(isinstance(f, _PrefectErrorsOff) for f in handler.filters):
                handler.addFilter(_PrefectErrorsOff())


def _cause(exc: BaseException) -> str:
    """One line: the exception's own message (a house-style sentence), or its type and text."""
    from factory.errors import FactoryError as _Flows
    from maisi_core.errors import MaisiError as _Maisi

    text = " ".join(str(exc).split())
    if isinstance(exc, (_Flows, _Maisi)) or type(exc).__module__.startswith("catalog"):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_serve(args: argparse.Namespace) -> int:
    """Serve the folder's specs as scheduled deployments (blocks until interrupted)."""
    _prefect_env(args.verbose)
    from flows.serve import load_spec_folder, serve_specs

    try:
        specs = load_spec_folder(args.folder)
        if args.concurrency_limit is not None:  # the spec's rule for the name, with its message
            specs[0].with_runtime(concurrency_limit=args.concurrency_limit)
    except FactoryError as exc:
        return _bad("serve", exc)
    serve_specs(args.folder, limit=args.limit, keep_schedules=args.keep_schedules,
                concurrency_limit=args.concurrency_limit)
    return EXIT_OK


def run_submit(args: argparse.Namespace) -> int:
    """Start a run of a served deployment with a spec; print the flow-run ID."""
    _prefect_env(args.verbose)
    from flows.errors import DeploymentError
    from factory.spec import load_spec

    try:
        options = _public_options(args, command="submit")
        spec = load_spec(args.spec)
        if not os.environ.get("PREFECT_API_URL"):
            raise DeploymentError("submit expects PREFECT_API_URL to point at the Prefect server that "
                                  "'ctfactory serve' reports to, but got PREFECT_API_URL unset. "
                                  "Example: export PREFECT_API_URL=http://127.0.0.1:4200/api")
    except FactoryError as exc:
        return _bad("submit", exc)
    from flows.serve import submit_spec

    print(submit_spec(spec, deployment=args.deployment, output_root=args.out, storage_options=options))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``run``, ``check-spec``, ``serve`` and ``submit`` to the ``ctfactory`` parser."""
    check = subparsers.add_parser("check-spec", help="validate a dataset spec and print its plan")
    check.add_argument("spec", metavar="SPEC", help="YAML dataset spec")
    check.set_defaults(func=run_check_spec)

    run = subparsers.add_parser("run", help="generate the dataset a spec describes (resumes where it stopped)")
    run.add_argument("spec", metavar="SPEC", help="YAML dataset spec")
    run.add_argument("--out", metavar="URI", help="output root (overrides the spec's output_root)")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), help="overrides runtime.device")
    run.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"),
                     help="overrides runtime.precision (auto: fp16 on CUDA, fp32 on a CPU)")
    run.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="run cases on an existing Dask cluster")
    run.add_argument("--dask-local", type=int, metavar="N", help="run cases on a temporary local Dask cluster")
    run.add_argument("--batch-size", type=int, metavar="N", help="records per catalog commit")
    run.add_argument("--max-workers", type=int, metavar="N", help="concurrent cases on CPU")
    run.add_argument("--generation-batch", type=_generation_batch, metavar="N|auto",
                     help="cases of one cohort denoised together (overrides runtime.generation_batch; auto: from "
                          "free GPU memory, 1 on a CPU)")
    run.add_argument("--concurrency-limit", metavar="NAME",
                     help="Prefect global concurrency limit every generation task holds a slot of (overrides "
                          "runtime.concurrency_limit; create it with: prefect gcl create NAME --limit N)")
    run.add_argument("--threads", type=int, metavar="N",
                     help="torch CPU threads per worker process (overrides runtime.threads; default: the cores "
                          "shared by the concurrent cases, at most 8; use 1 on a box busy with other work)")
    run.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                     help="storage option for S3 etc. (repeatable), e.g. AWS_ENDPOINT_URL=http://...; "
                          "credentials (AWS_SECRET_ACCESS_KEY, ...) stay in this process, never in Prefect")
    run.add_argument("--storage-secret-block", metavar="NAME",
                     help="Prefect Secret block holding a JSON object of storage credentials")
    run.add_argument("--retry-failed", action="store_true",
                     help="generate the recorded failures again on new attempt seeds; their rows are replaced "
                          "(the failed rows stay readable with catalog query --as-of)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.epilog = "Prefect's own error logs and tracebacks are shown with -v; the cause is always the last line."
    run.set_defaults(func=run_run)

    serve = subparsers.add_parser("serve", help="serve a folder of specs as scheduled Prefect deployments")
    serve.add_argument("folder", metavar="DIR", help="folder of YAML specs")
    serve.add_argument("--limit", type=int, metavar="N", help="at most N concurrent runs")
    serve.add_argument("--keep-schedules", action="store_true",
                       help="leave the schedules on when this process stops (several serve processes sharing the "
                            "deployments: one stopping must not pause the others)")
    serve.add_argument("--concurrency-limit", metavar="NAME",
                       help="the Prefect global concurrency limit of this worker's GPU, for every run it executes "
                            "(overrides the specs' runtime.concurrency_limit)")
    serve.set_defaults(func=run_serve)

    submit = subparsers.add_parser("submit", help="start a run of a served deployment with a spec")
    submit.add_argument("spec", metavar="SPEC", help="YAML dataset spec")
    submit.add_argument("--deployment", default="adhoc", help="deployment name under run-spec (default adhoc)")
    submit.add_argument("--out", metavar="URI", help="output root (overrides the spec's output_root)")
    submit.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="storage option without credentials (repeatable); credentials by reference only")
    submit.add_argument("--storage-secret-block", metavar="NAME",
                        help="Prefect Secret block (on the server) holding a JSON object of storage credentials")
    submit.set_defaults(func=run_submit)
