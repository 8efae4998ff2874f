"""``ctfactory view ROOT``: browse a catalog's cases in a local, read-only 3D viewer.

Starts :mod:`catalog.viewer`'s web server (loopback only by default), prints its URL and serves until
Ctrl-C or SIGTERM (``flows.cli`` turns either into a clean stop with exit code 130 or 143). A port that
cannot be bound exits with code 2 and one line. Storage options are passed like the other commands';
credentials given as options are redacted from the log (:mod:`flows.secrets`), and the request log names
paths only.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flows.cli import EXIT_BAD_INPUT, parse_storage_options

VIEWER_LOGGER = "catalog.viewer"
MAX_PORT = 65535


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"--port expects an integer in [0, {MAX_PORT}] (0 picks a free port), "
                                         f"but got {text!r}")
    return value


def run_view(args: argparse.Namespace) -> int:
    """Handle ``view``: serve the viewer of ``args.root`` until interrupted."""
    from catalog.errors import CatalogError
    from catalog.root import DatasetRoot
    from catalog.viewer import build_viewer_server
    from flows.secrets import resolve_storage_options

    options = resolve_storage_options(parse_storage_options(args.storage_option))
    root = DatasetRoot.of(args.root, options)
    try:
        server = build_viewer_server(root, host=args.host, port=args.port, as_of=args.as_of)
    except CatalogError:  # some are OSErrors too (no catalog, unreadable): flows.cli reports them
        raise
    except OSError as exc:
        print(f"ctfactory view expects an address it can listen on, but got host={args.host!r} port={args.port} "
              f"({exc.strerror or exc}). Pick another --port (0 picks a free one).", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        logging.getLogger(VIEWER_LOGGER).setLevel(logging.INFO)
    with server:
        snapshot = server.index.snapshot
        pinned = " (pinned)" if args.as_of is not None else ""
        print(f"ctfactory view: {len(snapshot.cases)} cases of {root.uri} at version {snapshot.version}{pinned}",
              flush=True)
        if server.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"ctfactory view: listening on {server.host}: anyone who can reach this machine can read the "
                  "dataset.", file=sys.stderr)
        print(f"ctfactory view: serving at {server.url} (Ctrl-C to stop)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        server.serve_forever()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``view`` command."""
    p = subparsers.add_parser(
        "view", help="browse the catalog's cases in a local 3D viewer (read-only web page)",
        description="Serve a web page listing ROOT's samples with filters (cohort, body region, QC, pathology) "
                    "that opens any case in an interactive 3D viewer (NiiVue) with its label overlay and CT "
                    "window presets. Read-only; bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("root", metavar="ROOT", help="dataset output root (local path or s3://bucket/prefix)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=0, metavar="N", help="port (default 0: a free port, printed)")
    p.add_argument("--as-of", type=int, metavar="VERSION",
                   help="show this samples table version (default: the newest, following new commits)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="storage option for S3 etc. (repeatable), e.g. AWS_ENDPOINT_URL=http://...")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")
    p.add_argument("--quiet", action="store_true", help="do not log one line per request")
    p.set_defaults(func=run_view)
