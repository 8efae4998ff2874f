"""``ctfactory catalog query|history|verify|export`` and ``ctfactory report``: the catalog CLI.

Each handler turns arguments into library calls and returns an exit code; bad input raises a
:class:`catalog.errors.CatalogError`, which ``flows.cli`` prints as one line with exit code 2. So does
a catalog that cannot be read (a corrupt Delta log, a missing data file, an unreachable store): every
handler turns deltalake, pyarrow and OS errors into a one-line :class:`catalog.errors.CatalogReadError`.

``catalog verify`` exits 0 when the catalog is clean, 1 when it found problems (a missing or altered
volume, a repeated sample_id, a leftover file older than ``--min-age``) and 2 when it could not read
the catalog.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator

import pyarrow as pa
from deltalake.exceptions import DeltaError

from catalog.errors import CatalogError, CatalogReadError, QueryError
from catalog.choices import EXPORT_FORMATS, OUTPUT_FORMATS, QC_CHOICES
from catalog.store import Catalog, open_catalog
from catalog.verify import DEFAULT_MIN_AGE_S, check_data_files, repair_catalog, verify_catalog
from flows.cli import parse_storage_options

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
_READ_ERRORS: tuple[type[BaseException], ...] = (DeltaError, OSError, pa.ArrowException)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, but got {text!r}")
    return value


def _open(args: argparse.Namespace) -> Catalog:
    return open_catalog(args.root, storage_options=parse_storage_options(args.storage_option))


@contextlib.contextmanager
def _reading(args: argparse.Namespace, action: str) -> Iterator[None]:
    """Turn a deltalake, pyarrow or OS error of a catalog command into a one-line :class:`CatalogReadError`."""
    try:
        yield
    except CatalogError:
        raise
    except _READ_ERRORS as exc:
        raise CatalogReadError.from_exception(
            f"catalog {action}", f"catalog at root={args.root!r}", exc,
            "Check that ROOT is reachable and intact (ctfactory catalog verify ROOT)."
        ) from exc


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--min-age expects a number of seconds >= 0, but got {text!r}.")
    return value


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="dataset output root (local path or s3://bucket/prefix)")
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="storage option for S3 etc. (repeatable), e.g. AWS_ENDPOINT_URL=http://...")


def _emit(text: str | bytes) -> None:
    if isinstance(text, bytes):
        sys.stdout.buffer.write(text)
    else:
        sys.stdout.write(text)


def run_query(args: argparse.Namespace) -> int:
    """Handle ``catalog query``."""
    from catalog.query import format_result, sample_filter, write_result

    cat = _open(args)
    if args.sql and any(v is not None for v in (args.region, args.pathology, args.qc)):
        raise QueryError("catalog query expects either --sql or the filters --region/--pathology/--qc, "
                         "but got both. Put the filters in the SQL WHERE clause.")
    with _reading(args, "query"):
        if args.sql:
            # DuckDB would report a missing data file as an SQL error: check the files first
            check_data_files(cat, "samples", version=args.as_of)
            table = cat.sql(args.sql, as_of=args.as_of)
        else:
            where = sample_filter(region=args.region, pathology=args.pathology, qc=args.qc)
            table = cat.query(where, as_of=args.as_of)
            table = table.sort_by("sample_id")  # a stable order; SQL results keep the order they ask for
    table = _shape_result(table, args)
    if args.output:
        write_result(table, args.format, args.output)
    elif args.format == "parquet":
        raise QueryError("catalog query expects --output FILE with --format parquet, but got output=None.")
    else:
        _emit(format_result(table, args.format))
    return EXIT_OK


# What a person wants to see first; --columns picks others, --all shows every column.
DEFAULT_TABLE_COLUMNS: tuple[str, ...] = ("sample_id", "cohort", "body_region", "pathology", "status", "qc_pass",
                                          "tumor_contrast_hu", "image_uri")


def _shape_result(table, args: argparse.Namespace):
    """Pick the columns (``--columns``, ``--all``, or the short default set for ``--format table``) and ``--limit``.

    Machine formats (json, csv, parquet) keep every column unless ``--columns`` names some.
    """
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in table.column_names]
        if unknown:
            from catalog.errors import QueryError
            from maisi_core.errors import did_you_mean

            raise QueryError(f"catalog query expects --columns from the result's columns, but got "
                             f"column={unknown[0]!r}.{did_you_mean(unknown[0], table.column_names)}")
        table = table.select(wanted)
    elif args.format == "table" and not args.all and not args.sql:
        table = table.select([c for c in DEFAULT_TABLE_COLUMNS if c in table.column_names])
    if args.limit is not None:
        table = table.slice(0, args.limit)
    return table


def run_history(args: argparse.Namespace) -> int:
    """Handle ``catalog history``: one line per commit, newest first (``--json`` for the raw entries)."""
    with _reading(args, "history"):
        entries = _open(args).history(args.table)
    if args.json:
        _emit(json.dumps(entries, indent=1, default=str) + "\n")
        return EXIT_OK
    _emit("version\ttime (UTC)\toperation\tmetadata\n")
    for entry in entries:
        custom = {k: v for k, v in entry.items() if k not in {
            "version", "timestamp", "operation", "operationParameters", "operationMetrics",
            "engineInfo", "clientVersion", "ctfactory.commit_id"}}
        meta = " ".join(f"{k}={v}" for k, v in sorted(custom.items()))
        _emit(f"{entry.get('version')}\t{_iso_time(entry.get('timestamp'))}\t{entry.get('operation')}\t{meta}\n")
    return EXIT_OK


def run_optimize(args: argparse.Namespace) -> int:
    """Handle ``catalog optimize``: compact the samples table's small files (``--z-order``: also cluster them)."""
    cat = _open(args)
    with _reading(args, "optimize"):
        if not cat.exists("samples"):
            raise CatalogReadError(f"catalog optimize expects a catalog with a samples table, but got root="
                                   f"{args.root!r} without one. Run a spec into it first.")
        before = cat.version
        metrics = cat.optimize(checkpoint=True) if args.z_order else cat.compact()
        after = cat.version
    what = "z-ordered" if args.z_order else "compacted"
    if after == before:
        _emit(f"samples version {after}: nothing to {'z-order' if args.z_order else 'compact'}; checkpoint written\n")
        return EXIT_OK
    _emit(f"samples version {before} -> {after}: {what} {metrics.get('numFilesRemoved', 0)} files into "
          f"{metrics.get('numFilesAdded', 0)}; checkpoint written\n")
    return EXIT_OK


