"""The HTML dataset card: one self-contained file (plots and previews inlined as base64 PNG).

It shows what generated the dataset (spec, spec_id, model and digest, code version, seeds), counts
per cohort, QC pass rates and failure reasons, organ median-HU distributions against MAISI's
reference ranges, dataset-level metrics, and preview slices of a few cases.
"""

from __future__ import annotations

import json

import base64
import html
import io
import logging
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from catalog.errors import ReportError
from catalog.fs import filesystem, is_remote
from catalog.export import load_nifti
from catalog.store import Catalog

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #3b6ea5;padding-bottom:.2em}h2{color:#3b6ea5;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}
th{background:#eef3f8}pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:24em}
.pass{color:#1a7f37}.fail{color:#c62828}.note{color:#666;font-size:.9em}img{max-width:100%}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return _img(buffer.getvalue())


def _img(png: bytes, alt: str = "plot") -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def reference_ranges() -> dict[str, tuple[float, float]]:
    """Return MAISI's organ median-HU reference ranges (from ``maisi_core.evaluation.qc``)."""
    from maisi_core.evaluation.qc import reference_hu_ranges

    return reference_hu_ranges()


def plot_organ_hu(rows: list[dict[str, Any]], ranges: dict[str, tuple[float, float]]) -> str | None:
    """Return an ``<img>`` of per-organ median HU (box + strip) with the reference band, or None."""
    from matplotlib.figure import Figure

    values: dict[str, list[float]] = {}
    for row in rows:
        for organ, hu in (row.get("organ_median") or {}).items():
            values.setdefault(organ, []).append(hu)
    organs = sorted(values)
    if not organs:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * len(organs)), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for x, organ in enumerate(organs):
        if organ in ranges:
            low, high = ranges[organ]
            ax.fill_between([x - 0.4, x + 0.4], low, high, color="#8fbf8f", alpha=0.35, lw=0,
                            label="reference range" if x == 0 or "reference range" not in
                            ax.get_legend_handles_labels()[1] else None)
        jitter = np.random.default_rng(x).uniform(-0.15, 0.15, len(values[organ]))
        ax.scatter(x + jitter, values[organ], s=12, color="#3b6ea5", alpha=0.8, zorder=3)
    ax.boxplot([values[o] for o in organs], positions=range(len(organs)), widths=0.5, showfliers=False,
               medianprops={"color": "#c62828"}, zorder=2)
    ax.set_xticks(range(len(organs)), organs, rotation=30, ha="right")
    ax.set_ylabel("organ median HU")
    ax.set_title("Organ median HU per case vs. MAISI reference range")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper right")
    return _png(fig)


def _preview(catalog: Catalog, row: dict[str, Any]) -> str:
    from maisi_core.preview import save_preview_png

    try:
        image = np.asanyarray(load_nifti(catalog, row["image_uri"]).dataobj).astype(np.float32)
        label = np.asanyarray(load_nifti(catalog, row["label_uri"]).dataobj)
    except Exception as exc:  # a missing or damaged file must not take the whole card down
        reason = "missing" if isinstance(exc, FileNotFoundError) else " ".join(str(exc).split())[:160]
        logger.warning("report: no preview for %s (%s)", row["sample_id"], reason)
        note = (f"{row['sample_id']}: no preview, its image or label cannot be read ({reason}). "
                "Run ctfactory catalog verify ROOT; ctfactory run regenerates missing files.")
        return f"<figure><figcaption>{_esc(note)}</figcaption></figure>"
    buffer = io.BytesIO()
    save_preview_png(image, label, buffer)
    caption = f"{row['sample_id']} ({row['body_region']}, {row['pathology']}, seed {row['seed']})"
    if row.get("tumor_contrast_hu") is not None:
        caption += f"; tumour {row['tumor_contrast_hu']:+.0f} HU against its host"
        if row.get("tumor_diameter_mm") is not None:
            caption += f", {row['tumor_diameter_mm']:.0f} mm"
    return f"<figure>{_img(buffer.getvalue(), caption)}<figcaption>{_esc(caption)}</figcaption></figure>"


def preview_rows(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Return up to ``limit`` rows to preview, taking each cohort's cases in turn (so every cohort shows)."""
    by_cohort: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["sample_id"]):
        by_cohort.setdefault(str(row.get("cohort")), []).append(row)
    out: list[dict[str, Any]] = []
    for k in range(max((len(v) for v in by_cohort.values()), default=0)):
        out += [cases[k] for cases in by_cohort.values() if k < len(cases)]
    return out[:limit]


def _cohort_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for cohort in sorted({r["cohort"] or "" for r in rows}):
        part = [r for r in rows if (r["cohort"] or "") == cohort]
        passed = sum(1 for r in part if r["status"] == "passed" and r["qc_pass"])
        out.append([cohort, len(part), passed, len(part) - passed, f"{100.0 * passed / len(part):.1f} %"])
    return out


def _metric_rows(datasets: list[dict[str, Any]]) -> list[list[Any]]:
    """Metrics of the newest row of each dataset version (``datasets`` is sorted oldest first)."""
    latest = {row["dataset_version"]: row for row in datasets}
    out = []
    for row in latest.values():
        metrics = dict(row.get("metrics") or {})
        metrics.update({k: v for k, v in row.items() if k.startswith("fd_") and v is not None})
        for name, value in sorted(metrics.items()):
            out.append([row["dataset_version"], name, f"{value:.4g}"])
    return out


def _pretty_spec(spec: str) -> str:
    """Indent a spec stored as canonical JSON; YAML text is shown as it is."""
    try:
        return json.dumps(json.loads(spec), indent=2, sort_keys=True)
    except ValueError:
        return spec


def _distinct(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(sorted({str(r[key]) for r in rows if r.get(key) is not None})) or "—"


def _generation_section(rows: list[dict[str, Any]], dataset: dict[str, Any] | None) -> str:
    seeds = [r["seed"] for r in rows if r.get("seed") is not None]
    facts = [
        ["spec_id", _distinct(rows, "spec_id")],
        ["model", _distinct(rows, "model_name")],
        ["model digest", _distinct(rows, "model_digest")],
        ["code version", _distinct(rows, "code_version")],
        ["seeds", f"{min(seeds)} – {max(seeds)} ({len(seeds)} cases)" if seeds else "—"],
        ["device", _distinct(rows, "device")],
        ["precision", _distinct(rows, "precision")],
        ["mask source", _distinct(rows, "mask_source")],
        ["licence", (dataset or {}).get("licence") or "—"],
        ["data", "synthetic (generated by a latent diffusion model; no patient data)"],
    ]
    spec = (dataset or {}).get("spec")
    spec_html = f"<h3>Spec</h3><pre>{_esc(_pretty_spec(spec))}</pre>" if spec else '<p class="note">No spec text recorded.</p>'
    return "<h2>What generated it</h2>" + _table(None, facts) + spec_html


def _qc_section(rows: list[dict[str, Any]]) -> str:
    passed = sum(1 for r in rows if r["status"] == "passed" and r["qc_pass"])
    reasons = Counter(f.split(":")[0] for r in rows for f in (r.get("qc_failures") or []))
    reasons.update(r["failure_reason"] for r in rows if r.get("failure_reason") and not r.get("qc_failures"))
    attempts = sum(int(r.get("attempt") or 0) + 1 for r in rows)
    first = sum(1 for r in rows if r["status"] == "passed" and not r.get("attempt"))
    body = (f'<p>Cases passing QC: <b class="pass">{passed}</b> of {len(rows)} '
            f"({100.0 * passed / len(rows):.1f} %). Generation attempts: {attempts}; passing at the first "
            f"attempt: {first} of {len(rows)} cases ({100.0 * first / len(rows):.1f} %). A case that fails is "
            "retried on a new seed; the failed attempts' volumes are not kept.</p>")
    if reasons:
        body += "<p>Failures by organ or reason:</p>" + _table(["organ / reason", "count"], reasons.most_common())
    body += _tumor_table(rows)
    return "<h2>Quality checks</h2>" + body


def _tumor_table(rows: list[dict[str, Any]]) -> str:
    """Per cohort with tumours: published cases, median tumour contrast against the host and diameter."""
    by_cohort: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "passed" and r.get("tumor_contrast_hu") is not None:
            by_cohort.setdefault(str(r.get("cohort")), []).append(r)
    if not by_cohort:
        return ""
    table = []
    for cohort, cases in sorted(by_cohort.items()):
        contrast = [float(r["tumor_contrast_hu"]) for r in cases]
        sizes = [float(r["tumor_diameter_mm"]) for r in cases if r.get("tumor_diameter_mm") is not None]
        table.append([cohort, len(cases), f"{np.median(contrast):+.0f} ({min(contrast):+.0f} … {max(contrast):+.0f})",
                      f"{np.median(sizes):.0f}" if sizes else "—"])
    return ("<p>Tumours of the published cases (QC measures each against a ring of its host organ):</p>"
            + _table(["cohort", "cases", "contrast HU, median (range)", "diameter mm, median"], table))


def build_report_html(catalog: Catalog, *, as_of: int | None = None, max_previews: int = 4) -> str:
    """Return the dataset card of ``catalog`` at ``samples`` version ``as_of`` as HTML text.

    Raises:
        ReportError: When the version has no rows.
    """
    version = catalog.delta_table("samples", version=as_of).version()
    rows = catalog.read_table("samples", as_of=version).to_pylist()
    if not rows:
        raise ReportError(f"report expects at least one sample row, but got 0 at version={version}.")
    for row in rows:
        row["organ_median"] = dict(row["organ_median"] or [])
    datasets = catalog.read_table("datasets", as_of=version).to_pylist() if catalog.exists("datasets") else []
    for row in datasets:
        row["metrics"] = dict(row["metrics"] or [])
    datasets.sort(key=lambda r: r["created_at"])
    dataset = datasets[-1] if datasets else None
    title = f"{_distinct(rows, 'dataset')} v{_distinct(rows, 'dataset_version')}"
    parts = [f"<h1>Dataset card: {_esc(title)}</h1>",
             f'<p class="note">Catalog {_esc(catalog.root_uri)}, samples version {version}.</p>',
             _generation_section(rows, dataset),
             "<h2>Counts per cohort</h2>",
             _table(["cohort", "attempts", "passed", "failed", "pass rate"], _cohort_rows(rows)),
             _qc_section(rows)]
    passing = [r for r in rows if r["status"] == "passed" and r["qc_pass"]]
    plot = plot_organ_hu(passing or rows, reference_ranges())
    parts.append("<h2>Organ HU distributions</h2>")
    parts.append(plot or '<p class="note">No organ HU medians recorded.</p>')
    parts.append('<p class="note">Green bands: MAISI reference range per organ, [min(sigma_6_low, p0.5), '
                 'max(sigma_6_high, p99.5)], bone capped at 1000 HU.</p>')
    metric_rows = _metric_rows(datasets)
    parts.append("<h2>Dataset metrics</h2>")
    parts.append(_table(["dataset version", "metric", "value"], metric_rows) if metric_rows
                 else '<p class="note">No dataset-level metrics recorded.</p>')
    parts.append("<h2>Previews</h2>")
    parts.append('<p class="note">Radiological display: the patient\'s right on the viewer\'s left (axial, '
                 'coronal), anterior on the left (sagittal). The slices go through the tumour in cases that '
                 'have one.</p>')
    parts += [_preview(catalog, r) for r in preview_rows(passing, max_previews)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_report(catalog: Catalog, dest: str | Path, *, as_of: int | None = None, max_previews: int = 4,
                 storage_options: Mapping[str, str] | None = None) -> str:
    """Write the HTML dataset card to ``dest`` (a local path or an fsspec URI), replacing an older card.

    Returns:
        ``dest`` as a string.

    Raises:
        ReportError: When a local ``dest`` is a directory or its folder does not exist.
    """
    dest = str(dest)
    text = build_report_html(catalog, as_of=as_of, max_previews=max_previews).encode("utf-8")
    if is_remote(dest):
        fs, remote = filesystem(dest, storage_options)
        fs.pipe_file(remote, text)  # one object, one PUT
    else:
        path = Path(dest[len("file://"):] if dest.startswith("file://") else dest)
        if path.is_dir() or not path.parent.is_dir():
            raise ReportError(f"report expects --dest to be a file in an existing folder, but got dest={dest!r}.")
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # never a half-written card
        try:
            tmp.write_bytes(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    logger.info("report: wrote %s", dest)
    return dest
