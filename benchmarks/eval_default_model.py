"""Evaluate a model (default: the packaged ``default``) on fresh phantom masks: QC, organ HU error, FRD-style distance.

For ``--cases`` masks drawn with phantom seeds ``--seed-base + i`` (never used in training: the training
corpus uses seeds ``seed * 1_000_003 + i`` with i < 1000), the model generates one 64³ CT at 6 mm, and:

(a) QC pass rate with :func:`maisi_core.evaluation.qc.check_case`, every check on (organ HU, orientation, tumour
    visibility and size, label-image agreement);
(b) per-organ mean absolute error of generated organ median HU against the intensity model's organ medians
    (:func:`maisi_core.anatomy.intensity.tissue_hu_medians`), with the same error of the intensity model's own phantom
    CTs of those masks as a floor (bone's reference, the cortex/cancellous midpoint, is a poor one);
(c) the FRD-style Fréchet distance (radiomics features, :func:`maisi_core.evaluation.frechet.compute_frechet`) of generated
    volumes vs held-out phantom CTs (set A), next to two baselines measured in the same run: set A vs another
    held-out set B, and set A vs set A with Gaussian noise (sigma ``--noise-hu``).

(d) on ``--tumor-cases`` further fresh masks that all hold a tumour (lung, hepatic, pancreatic: the types whose
    contrast QC judges), the tumour-contrast pass rate and the median lesion contrast per type (tumour median
    minus its host ring, :func:`maisi_core.evaluation.qc_tumor.measure_tumor`), next to the intensity model's own CTs of the
    same masks; previews cut through the tumour.

Writes ``eval.json`` and preview PNGs (three orthogonal slices with label overlay) to ``--out``; with
``--loss-log`` also ``loss_curves.png`` from training ``loss_log.jsonl`` files (one row of panels per run).

Usage::

    python benchmarks/eval_default_model.py --out /tmp/eval_default [--model default] [--cases 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from maisi_core import MaisiPipeline, preview

from maisi_core.evaluation import qc
from maisi_core.evaluation.frechet import compute_frechet
from maisi_core.anatomy.intensity import synthesize_ct, tissue_hu_medians
from maisi_core.anatomy.labels import label_name, tumor_ids_in
from maisi_core.anatomy.phantom import PhantomConfig, TumorSpec, generate_phantom
from maisi_core.evaluation.qc_tumor import measure_tumor
from maisi_core.training.data import generate_phantom_case

REGIONS = (("chest", "abdomen"), ("chest",), ("abdomen",), ("abdomen", "lower"), ("lower",),
           ("chest", "abdomen", "lower"), ("head_neck", "chest"))
TUMORS = {("chest",): 23, ("abdomen",): 26, ("chest", "abdomen"): 26, ("abdomen", "lower"): 24}
SIZE, SPACING = (64, 64, 64), (6.0, 6.0, 6.0)
TRAINING_TUMOR_MM = (10.0, 40.0)  # generate_phantom_case's diameter range
# the tumour set: (regions, tumour ID, diameter range mm), cycled
TUMOR_SET = ((("chest",), 23, (15.0, 30.0)), (("abdomen",), 26, (15.0, 35.0)),
             (("chest", "abdomen"), 23, (15.0, 30.0)), (("abdomen",), 24, (15.0, 30.0)))


def phantom_ct(seed: int, index: int):
    """The mask and the intensity model's CT (HU) of eval case ``index`` (phantom seed ``seed``)."""
    regions = REGIONS[index % len(REGIONS)]
    tumor = TUMORS.get(regions) if index % 3 == 0 else None
    case = generate_phantom_case(seed, output_size_vox=SIZE, spacing_mm=SPACING, regions=regions, tumor_id=tumor)
    return case.label_map, case.image * 2000.0 - 1000.0


def tumor_ct(seed: int, index: int):
    """Mask, intensity-model CT (HU), tumour ID and diameter range of tumour-set case ``index``."""
    regions, tumor_id, size_mm = TUMOR_SET[index % len(TUMOR_SET)]
    case = generate_phantom(PhantomConfig(regions, SIZE, SPACING, TumorSpec(tumor_id, size_mm)), seed=seed)
    return case.label_map, case.affine, synthesize_ct(case.label_map, SPACING, seed=seed), tumor_id, size_mm


