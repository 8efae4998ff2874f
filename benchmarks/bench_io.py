"""Benchmark: maisi_core.io.save_image against nibabel's default ``to_filename`` (.nii.gz).

Volume: 512x512x128 int16 with CT-like content (smooth body, lungs, spine, Gaussian noise of 15 HU),
not random bytes. Reports seconds (best of ``--repeat``) and file size for each writer, the speed ratio
(baseline = nibabel's default), and the read time of our file.

Run: ``python benchmarks/bench_io.py [--repeat 3] [--shape 512 512 128]``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from maisi_core import io as mio
from maisi_core import nifti_gzip

logger = logging.getLogger("bench_io")


def make_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Return a CT-like int16 HU volume ``(X, Y, Z)``: air, soft-tissue body, two lungs, spine, noise."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, s, dtype=np.float32) for s in shape)
    X, Y = np.meshgrid(x, y, indexing="ij")
    body = (X / 0.85) ** 2 + (Y / 0.6) ** 2 <= 1
    lungs = (((np.abs(X) - 0.38) / 0.28) ** 2 + (Y / 0.42) ** 2) <= 1
    spine = (X / 0.08) ** 2 + ((Y - 0.45) / 0.08) ** 2 <= 1
    plane = np.full(X.shape, -1000.0, np.float32)
    plane[body] = 40.0
    plane[body & lungs] = -850.0
    plane[spine] = 450.0
    plane = ndimage.gaussian_filter(plane, 2.0)
    vol = np.repeat(plane[:, :, None], shape[2], axis=2)
    vol += (30.0 * np.sin(3.0 * z))[None, None, :] * body[:, :, None]  # slow change along z
    vol += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def best_of(fn, repeat: int) -> float:
    """Return the fastest wall time of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Run the benchmark and log one line per writer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 128))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vol = make_ct(tuple(args.shape))
    affine = mio.affine_from_spacing((0.7, 0.7, 2.5))
    backend = nifti_gzip.BACKEND
    with tempfile.TemporaryDirectory() as tmp:
        base_path, ours_path = Path(tmp) / "nibabel.nii.gz", Path(tmp) / "ours.nii.gz"

        def baseline():
            nib.Nifti1Image(vol, affine).to_filename(base_path)

        def ours():
            mio.save_image(ours_path, vol, affine, overwrite=True)

        t_base = best_of(baseline, args.repeat)
        t_ours = best_of(ours, args.repeat)
        t_read = best_of(lambda: mio.load_image(ours_path), args.repeat)
        t_read_nib = best_of(lambda: np.asarray(nib.load(base_path).dataobj), args.repeat)
        np.testing.assert_array_equal(np.asarray(nib.load(ours_path).dataobj), vol)
        raw_mb = vol.nbytes / 1e6
        logger.info("volume %s int16, %.1f MB raw; gzip backend for ours: %s", tuple(vol.shape), raw_mb, backend)
        logger.info("nibabel to_filename (default, level 1): %.3f s  %.2f MB", t_base, base_path.stat().st_size / 1e6)
        logger.info("maisi_core.io.save_image            : %.3f s  %.2f MB", t_ours, ours_path.stat().st_size / 1e6)
        logger.info("write speed-up (baseline / ours)    : %.2fx", t_base / t_ours)
        logger.info("read: nibabel.load %.3f s, load_image %.3f s", t_read_nib, t_read)


if __name__ == "__main__":
    main()
