"""``ctfactory utility ROOT --real DIR``: does the synthetic data help a segmenter on real data?

Turns the arguments into a :class:`factory.utility.UtilityRequest` and runs the ``downstream-utility``
flow (:mod:`flows.utility`), then prints the per-structure table. Bad input exits with code 2 and one
line; crashed arms exit with code 1 (a re-run resumes them from their checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

PRESETS = ("tiny", "full")
SEGMENTERS = ("segresnet", "dynunet", "nnunet")  # maisi_core.evaluation.utility.UTILITY_SEGMENTERS
EXIT_CRASHED = 1


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"--ratios expects numbers separated by commas, e.g. 1,2, but got {text!r}")
    return values


def _triple(flag: str, kind: type):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) not in (1, 3):
            raise argparse.ArgumentTypeError(f"{flag} expects one number or three separated by commas, "
                                             f"but got {text!r}")
        return values * 3 if len(values) == 1 else values
    return parse


def _structures(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--structures expects MAISI IDs separated by commas, e.g. 1,3,5, but got "
                                         f"{text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``utility`` command."""
    p = subparsers.add_parser(
        "utility", help="downstream utility: train a segmenter with and without the synthetic cases",
        description="Train the same segmenter (same budget and seeds) on real cases only and on real plus ROOT's "
                    "passing synthetic cases at each ratio, score every arm on held-out real cases (Dice and "
                    "surface Dice with bootstrap 95 % CIs, deltas vs real only), and record the results as a new "
                    "datasets row. The real data is recorded only as its fingerprint.")
    p.add_argument("root", help="dataset output root (a local folder: the arms' checkpoints go under ROOT/utility/)")
    p.add_argument("--real", required=True, help="labelled real cases: imagesTr/<case>_0000.nii.gz + "
                                                 "labelsTr/<case>.nii.gz, or images/ + labels/ of the same names")
    p.add_argument("--test", default=None, help="held-out real test cases (default: a seeded 25 %% split of --real)")
    p.add_argument("--ood", default=None, help="an out-of-distribution test set, scored separately")
    p.add_argument("--ratios", type=_ratios, default=(1.0,), help="synthetic cases per real case, one arm each "
                                                                   "(default 1)")
    p.add_argument("--synthetic-only", action="store_true", help="add an arm trained on synthetic cases only")
    p.add_argument("--segmenter", choices=SEGMENTERS, default="segresnet")
    p.add_argument("--preset", choices=PRESETS, default="full", help="training budget preset (tiny: seconds, tests)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per arm (default: the preset's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="optimiser steps per epoch (default: the "
                                                                       "preset's)")
    p.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--spacing-mm", type=_triple("--spacing-mm", float), default=None,
                   help="training grid in mm, e.g. 6 or 1.5,1.5,3 (default: the preset's)")
    p.add_argument("--patch-size", type=_triple("--patch-size", int), default=None,
                   help="training patch in voxels, multiples of 8, e.g. 32 (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of every arm and of the split (default: the preset's)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the CIs (default: preset's)")
    p.add_argument("--structures", type=_structures, default=None,
                   help="MAISI IDs trained and scored, e.g. 1,3,5 (default: every ID but 0 and 200 in the real labels)")
    p.add_argument("--label-mapping", choices=("maisi", "totalsegmentator"), default="maisi",
                   help="how the real labels map to MAISI IDs")
    p.add_argument("--as-of", type=int, default=None, help="samples version whose passing cases are the synthetic "
                                                           "pool (default: the newest)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=1, help="arms trained at once on threads (default 1)")
    p.add_argument("--dask-local-workers", type=int, default=None, help="train the arms on a temporary local Dask "
                                                                        "cluster (one worker per GPU on CUDA)")
    p.add_argument("--dask-address", default=None, help="train the arms on an existing Dask scheduler")
    p.add_argument("--no-card", action="store_true", help="do not rewrite ROOT/dataset_card.html")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run_utility_command)


def build_request(args: argparse.Namespace):
    """The :class:`factory.utility.UtilityRequest` the arguments describe (validated)."""
    from pydantic import ValidationError

    from factory.errors import ValidationInputError
    from factory.machine import resolved_device
    from factory.utility import UtilityRequest
    from maisi_core.evaluation.utility import UtilityConfig

    base = UtilityConfig.tiny() if args.preset == "tiny" else UtilityConfig.full()
    changes = {"segmenter": args.segmenter, "device": resolved_device(args.device)}
    for name in ("epochs", "steps_per_epoch", "learning_rate", "spacing_mm", "patch_size", "seed", "bootstrap",
                 "structures"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    config = dataclasses.replace(base, **changes)
    try:
        return UtilityRequest(real=args.real, test=args.test, ood=args.ood, ratios=args.ratios,
                              synthetic_only=args.synthetic_only, as_of=args.as_of,
                              label_mapping=args.label_mapping, config=config.to_dict())
    except ValidationError as exc:
        raise ValidationInputError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


def run_utility_command(args: argparse.Namespace) -> int:
    """Handle ``utility``: run the flow and print the table."""
    import textwrap
    import time

    from catalog.report_utility import reading
    from factory.errors import ValidationInputError
    from factory.utility import ArmsCrashedError, format_table
    from flows.cli import parse_storage_options
    from flows.utility import run_utility

    if args.workers < 1:
        raise ValidationInputError(f"ctfactory utility expects --workers >= 1, but got --workers={args.workers}.")
    request = build_request(args)
    t0 = time.perf_counter()
    try:
        out = run_utility(request, args.root, storage_options=parse_storage_options(args.storage_option),
                          workers=args.workers, dask_local_workers=args.dask_local_workers,
                          dask_address=args.dask_address, publish=not args.no_card)
    except ArmsCrashedError as exc:
        print(f"ctfactory utility: {exc}", file=sys.stderr)
        return EXIT_CRASHED
    plan = out["plan"]
    print(f"synthetic pool: samples version {plan.samples_version}; test set: {plan.test_source}")
    print(format_table(out["summary"]))
    print("\n" + textwrap.fill(reading(out["summary"].to_dict()["rows"], {}), width=110))
    if out["ood"] is not None:
        print("\nout-of-distribution set (--ood):")
        print(format_table(out["ood"]))
        print("\n" + textwrap.fill(reading(out["ood"].to_dict()["rows"], {}, ood=True), width=110))
    where = (f"datasets version {out['datasets_version']}" if out["datasets_version"] is not None
             else "already recorded, no new row")
    print(f"\nrecorded in the catalog ({where}); arms under utility/{plan.samples_version}/{plan.key}/; "
          f"wall {time.perf_counter() - t0:.1f} s")
    return 0