def _iso_time(millis: object) -> str:
    """Delta's commit timestamp (epoch milliseconds) as ISO-8601 UTC, e.g. ``2026-12-02T12:30:55.123Z``."""
    from datetime import datetime, timezone

    if not isinstance(millis, (int, float)):
        return str(millis)
    moment = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_verify(args: argparse.Namespace) -> int:
    """Handle ``catalog verify [--repair]``: exit 0 clean, 1 problems found, 2 (raised) could not read.

    Problems: a passing row's file missing or altered, a repeated sample_id, or a leftover (stray
    temporary file, untracked data file) older than ``--min-age``. With ``--repair`` the leftovers
    and repeated rows are repaired first and the exit code reflects what remains.
    """
    cat = _open(args)
    with _reading(args, "verify"):
        report = verify_catalog(cat, as_of=args.as_of, orphans=not args.no_orphans, min_age_s=args.min_age)
        _emit(report.summary() + "\n")
        if args.repair:
            result = repair_catalog(cat, report)
            _emit(result.summary() + "\n")
            if result.deduplicated:  # rows changed: check the new version
                report = verify_catalog(cat, orphans=not args.no_orphans, min_age_s=args.min_age)
            else:
                report = report.after_repair(result)
            _emit("after repair: " + report.summary() + "\n")
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


