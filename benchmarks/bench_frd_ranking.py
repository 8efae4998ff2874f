"""Do the published FRD v1 and the fast radiomics-style fallback rank degraded sets behind a good one?

On the same cases: a reference set of phantom CTs (``maisi_core.anatomy.phantom`` label maps rendered by
``intensity.synthesize_ct``) against (a) a fresh good set from the same source (new phantoms, new renders),
and that good set degraded by (b) Gaussian noise, (c) Gaussian blur, (d) a global HU shift. Prints both
distances per set, whether each ranks every degraded set behind the good one, and the time of each call.
FRD v1 needs the ``frd`` extra; without it only the fallback column is filled.

    python benchmarks/bench_frd_ranking.py --n 8 --size 32 --spacing-mm 6
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom
from maisi_core.evaluation.features import MemoizedExtractor, RadiomicsFeatureExtractor
from maisi_core.evaluation.frd import FRD_EXTRACTOR, frd_available, frd_v1
from maisi_core.evaluation.frechet import compute_frechet
from maisi_core.io import ImageVolume


def phantom_set(n: int, *, first_seed: int, size: int, spacing_mm: float) -> list[ImageVolume]:
    """Return ``n`` phantom CTs (HU, with their affines) drawn from seeds ``first_seed ...``."""
    config = PhantomConfig(regions=("chest", "abdomen"), output_size_vox=(size,) * 3, spacing_mm=(spacing_mm,) * 3)
    out = []
    for i in range(n):
        case = generate_phantom(config, seed=first_seed + i)
        image = synthesize_ct(case.label_map, config.spacing_mm, seed=first_seed + 7919 + i)
        out.append(ImageVolume(image, case.affine))
    return out


def degrade(volumes: list[ImageVolume], kind: str, *, seed: int = 0) -> list[ImageVolume]:
    """Return the volumes with ``noise`` (sigma 80 HU), ``blur`` (sigma 1.5 voxels) or ``shift`` (+120 HU)."""
    rng = np.random.default_rng(seed)
    ops = {
        "noise": lambda a: a + rng.normal(0.0, 80.0, a.shape).astype(np.float32),
        "blur": lambda a: ndimage.gaussian_filter(a, sigma=1.5),
        "shift": lambda a: a + np.float32(120.0),
    }
    return [ImageVolume(ops[kind](v.array).astype(np.float32), v.affine) for v in volumes]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="cases per set")
    parser.add_argument("--size", type=int, default=32, help="edge length in voxels")
    parser.add_argument("--spacing-mm", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=None, help="FRD v1 extraction processes")
    parser.add_argument("--no-frd", action="store_true", help="fallback only")
    args = parser.parse_args(argv)

    reference = phantom_set(args.n, first_seed=1000, size=args.size, spacing_mm=args.spacing_mm)
    good = phantom_set(args.n, first_seed=2000, size=args.size, spacing_mm=args.spacing_mm)
    sets = {"good": good, **{k: degrade(good, k) for k in ("noise", "blur", "shift")}}
    run_frd = frd_available() and not args.no_frd
    print(f"{args.n} cases per set, {args.size}^3 at {args.spacing_mm} mm; FRD v1: "
          f"{FRD_EXTRACTOR if run_frd else 'not run'}")
    ext = MemoizedExtractor(RadiomicsFeatureExtractor())
    rows = {}
    print(f"{'set':<6} {'fd_radiomics (fallback)':>24} {'s':>6} {'FRD v1 log(d²)':>16} {'s':>7}", flush=True)
    for name, vols in sets.items():
        t0 = time.perf_counter()
        fallback = compute_frechet([v.array for v in reference], [v.array for v in vols], ext).mean
        t1 = time.perf_counter()
        frd = frd_v1(reference, vols, num_workers=args.workers) if run_frd else float("nan")
        t2 = time.perf_counter()
        rows[name] = (fallback, t1 - t0, frd, t2 - t1)
        print(f"{name:<6} {fallback:>24.4g} {t1 - t0:>6.1f} {frd:>16.4g} {t2 - t1:>7.1f}", flush=True)
    for column, label in ((0, "fallback"), (2, "FRD v1")):
        if column == 2 and not run_frd:
            continue
        behind = {k: rows[k][column] > rows["good"][column] for k in ("noise", "blur", "shift")}
        print(f"{label}: every degraded set behind good: {all(behind.values())} {behind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
