"""The tiny dataset spec most factory and flow tests run: one cohort on ``preset:tiny`` (no tests here).

Each test names its own values (dataset name, seed, count, steps, runtime, ...): sample IDs and seeds
derive from the spec's content, so a test's spec stays what it was written as.
"""

from __future__ import annotations

from pathlib import Path

UNREACHABLE_QC = "{thresholds_hu: {lung: [3000, 3071]}, max_retries: 1}"
"""QC settings no case passes (no lung reaches 3000 HU): every attempt fails, one retry."""


def _triple(value: float | tuple[float, float, float]) -> str:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    return "[" + ", ".join(str(v) for v in values) + "]"


def tiny_spec_text(root: str | Path, *, name: str = "tiny", seed: int | None = None, cohort: str = "c",
                   count: int = 1, body_region: str = "chest", pathology: str | None = None,
                   size: int | tuple[int, int, int] = 32, spacing: float | tuple[float, float, float] = 8,
                   steps: int | None = None, qc: str | None = "{organ_hu_check: false}",
                   runtime: str | None = None, extra: str = "") -> str:
    """YAML of a spec writing to ``root`` with one cohort of ``count`` cases of ``size`` voxels at ``spacing`` mm.

    ``pathology``, ``qc`` and ``runtime`` are YAML flow mappings written as given (``qc=None`` leaves the
    line out: the default QC settings); ``seed`` and ``steps`` (``num_inference_steps``) are left out
    when None; ``extra`` is appended as top-level lines (each ending in a newline).
    """
    lines = [f"name: {name}", 'version: "1"', "model: preset:tiny", f"output_root: {root}"]
    if seed is not None:
        lines.append(f"seed: {seed}")
    lines += ["cohorts:", f"  - name: {cohort}", f"    count: {count}", f"    body_region: {body_region}"]
    if pathology is not None:
        lines.append(f"    pathology: {pathology}")
    lines += [f"    output_size: {_triple(size)}", f"    spacing_mm: {_triple(spacing)}"]
    if steps is not None:
        lines.append(f"    num_inference_steps: {steps}")
    if qc is not None:
        lines.append(f"    qc: {qc}")
    if runtime is not None:
        lines.append(f"runtime: {runtime}")
    return "\n".join(lines) + "\n" + extra


def tiny_spec(root: str | Path, **fields):
    """The parsed :class:`factory.spec.DatasetSpec` of :func:`tiny_spec_text` (same keywords)."""
    from factory.spec import parse_spec

    return parse_spec(tiny_spec_text(root, **fields))