DICOMWEB_PASSWORD_ENV = "CTFACTORY_DICOMWEB_PASSWORD"


def run_export(args: argparse.Namespace) -> int:
    """Handle ``catalog export`` (and, with ``--to URL``, the STOW-RS send and QIDO check of a DICOM export)."""
    if args.dicomweb_user is not None and not args.to:
        from catalog.errors import ExportError

        raise ExportError("catalog export expects --to URL with --dicomweb-user, but got to=None.")
    password = _dicomweb_password(args) if args.to else None
    if args.to:
        from catalog.dicomweb import check_dicomweb_url

        check_dicomweb_url(args.to)
    with _reading(args, "export"):
        from catalog.export import export_dataset

        result = export_dataset(_open(args), args.dest, format=args.format, as_of=args.version,
                                dataset_id=args.dataset_id, overwrite=args.overwrite, link=args.link,
                                licence=args.licence, url=args.url)
    _emit(f"exported {result.num_cases} cases of version {result.version} as {result.format} to {result.path}\n")
    if args.to:
        from catalog.dicomweb import send_dicom_export

        sent = send_dicom_export(result.path, args.to, username=args.dicomweb_user, password=password)
        _emit(f"stored {sent.instances} instances in {sent.studies} studies at {sent.url} "
              f"(QIDO: every study complete)\n")
    return EXIT_OK


def _dicomweb_password(args: argparse.Namespace) -> str | None:
    """Check the ``--to`` options; return the password from the environment, registered for redaction."""
    import base64
    import os

    from catalog.errors import ExportError
    from flows.secrets import redact_values

    if args.format != "dicom":
        raise ExportError(f"catalog export expects --format dicom with --to, but got format={args.format!r}.")
    if args.dicomweb_user is None:
        return None
    password = os.environ.get(DICOMWEB_PASSWORD_ENV)
    if not password:
        raise ExportError(f"catalog export expects the password of --dicomweb-user in the environment variable "
                          f"{DICOMWEB_PASSWORD_ENV}, but got none. Set it (never pass it as an option).")
    token = base64.b64encode(f"{args.dicomweb_user}:{password}".encode()).decode()  # the Authorization header
    redact_values([password, token])
    return password


