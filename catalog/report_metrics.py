"""What each dataset-level metric of the card means: what it measures, its reference value, what is good.

The metric names are those ``factory.validate.compute_dataset_metrics`` writes (one family per feature
extractor: ``fd_radiomics``, ``fd_astra``, ...), see :mod:`maisi_core.evaluation.frechet` and
:mod:`maisi_core.evaluation.diversity`. A name no rule knows still gets a line that says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from catalog.report_html import esc, table
from catalog.schema import DATASETS_SCHEMA, METRIC_PREFIXES

_EXTRACTORS = {"radiomics": "radiomics-style slice features", "astra": "Astra/Merlin I3ResNet-152 CT features"}


@dataclass(frozen=True)
class MetricNote:
    """One metric explained.

    Attributes:
        measures: a sentence on what the value measures.
        reference: the value to compare it with, as text ("—" when there is none).
        good: what a good value looks like.
    """

    measures: str
    reference: str
    good: str


def _features(ext: str) -> str:
    return _EXTRACTORS.get(ext, f"{ext} features")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _fd(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    ext, plane = m.group("ext"), m.group("plane")
    ref = metrics.get(f"fd_{ext}_ref")
    if plane:
        return MetricNote(f"The Fréchet distance of fd_{ext} on {plane} slices only.",
                          f"{_fmt(ref)} (fd_{ext}_ref, mean of the planes)",
                          "Lower is better; a plane far above the others points at that orientation.")
    ratio = "" if ref is None or not ref > 0 else f" (here {metrics[m.group(0)] / ref:.3g}× it)"
    return MetricNote(
        f"Fréchet distance between the feature statistics of the generated and the reference images "
        f"({_features(ext)}), mean of the axial, coronal and sagittal planes.",
        f"{_fmt(ref)} (fd_{ext}_ref)",
        f"Lower is better; a perfect generator lands near the reference{ratio}. Compare only at the same "
        "extractor and sample size.")


def _fd_ref(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        "The same Fréchet distance between two independent reference sets: what a perfect generator would "
        "score at this sample size.",
        "—", f"It is the yardstick for fd_{m.group('ext')}; small means the reference set is stable.")


def _frd_v1(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        "The published Fréchet Radiomics Distance (FRD v1, Konz et al.; the frd-score package): the log of the "
        "squared Fréchet distance between PyRadiomics features of whole volumes (original, LoG and wavelet "
        "images), z-scored with the reference set.", "—",
        "Lower is better; it is a log, so +1 means d² grew by a factor e. Compare only at the same reference set "
        "and sample size. It normalises each image, so it barely sees a global HU shift: fd_radiomics does.")


def _diversity_mean(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        f"Mean pairwise distance between generated cases in standardised {_features(m.group('ext'))}: how much "
        "the cases differ from each other.",
        "—", "Higher means more varied cases; a value near 0 means the cases look alike (mode collapse).")


def _diversity_dupes(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        "Number of generated pairs closer than a tenth of the median pairwise distance: near-duplicates.",
        "0", "0; any pair is worth a look.")


def _mem_fraction(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        "Fraction of generated cases closer to a reference case than 95 % of reference cases are to their own "
        "nearest neighbour: a memorisation (copying) signal.",
        "≈ 0.05 for fresh samples; 1 for copies", "About 0.05 or lower; values towards 1 mean copied cases.")


def _mem_own_nn(m: re.Match, metrics: Mapping[str, float]) -> MetricNote:
    return MetricNote(
        "Fraction of generated cases closer to their nearest reference case than that case is to its own "
        "nearest neighbour (a per-case authenticity test).",
        "≈ 0.5 for fresh samples; 1 for copies", "About 0.5 or lower; near 1 means the cases copy the reference.")


def _count(what: str) -> Callable[[re.Match, Mapping[str, float]], MetricNote]:
    return lambda m, metrics: MetricNote(
        f"Number of {what} volumes the metrics were computed on.", "—",
        "More is better: Fréchet distances are biased upwards on small sets (tens of cases at least).")


_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match, Mapping[str, float]], MetricNote]], ...] = (
    (re.compile(r"^fd_frd_v1$"), _frd_v1),
    (re.compile(r"^fd_(?P<ext>.+)_ref$"), _fd_ref),
    (re.compile(r"^fd_(?P<ext>.+?)(?:_(?P<plane>axial|coronal|sagittal))?$"), _fd),
    (re.compile(r"^diversity_(?P<ext>.+)_mean_pairwise$"), _diversity_mean),
    (re.compile(r"^diversity_(?P<ext>.+)_near_duplicate_pairs$"), _diversity_dupes),
    (re.compile(r"^memorisation_(?P<ext>.+)_fraction$"), _mem_fraction),
    (re.compile(r"^memorisation_(?P<ext>.+)_closer_than_own_nn$"), _mem_own_nn),
    (re.compile(r"^metric_n_generated$"), _count("generated")),
    (re.compile(r"^metric_n_reference$"), _count("reference")),
)


def describe_metric(name: str, metrics: Mapping[str, float]) -> MetricNote:
    """Return what metric ``name`` measures, its reference value and what a good value is.

    Args:
        name: the metric's column or map key.
        metrics: all metrics of the same datasets row (the reference value is looked up there).
    """
    for pattern, note in _RULES:
        match = pattern.match(name)
        if match:
            return note(match, metrics)
    return MetricNote("No description is recorded for this metric name; see the tool that computed it.",
                      "—", "Unknown: the card does not know which direction is better.")


def dataset_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """Return the metrics of one datasets row: its ``metrics`` map and its metric columns."""
    metrics = {k: float(v) for k, v in dict(row.get("metrics") or {}).items() if v is not None}
    metrics.update({k: float(v) for k, v in row.items() if k.startswith(METRIC_PREFIXES)
                    and k not in DATASETS_SCHEMA.names and v is not None})  # metric_sources is no metric
    return metrics


def metrics_section(datasets: list[dict[str, Any]]) -> str:
    """Return the card's metrics section for the newest row of each dataset version (oldest first input)."""
    latest = {row["dataset_version"]: row for row in datasets}
    parts = ["<h2>Dataset metrics</h2>"]
    found = False
    for version, row in latest.items():
        metrics = dataset_metrics(row)
        if not metrics:
            continue
        found = True
        rows = []
        for name, value in sorted(metrics.items()):
            note = describe_metric(name, metrics)
            rows.append([name, f"{value:.4g}", note.reference, note.measures, note.good])
        parts.append(f"<h3>Version {esc(version)}</h3>")
        parts.append(table(["metric", "value", "reference", "what it measures", "good value"], rows))
    if not found:
        parts.append('<p class="note">No dataset-level metrics recorded.</p>')
    else:
        parts.append('<p class="note">Fréchet distances compare feature statistics of two sets, not images one '
                     "by one. On radiomics-style features they are FRD-style distances, not FID: not comparable "
                     "with published FID figures.</p>")
    return "\n".join(parts)
