"""``ctfactory models ...``: list, inspect, verify and convert model directories."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command group."""
    models = subparsers.add_parser("models", help="list, verify and convert model directories")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("list", help="list the presets and the models shipped with the package")
    p.set_defaults(func=_list)

    p = sub.add_parser("info", help="verify a model directory (sha256 of every file) and print its index")
    p.add_argument("path", help="model directory, or the name of a packaged model such as 'default'")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="convert official MAISI .pt checkpoints into a model directory")
    p.add_argument("--preset", default="maisi_ct_rflow", help="architecture: maisi_ct_rflow (default) or maisi_ct_ddpm")
    p.add_argument("--autoencoder", required=True, type=Path, help="e.g. models/autoencoder_v1.pt")
    p.add_argument("--diffusion-unet", required=True, type=Path, help="e.g. models/diff_unet_3d_rflow-ct.pt")
    p.add_argument("--controlnet", required=True, type=Path, help="e.g. models/controlnet_3d_rflow-ct.pt")
    p.add_argument("--dest", required=True, type=Path, help="new model directory")
    p.add_argument("--name", default=None, help="model name recorded in the index")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)


def _list(args: argparse.Namespace) -> int:
    from maisi_core.presets import PRESETS
    from maisi_core.weights import packaged_model_path

    print("presets (architectures, random weights until loaded):")
    for name in sorted(PRESETS):
        print(f"  {name}")
    print("packaged models:")
    found = False
    for name in ("default",):
        path = packaged_model_path(name)
        if path is not None:
            found = True
            print(f"  {name}  {path}")
    if not found:
        print("  (none installed)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from maisi_core.weights import verify_model_dir

    index = verify_model_dir(args.path)
    json.dump(index, sys.stdout, indent=2, sort_keys=True)
    print()
    print(f"ok: {len(index['files'])} files match their sha256; digest {index['digest']}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from maisi_core.presets import get_preset
    from maisi_core.weights import convert_maisi_checkpoints

    digest = convert_maisi_checkpoints(
        config=get_preset(args.preset), autoencoder=args.autoencoder, diffusion_unet=args.diffusion_unet,
        controlnet=args.controlnet, dest=args.dest, name=args.name, overwrite=args.overwrite,
    )
    print(f"wrote {args.dest} (digest {digest})")
    return 0
