"""The HTML dataset card: one self-contained file (plots and previews inlined as base64 PNG).

It says first that the data is synthetic CT and what it is (not) for, from the generator's model card; then
what generated it (spec as YAML, spec_id, model and digest, code version, seeds), counts per cohort, QC pass
rates and failure reasons, organ median-HU distributions against MAISI's reference ranges, the structures
and tumours of each cohort, dataset-level metrics with what each means, and previews of every cohort
(plain and windowed slices in radiological display, through the tumour where a cohort asks for one).
The card names the dataset root by its folder name (or a remote URI without credentials), never by a
local path. Pieces live in :mod:`catalog.report_html`, :mod:`catalog.report_metrics` and
:mod:`catalog.report_cases`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from catalog.errors import ReportError
from catalog.fs import filesystem, is_remote
from catalog.model_card import parse_model_card
from catalog.report_cases import cohort_of, preview_rows, read_cases, structures_table, tumour_table
from catalog.report_html import display_root, esc, figure_png, render_inline, render_markdown, table
from catalog.report_metrics import metrics_section
from catalog.report_utility import utility_section
from catalog.store import Catalog

__all__ = ["build_report_html", "plot_organ_hu", "preview_rows", "reference_ranges", "spec_yaml", "write_report"]

logger = logging.getLogger(__name__)

MIN_PREVIEWS = 4  # previews when not told: at least this many, and one per cohort
STRUCTURE_CASES_PER_COHORT = 8  # label files read per cohort for the structure table (each is decompressed)
# Spec keys shown first, in the order a spec is written (DatasetSpec, then Cohort fields); others follow sorted.
_SPEC_KEY_ORDER = ("name", "version", "description", "model", "ref", "preset", "output_root", "seed", "cohorts",
                   "count", "body_region", "pathology", "type", "size_mm", "host_organ", "output_size", "spacing_mm",
                   "mask_source", "num_inference_steps", "qc", "schedule", "runtime")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #3b6ea5;padding-bottom:.2em}h2{color:#3b6ea5;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef3f8}pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:32em}
.pass{color:#1a7f37}.fail{color:#c62828}.note{color:#666;font-size:.9em}img{max-width:100%}
.warn{background:#fff4e5;border-left:6px solid #e8710a;padding:.6em 1em;margin:1em 0}
.use{display:flex;gap:1em}.use>div{flex:1;background:#f4f8fc;border:1px solid #cfdcea;padding:.4em 1em}
.scroll{max-height:28em;overflow:auto}details{margin:1em 0}summary{cursor:pointer;color:#3b6ea5}
figure{margin:1.2em 0}figure img{max-width:760px}
"""


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
    return figure_png(fig)


def _cohort_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for cohort in sorted({cohort_of(r) for r in rows}):
        part = [r for r in rows if cohort_of(r) == cohort]
        passed = sum(1 for r in part if r["status"] == "passed" and r["qc_pass"])
        out.append([cohort, len(part), passed, len(part) - passed, f"{100.0 * passed / len(part):.1f} %"])
    return out


def _ordered(value: Any) -> Any:
    """``value`` with every mapping's keys in :data:`_SPEC_KEY_ORDER` first, the others sorted after them."""
    if isinstance(value, dict):
        rank = {k: i for i, k in enumerate(_SPEC_KEY_ORDER)}
        keys = sorted(value, key=lambda k: (rank.get(k, len(rank)), str(k)))
        return {k: _ordered(value[k]) for k in keys}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def spec_yaml(spec: str) -> str:
    """Return a spec stored as canonical JSON as YAML, keys in a readable order; other text is returned as it is."""
    try:
        data = json.loads(spec)
    except ValueError:
        return spec
    return yaml.safe_dump(_ordered(data), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)


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
    spec_html = (f"<h3>Spec (YAML)</h3><pre>{esc(spec_yaml(spec))}</pre>" if spec
                 else '<p class="note">No spec text recorded.</p>')
    return "<h2>What generated it</h2>" + table(None, facts) + spec_html


def _use_section(dataset: dict[str, Any] | None) -> str:
    """The card's opening: synthetic CT, not for clinical use; the model card's intended use and limitations."""
    parts = ['<div class="warn"><b>Synthetic CT, not for clinical use.</b> Every image was generated by a model '
             "from a label map; none shows a real patient. Do not use these images for diagnosis, treatment or "
             "any decision about a person.</div>"]
    markdown = ((dataset or {}).get("model_card") or "").strip()
    if not markdown:
        parts.append('<p class="note">No model card was recorded for the generator, so its intended use and '
                     "limitations are not stated here.</p>")
        return "\n".join(parts)
    card = parse_model_card(markdown)
    boxes = [("Intended use", card.intended_use), ("Limitations", card.limitations)]
    parts.append('<div class="use">' + "".join(
        f"<div><h3>{title}</h3>{render_markdown(text) if text else '<p class=note>The model card does not say.</p>'}"
        "</div>" for title, text in boxes) + "</div>")
    return "\n".join(parts)


