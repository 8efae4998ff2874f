"""``ctfactory models ...``: list, inspect, verify, convert and train model directories."""

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

    p = sub.add_parser("train", help="train (or fine-tune) the VAE, UNet and ControlNet into a model directory")
    p.add_argument("--preset", default="default", help="architecture for a fresh model (default: default)")
    p.add_argument("--out", required=True, type=Path, help="new model directory")
    p.add_argument("--from", dest="from_model", default=None,
                   help="model directory (or 'default') to fine-tune; overrides --preset")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of NIfTI pairs (imagesTr/+labelsTr/ or *_image/*_label); default: phantom corpus")
    p.add_argument("--stages", default="vae,unet,controlnet", help="comma-separated stages to train")
    p.add_argument("--steps-vae", type=int, default=500)
    p.add_argument("--steps-unet", type=int, default=500)
    p.add_argument("--steps-controlnet", type=int, default=500)
    p.add_argument("--size-vox", type=int, default=None, help="cubic case size (default: 64 for 'default', else 32)")
    p.add_argument("--spacing-mm", type=float, default=None, help="case spacing (default: 384 mm / size)")
    p.add_argument("--phantom-cases", type=int, default=200, help="phantom corpus size (without --data)")
    p.add_argument("--corpus-workers", type=int, default=1,
                   help="processes that draw the phantom corpus (same cases for any number)")
    p.add_argument("--batch-vae", type=int, default=None, help="VAE patches per step (default 4)")
    p.add_argument("--batch-unet", type=int, default=None, help="UNet cases per step (default 4)")
    p.add_argument("--batch-controlnet", type=int, default=None, help="ControlNet cases per step (default 2)")
    p.add_argument("--vae-patch-vox", type=int, default=None,
                   help="cubic VAE training patch edge (default 32; the case size trains on whole volumes)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 50)")
    p.add_argument("--roi-loss-weight", type=float, default=1.0, help="loss weight of organ/tumour latent voxels")
    for stage, lr in (("vae", 1e-3), ("unet", 5e-4), ("controlnet", 3e-4)):
        p.add_argument(f"--lr-{stage}", type=float, default=None, help=f"peak learning rate of the {stage} (default {lr:g})")
    p.add_argument("--tumor-loss-weight", type=float, default=1.0,
                   help="extra loss weight of tumour (latent) voxels, times --roi-loss-weight (upstream: 100)")
    p.add_argument("--thin-loss-weight", type=float, default=1.0,
                   help="extra loss weight of thin structures (ribs, spinal cord, trachea, airway)")
    p.add_argument("--tumor-probability", type=float, default=0.3,
                   help="share of phantom corpus cases that get a tumour (without --data)")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="train only the VAE decoder (keeps the latent space of a trained model)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget for all stages")
    p.add_argument("--anneal-to-budget", action="store_true",
                   help="with --max-minutes: decay the learning rate with the spent time too, so a run the "
                        "budget stops early still ends annealed")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is fastest on a busy shared CPU: OpenMP spin-waits)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT.checkpoints next to --out")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint folder")
    p.set_defaults(func=_train)


def _list(args: argparse.Namespace) -> int:
    from maisi_core.engine.presets import PRESETS
    from maisi_core.engine.model_dir import packaged_model_path

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
    from maisi_core.engine.model_dir import verify_model_dir

    index = verify_model_dir(args.path)
    json.dump(index, sys.stdout, indent=2, sort_keys=True)
    print()
    print(f"ok: {len(index['files'])} files match their sha256; digest {index['digest']}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from maisi_core.engine.presets import get_preset
    from maisi_core.engine.weights import convert_maisi_checkpoints

    digest = convert_maisi_checkpoints(
        config=get_preset(args.preset), autoencoder=args.autoencoder, diffusion_unet=args.diffusion_unet,
        controlnet=args.controlnet, dest=args.dest, name=args.name, overwrite=args.overwrite,
    )
    print(f"wrote {args.dest} (digest {digest})")
    return 0


def _train_corpus(args: argparse.Namespace, config):
    from maisi_core.training.data import PhantomCorpusConfig, generate_phantom_corpus, load_nifti_corpus

    size = (args.size_vox or (64 if config.name == "default" else 32),) * 3
    spacing = args.spacing_mm or 384.0 / size[0]
    if args.data is not None:
        cases = load_nifti_corpus(args.data, output_size_vox=size, spacing_mm=(spacing,) * 3,
                                  intensity_range_hu=config.intensity_range)
        return cases, f"NIfTI pairs from {args.data} ({len(cases)} cases, {size} at {spacing:g} mm)"
    corpus = PhantomCorpusConfig(num_cases=args.phantom_cases, output_size_vox=size,
                                 spacing_xy_mm=(0.83 * spacing, 1.17 * spacing),
                                 spacing_z_mm=(0.83 * spacing, 1.17 * spacing),
                                 tumor_probability=args.tumor_probability)
    cases = generate_phantom_corpus(corpus, seed=args.seed, intensity_range_hu=config.intensity_range,
                                    workers=args.corpus_workers)
    return cases, f"procedural phantom + intensity model ({len(cases)} cases, {size}, seed {args.seed})"


def _train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from maisi_core.engine.presets import get_preset
    from maisi_core.training.pipeline import TrainingConfig, train_pipeline
    from maisi_core.engine.weights import load_model_dir, resolve_model_path

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    training = TrainingConfig(
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        steps_vae=args.steps_vae, steps_unet=args.steps_unet, steps_controlnet=args.steps_controlnet,
        roi_loss_weight=args.roi_loss_weight, tumor_loss_weight=args.tumor_loss_weight,
        thin_loss_weight=args.thin_loss_weight,
        vae_decoder_only=args.vae_decoder_only,
        max_minutes=args.max_minutes, anneal_to_budget=args.anneal_to_budget, seed=args.seed,
        **{name: value for name in ("batch_vae", "batch_unet", "batch_controlnet", "vae_patch_vox", "checkpoint_every",
                                  "lr_vae", "lr_unet", "lr_controlnet")
           if (value := getattr(args, name)) is not None},
    )
    if args.from_model is not None:
        start = resolve_model_path(args.from_model)
        config = load_model_dir(start, device="cpu").config
    else:
        start = config = get_preset(args.preset)
    cases, description = _train_corpus(args, config)
    bars: dict[str, tqdm] = {}

    def show(progress) -> None:
        bar = bars.get(progress.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[progress.stage] = tqdm(total=progress.total_steps, desc=progress.stage, unit="step",
                                              initial=progress.step - 1)
        bar.update(1)
        bar.set_postfix(loss=f"{progress.loss:.4f}")

    checkpoint_dir = args.checkpoint_dir or args.out.with_name(args.out.name + ".checkpoints")
    try:
        result = train_pipeline(start, cases, out_dir=args.out, checkpoint_dir=checkpoint_dir, training=training,
                                device=args.device, callback=show, resume=args.resume, data_description=description)
    finally:
        for bar in bars.values():
            bar.close()
    print(f"wrote {result.model_dir} (digest {result.digest}); checkpoints and loss log in {checkpoint_dir}")
    return 0

