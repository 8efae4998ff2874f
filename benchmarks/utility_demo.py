"""Write a labelled phantom CT set as an nnU-Net-style folder: the stand-in "real" set of the utility demo.

The cases are procedural phantoms (:mod:`maisi_core.anatomy.phantom`) painted by the intensity model
(:func:`maisi_core.anatomy.intensity.synthesize_ct`), as :mod:`maisi_core.training.data` draws them. They are
NOT real CT: a utility measured against them says how the synthetic cases help a segmenter on phantom
renders, nothing about patients. The folder holds ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``
(MAISI IDs) and a ``dataset.json``.

Usage::

    python benchmarks/utility_demo.py /tmp/phantom-real --cases 16
    ctfactory utility ctfactory-demo --real /tmp/phantom-real --ratios 0.5 --synthetic-only \\
        --structures 1,3,5,14 --preset tiny --spacing-mm 12 --patch-size 32 --learning-rate 0.01 \\
        --epochs 10 --steps-per-epoch 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom
from maisi_core.io import save_image, save_label

# The demo spec's two cohorts: chest_nodules spans chest + abdomen, abdomen_healthy abdomen + lower.
REGIONS = (("chest", "abdomen"), ("abdomen", "lower"))
SIZE_VOX = (64, 64, 64)
SPACING_MM = (6.0, 6.0, 6.0)
FIRST_SEED = 7_000_000  # far from the seeds the demo spec derives


def write_phantom_folder(dest: Path, *, cases: int, first_seed: int = FIRST_SEED) -> list[str]:
    """Write ``cases`` phantom CTs under ``dest``; return their case ids (``phantom_000``, ...)."""
    (dest / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dest / "labelsTr").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(cases):
        seed = first_seed + i
        case = generate_phantom(PhantomConfig(REGIONS[i % len(REGIONS)], SIZE_VOX, SPACING_MM), seed=seed)
        hu = synthesize_ct(case.label_map, SPACING_MM, seed=seed)
        name = f"phantom_{i:03d}"
        save_image(str(dest / "imagesTr" / f"{name}_0000.nii.gz"), hu, case.affine, overwrite=True)
        save_label(str(dest / "labelsTr" / f"{name}.nii.gz"), case.label_map, case.affine, overwrite=True)
        ids.append(name)
    meta = {"name": "phantom-real-standin", "description": "procedural phantoms painted by the intensity model; "
            "NOT real CT", "channel_names": {"0": "CT"}, "numTraining": cases, "file_ending": ".nii.gz",
            "labels_are": "MAISI IDs"}
    (dest / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write (created)")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    args = parser.parse_args(argv)
    ids = write_phantom_folder(args.dest, cases=args.cases, first_seed=args.first_seed)
    print(f"wrote {len(ids)} phantom cases to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