def _model_card_section(dataset: dict[str, Any] | None) -> str:
    markdown = ((dataset or {}).get("model_card") or "").strip()
    if not markdown:
        return "<h2>Model card</h2><p class=\"note\">No model card was recorded.</p>"
    title = parse_model_card(markdown).title or "the generator"
    return (f"<h2>Model card</h2><details><summary>The model card of {render_inline(title)} (as recorded with the "
            f"dataset)</summary>{render_markdown(markdown)}</details>")


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
        body += "<p>Failures by organ or reason:</p>" + table(["organ / reason", "count"], reasons.most_common())
    return "<h2>Quality checks</h2>" + body


def _structures_section(passing: list[dict[str, Any]], tally) -> str:
    note = (f'<p class="note">Volumes from the label maps of up to {STRUCTURE_CASES_PER_COHORT} published cases '
            "per cohort: the median over the cases that hold the structure, and how many of the cases counted "
            "hold it. Names from the MAISI label dictionary.")
    if tally.unreadable:
        note += f" {len(tally.unreadable)} case(s) could not be read and are left out: {', '.join(tally.unreadable)}."
    return ("<h2>Structures and tumours</h2>" + tumour_table(passing) + "<h3>Structures per cohort</h3>"
            + note + "</p>" + structures_table(tally))


def _previews_section(figures: list[str], previewed: list[dict[str, Any]], passing: list[dict[str, Any]]) -> str:
    parts = ["<h2>Previews</h2>",
             '<p class="note">Radiological display: the patient\'s right on the viewer\'s left (axial, coronal), '
             "anterior on the left (sagittal); letters mark each edge. Rows: the plain image (-1000 to 1000 HU), "
             "the soft-tissue (W400 L40), lung (W1500 L-600) and bone (W1800 L400) windows, then the label overlay. "
             "In a cohort that asks for a tumour the slices go through it and a red circle marks it.</p>"]
    missing = sorted({cohort_of(r) for r in passing} - {cohort_of(r) for r in previewed})
    if missing:
        parts.append(f'<p class="note">No preview of cohort(s) {esc(", ".join(missing))}: the card was asked for '
                     f"{len(previewed)} preview(s); ask for more (ctfactory report ROOT --previews K).</p>")
    return "\n".join(parts + figures)


def _read_rows(catalog: Catalog, as_of: int | None) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """The samples version and its rows, and the datasets rows up to it (oldest first)."""
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
    return version, rows, datasets


def build_report_html(catalog: Catalog, *, as_of: int | None = None, max_previews: int | None = None) -> str:
    """Return the dataset card of ``catalog`` at ``samples`` version ``as_of`` as HTML text.

    Args:
        catalog: the dataset's catalog.
        as_of: the ``samples`` version (default the newest).
        max_previews: cases previewed, each cohort's in turn; default one per cohort and at least
            :data:`MIN_PREVIEWS`.

    Raises:
        ReportError: When the version has no rows.
    """
    version, rows, datasets = _read_rows(catalog, as_of)
    dataset = datasets[-1] if datasets else None
    passing = [r for r in rows if r["status"] == "passed" and r["qc_pass"]]
    limit = max(MIN_PREVIEWS, len({cohort_of(r) for r in passing})) if max_previews is None else max_previews
    previewed = preview_rows(passing, limit)
    counted = [r for c in sorted({cohort_of(r) for r in passing})
               for r in sorted((r for r in passing if cohort_of(r) == c), key=lambda r: r["sample_id"])
               [:STRUCTURE_CASES_PER_COHORT]]
    root_name = display_root(catalog.root_uri)
    figures, tally = read_cases(catalog, counted, previewed, root_name=root_name)
    title = f"{_distinct(rows, 'dataset')} v{_distinct(rows, 'dataset_version')}"
    plot = plot_organ_hu(passing or rows, reference_ranges())
    parts = [f"<h1>Dataset card: {esc(title)}</h1>",
             f'<p class="note">Dataset root {esc(root_name)}, samples version {version}.</p>',
             _use_section(dataset),
             _generation_section(rows, dataset),
             "<h2>Counts per cohort</h2>",
             table(["cohort", "attempts", "passed", "failed", "pass rate"], _cohort_rows(rows)),
             _qc_section(rows),
             "<h2>Organ HU distributions</h2>",
             plot or '<p class="note">No organ HU medians recorded.</p>',
             '<p class="note">Green bands: MAISI reference range per organ, [min(sigma_6_low, p0.5), '
             'max(sigma_6_high, p99.5)], bone capped at 1000 HU.</p>',
             _structures_section(passing, tally),
             metrics_section(datasets),
             utility_section(dataset),  # "" unless the latest datasets row has utility_results
             _previews_section(figures, previewed, passing),
             _model_card_section(dataset)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_report(catalog: Catalog, dest: str | Path, *, as_of: int | None = None, max_previews: int | None = None,
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
