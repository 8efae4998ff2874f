"""``ctfactory validate ROOT``: dataset-level metrics stored in the catalog's ``datasets`` table."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` command."""
    p = subparsers.add_parser(
        "validate", help="FRD-style Fréchet distances, diversity and memorisation of a generated dataset",
        description="Compute dataset metrics of ROOT's passing cases against a reference set and append them "
                    "to the datasets table (columns fd_*, diversity_*, memorisation_*).")
    p.add_argument("root", help="dataset output root (local path or s3://...)")
    p.add_argument("--reference", default="phantom",
                   help="'phantom' (default: intensity-model renders of the generated masks) or a folder with "
                        "reference.json or NIfTI images (e.g. from scripts/fetch_real_ct.py)")
    p.add_argument("--extractor", default="radiomics", choices=("radiomics", "astra"),
                   help="features: radiomics (default, no weights) or astra (I3ResNet-152; needs the astra extra)")
    p.add_argument("--image-distance", default=None, choices=("auto", "frd_v1", "fallback"),
                   help="auto (default): the published FRD v1 (fd_frd_v1, needs the frd extra) beside the fast "
                        "radiomics-style fallback when installed; frd_v1: require it; fallback: skip it")
    p.add_argument("--as-of", type=int, default=None, help="samples table version to validate")
    p.add_argument("--max-cases", type=int, default=64)
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-record", action="store_true", help="print the metrics without writing them")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from catalog.store import open_catalog
    from flows.cli import parse_storage_options
    from factory.validate import compute_dataset_metrics, load_generated, record_validation

    cat = open_catalog(args.root, parse_storage_options(args.storage_option) or None)
    generated = load_generated(cat, as_of=args.as_of, max_cases=args.max_cases)
    metrics = compute_dataset_metrics(generated, args.reference, extractor=args.extractor,
                                      image_distance=args.image_distance)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.6g}")
    if not args.no_record:
        version = record_validation(cat, metrics, reference=args.reference)
        print(f"recorded in {cat.root_uri}/catalog/datasets (version {version})")
    return 0