def run_tumor_set(pipe, args) -> dict:
    """Generate the tumour set; return its QC and contrast figures (and write previews through the tumours)."""
    per_type: dict[str, dict[str, list]] = {}
    passed, contrast_ok = [], []
    for i in range(args.tumor_cases):
        label_map, affine, phantom, tumor_id, size_mm = tumor_ct(args.seed_base + 300_000 + i, i)
        out = pipe.generate(label_map, spacing_mm=SPACING, seed=i, num_inference_steps=args.steps)
        result = qc.check_case(out.image, label_map, affine=affine, expected_tumors={tumor_id: size_mm})
        kinds = {f.check for f in result.failures}
        passed.append(result.passed)
        contrast_ok.append("tumor_contrast" not in kinds and "tumor" not in kinds)
        name = label_name(tumor_id)
        row = per_type.setdefault(name, {"generated": [], "phantom": [], "pass": []})
        row["generated"].append(result.tumor_contrast_hu.get(name, float("nan")))  # QC measured it already
        row["phantom"].append(measure_tumor(phantom, label_map, tumor_id, affine).contrast_hu)
        row["pass"].append(contrast_ok[-1])
        if i < args.previews:
            preview.save_preview_png(out.image, label_map, args.out / f"tumor_generated_{i:02d}.png")
            preview.save_preview_png(phantom, label_map, args.out / f"tumor_phantom_{i:02d}.png")
        print(f"tumour case {i:2d} {name}: contrast {row['generated'][-1]:+.0f} HU "
              f"(phantom {row['phantom'][-1]:+.0f}), qc {result.summary()}", flush=True)
    return {
        "cases": args.tumor_cases, "qc_pass_rate": float(np.mean(passed)) if passed else None,
        "tumor_contrast_pass_rate": float(np.mean(contrast_ok)) if contrast_ok else None,
        "per_type": {name: {"n": len(v["generated"]), "contrast_pass_rate": float(np.mean(v["pass"])),
                            "median_contrast_hu_generated": float(np.nanmedian(v["generated"])),
                            "median_contrast_hu_phantom": float(np.nanmedian(v["phantom"]))}
                     for name, v in per_type.items()},
    }


def organ_reference_hu() -> dict[str, float]:
    """Organ -> expected median HU of the intensity model (median over the organ's label IDs)."""
    table = tissue_hu_medians()
    return {organ: float(np.median([table[i] for i in ids])) for organ, ids in qc.ORGAN_LABEL_IDS.items()}


def organ_errors(volumes, label_maps) -> dict[str, dict[str, float]]:
    """Organ -> {mae_hu, mean_median_hu, n} of organ medians vs :func:`organ_reference_hu`."""
    ref = organ_reference_hu()
    per: dict[str, list[float]] = {}
    for vol, lab in zip(volumes, label_maps, strict=True):
        for organ, value in qc.organ_hu_medians(vol, lab).items():
            per.setdefault(organ, []).append(value)
    return {o: {"mae_hu": float(np.mean(np.abs(np.array(v) - ref[o]))), "mean_median_hu": float(np.mean(v)),
                "reference_hu": ref[o], "n": len(v)} for o, v in per.items()}