def run_report(args: argparse.Namespace) -> int:
    """Handle ``report``: write the HTML dataset card."""
    from catalog.report import write_report

    with _reading(args, "report"):
        path = write_report(_open(args), args.dest, as_of=args.version, max_previews=args.previews)
    _emit(f"wrote {path}\n")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``catalog`` (query, history, verify, export) and ``report`` to the ``ctfactory`` parser."""
    catalog = subparsers.add_parser("catalog", help="query, verify and export the dataset catalog")
    sub = catalog.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)

    query = sub.add_parser("query", help="filter samples or run SQL over tables samples and datasets")
    _add_root(query)
    query.add_argument("--region", help="body_region equals this")
    query.add_argument("--pathology", help="pathology equals this")
    query.add_argument("--qc", choices=QC_CHOICES, help="QC verdict")
    query.add_argument("--sql", help='DuckDB SQL over tables samples and datasets, e.g. "SELECT count(*) FROM samples"')
    query.add_argument("--as-of", type=int, metavar="N", help="samples table version (time travel)")
    query.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    query.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    query.add_argument("--columns", metavar="A,B,...", help="columns to show (default for --format table: "
                       + ",".join(DEFAULT_TABLE_COLUMNS) + "; json/csv/parquet: all)")
    query.add_argument("--all", action="store_true", help="every column in --format table")
    query.add_argument("--limit", type=_positive, metavar="N", help="at most N rows")
    query.set_defaults(func=run_query)

    history = sub.add_parser("history", help="list the commits (versions) of the catalog")
    _add_root(history)
    history.add_argument("--table", choices=("samples", "datasets"), default="samples")
    history.add_argument("--json", action="store_true", help="print the raw commit entries as JSON")
    history.set_defaults(func=run_history)

    optimize = sub.add_parser(
        "optimize", help="merge the small files that many commits leave (one new version, same rows)",
        description="Compact the samples table: bin-pack the small Parquet files each commit adds into large ones "
                    "and write a checkpoint, so commits and the next run's start read a few files instead of "
                    "thousands (benchmarks/SCALE.md). Runs can do it themselves every N commits with "
                    "runtime.compact_every. Older versions stay readable (time travel).")
    _add_root(optimize)
    optimize.add_argument("--z-order", action="store_true",
                          help="also cluster rows on body_region, pathology and qc_pass for filtered queries "
                               "(rewrites the whole table each time)")
    optimize.set_defaults(func=run_optimize)

    verify = sub.add_parser(
        "verify", help="check files, repeated sample_ids and leftovers; exit 0 clean, 1 problems, 2 unreadable",
        description="Check every passing row's files against sha256 and size, every Delta data file, repeated "
                    "sample_ids, stray temporary files and untracked data files. Exit 0: clean. Exit 1: a file "
                    "missing or altered, a repeated sample_id, or a leftover older than --min-age (after "
                    "--repair: what remains). Exit 2: the catalog could not be read (corrupt Delta log, missing "
                    "data file, unreachable root).")
    _add_root(verify)
    when = verify.add_mutually_exclusive_group()
    when.add_argument("--as-of", type=int, metavar="N", help="samples table version")
    when.add_argument("--repair", action="store_true",
                      help="remove leftovers older than --min-age and keep the earliest row of each repeated "
                           "sample_id (one atomic commit); missing or altered files are not repairable")
    verify.add_argument("--min-age", type=_non_negative_seconds, default=DEFAULT_MIN_AGE_S, metavar="SECONDS",
                        help="leftovers younger than this may be a write in progress: listed, not counted as a "
                             f"problem, never removed (default {DEFAULT_MIN_AGE_S:.0f})")
    verify.add_argument("--no-orphans", action="store_true", help="skip listing unreferenced volume files")
    verify.set_defaults(func=run_verify)

    export = sub.add_parser("export", help="export passing samples as nnU-Net v2, MSD, Croissant or DICOM")
    _add_root(export)
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--dest", required=True, metavar="DIR")
    export.add_argument("--version", type=int, metavar="N", help="samples table version (default: latest)")
    export.add_argument("--dataset-id", type=int, default=500, metavar="NNN", help="nnU-Net dataset ID (1-999)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export in DIR")
    export.add_argument("--link", action="store_true", help="hard-link the catalog's files instead of copying "
                        "them (saves space; editing an exported file then edits the catalog's copy too, which "
                        "`catalog verify` reports)")
    export.add_argument("--url", metavar="URL", help="with --format croissant: the dataset's public page "
                        "(absolute http(s)); Croissant's url")
    export.add_argument("--licence", metavar="SPDX_ID", help="with --format croissant: the dataset's licence as an "
                        "SPDX id (e.g. CC-BY-4.0), when the model's recorded licence does not start with one")
    export.add_argument("--to", metavar="URL", help="with --format dicom: store the export on this DICOMweb server "
                        "(STOW-RS, e.g. http://pacs:8042/dicom-web) and check each study with QIDO-RS")
    export.add_argument("--dicomweb-user", metavar="USER", help="HTTP basic auth user for --to; the password is "
                        f"read from the environment variable {DICOMWEB_PASSWORD_ENV}")
    export.set_defaults(func=run_export)

    report = subparsers.add_parser("report", help="write a self-contained HTML dataset card")
    _add_root(report)
    report.add_argument("--version", type=int, metavar="N", help="samples table version (default: latest)")
    report.add_argument("--dest", required=True, metavar="FILE.html")
    report.add_argument("--previews", type=int, default=None, metavar="K", help="number of preview cases "
                        "(default: at least 4 and at least one per cohort)")
    report.set_defaults(func=run_report)
