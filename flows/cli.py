"""The ``ctfactory`` command line: turns arguments into typed objects and calls flows or libraries.

Sub-command groups live in their own modules (``flows.cli_*``); each exposes
``register(subparsers)`` that adds its parsers with a ``func`` default taking the parsed namespace
and returning an exit code. Bad input exits with code 2 and one clear line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add sub-commands; each must define register(subparsers).
_COMMAND_MODULES = (
    "flows.cli_run",
    "flows.cli_catalog",
    "flows.cli_models",
    "flows.cli_validate",
    "flows.cli_view",
    "flows.cli_utility",
)

EXIT_BAD_INPUT = 2


def parse_storage_options(pairs: list[str] | None) -> dict[str, str]:
    """Turn repeated ``--storage-option KEY=VALUE`` arguments into a dict (shared by every command)."""
    from factory.errors import SpecError

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--storage-option expects KEY=VALUE, but got {pair!r}. "
                            "Example: --storage-option AWS_ENDPOINT_URL=http://127.0.0.1:9000")
        options[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="ctfactory",
        description="Synthetic 3D CT dataset factory on NVIDIA MAISI.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:  # every one ships with the package: a missing one is a broken install
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    SIGTERM and SIGINT stop a command gracefully (``finally`` blocks and Prefect's ``atexit`` stop of
    its ephemeral server run) with exit code 143 or 130; see :func:`flows.lifetime.interrupt_on_signals`.
    ``serve`` starts Prefect's ephemeral server outside any flow run, so its child-process watch
    (the part of :mod:`flows.lifetime` that covers SIGKILL) is started here; ``run`` starts it in
    :func:`flows.runtime.flow_run_settings`.
    """
    import signal

    from flows.lifetime import interrupt_on_signals, start_descendant_watch_if_ephemeral

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from factory.errors import FactoryError
    from maisi_core.errors import MaisiError

    bad_input: tuple[type[BaseException], ...] = (MaisiError, FactoryError)
    try:
        from catalog.errors import CatalogError

        bad_input += (CatalogError,)
    except ImportError:  # pragma: no cover - catalog is part of the distribution
        pass
    with interrupt_on_signals() as received:
        try:
            if args.command == "serve":
                start_descendant_watch_if_ephemeral()
            code = int(args.func(args) or 0)
        except bad_input as exc:
            print(f"ctfactory {args.command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            received.signum = received.signum or signal.SIGINT
        except BrokenPipeError:  # the reader stopped early (`ctfactory ... | head`): nothing to report
            _silence_stdout()
            return 0
        if received.signum is not None:
            print(f"ctfactory {args.command}: stopped by {signal.Signals(received.signum).name}.", file=sys.stderr)
            return received.exit_code
        return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise BrokenPipeError again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing left to flush there
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