def plot_loss(log_paths: list[Path], out_png: Path) -> None:
    """Plot each run's stage losses (raw and 25-step moving average), one row per ``loss_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [[json.loads(line) for line in p.read_text().splitlines() if line] for p in log_paths]
    panels = [(i, s) for i, rows in enumerate(runs) for s in ("vae", "unet", "controlnet")
              if any(r["stage"] == s for r in rows)]
    cols = 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (i, stage) in zip(axes.flat, panels):
        rows = runs[i]
        steps = np.array([r["step"] for r in rows if r["stage"] == stage])
        key = "l1" if stage == "vae" else "loss"
        loss = np.array([r[key] for r in rows if r["stage"] == stage])
        ax.plot(steps, loss, lw=0.5, alpha=0.4, label=key)
        k = min(25, len(loss))
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
        what = "L1 reconstruction" if stage == "vae" else "rectified-flow L1"
        ax.set_title(f"run {i + 1}: {stage}, {what}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--tumor-cases", type=int, default=50, help="fresh masks that all hold a tumour")
    parser.add_argument("--seed-base", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    parser.add_argument("--noise-hu", type=float, default=30.0)
    parser.add_argument("--previews", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loss-log", type=Path, nargs="+", default=None, help="loss_log.jsonl files, in order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.loss_log is not None:
        plot_loss(args.loss_log, args.out / "loss_curves.png")

    t0 = time.perf_counter()
    pipe = MaisiPipeline.from_pretrained(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    labels, generated, paired_phantoms, qc_results, gen_s = [], [], [], [], []
    for i in range(args.cases):
        label_map, phantom = phantom_ct(args.seed_base + i, i)
        t = time.perf_counter()
        out = pipe.generate(label_map, spacing_mm=SPACING, seed=i, num_inference_steps=args.steps)
        gen_s.append(time.perf_counter() - t)
        tumors = {t: TRAINING_TUMOR_MM for t in tumor_ids_in(label_map)}
        result = qc.check_case(out.image, label_map, affine=out.affine, expected_tumors=tumors)
        labels.append(label_map)
        generated.append(out.image)
        paired_phantoms.append(phantom)
        qc_results.append(result)
        if i < args.previews:
            preview.save_preview_png(out.image, label_map, args.out / f"generated_{i:02d}.png")
            preview.save_preview_png(phantom, label_map, args.out / f"phantom_{i:02d}.png")
        print(f"case {i:2d} {REGIONS[i % len(REGIONS)]}: {gen_s[-1]:.1f} s, qc {result.summary()}", flush=True)

    tumor_report = run_tumor_set(pipe, args)
    set_a = [phantom_ct(args.seed_base + 100_000 + i, i)[1] for i in range(args.cases)]
    set_b = [phantom_ct(args.seed_base + 200_000 + i, i)[1] for i in range(args.cases)]
    rng = np.random.default_rng(0)
    noisy_a = [v + rng.normal(0.0, args.noise_hu, v.shape).astype(np.float32) for v in set_a]
    frd = {
        "generated_vs_heldout": compute_frechet(set_a, generated),
        "baseline_heldout_vs_heldout": compute_frechet(set_a, set_b),
        f"baseline_heldout_vs_heldout_plus_noise_{args.noise_hu:g}hu": compute_frechet(set_a, noisy_a),
    }
    failures: dict[str, int] = {}
    for r in qc_results:
        for f in r.failures:
            failures[f.organ or f.check] = failures.get(f.organ or f.check, 0) + 1
    report = {
        "model": args.model, "model_digest": pipe.model_digest, "cases": args.cases, "seed_base": args.seed_base,
        "size_vox": SIZE, "spacing_mm": SPACING,
        "inference_steps": args.steps or pipe.config.scheduler.default_num_inference_steps,
        "qc_pass_rate": float(np.mean([r.passed for r in qc_results])), "qc_failures_by_organ": failures,
        "tumor_set": tumor_report,
        "organ_mae_generated": organ_errors(generated, labels),
        "organ_mae_phantom_same_masks": organ_errors(paired_phantoms, labels),
        "frd": {k: {"mean": v.mean, "per_plane": v.per_plane, "label": v.label} for k, v in frd.items()},
        "seconds": {"load": load_s, "generate_median": float(np.median(gen_s)), "generate_max": float(np.max(gen_s))},
        "threads": args.threads,
    }
    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("qc_pass_rate", "qc_failures_by_organ", "tumor_set", "seconds")},
                     indent=2))
    for name, block in (("generated", report["organ_mae_generated"]), ("phantom", report["organ_mae_phantom_same_masks"])):
        print(name, {o: round(v["mae_hu"], 1) for o, v in block.items()})
    print({k: round(v["mean"], 3) for k, v in report["frd"].items()})


if __name__ == "__main__":
    main()
