"""The published FRD v1 (frd extra) beside the fast radiomics-style fallback, and metric_sources in datasets rows."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import ndimage

from _specs import tiny_spec
from catalog.store import open_catalog
from factory import validate
from factory.dataset import dataset_row
from factory.errors import ValidationInputError
from factory.validate import FRD_METRIC, compute_dataset_metrics, metric_sources, record_validation
from maisi_core import io as mio
from maisi_core.anatomy.intensity import synthesize_ct
from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom
from maisi_core.evaluation import frd
from maisi_core.evaluation.frd import FrdNotInstalledError, frd_v1
from maisi_core.errors import FeatureError
from maisi_core.evaluation.frechet import compute_frechet
from tests._catalog_cases import make_record

SPACING = (6.0, 6.0, 6.0)
FALLBACK = "fast fallback, radiomics-style, not the published FRD"


def _set(n: int, first_seed: int, size: int = 24) -> list[mio.ImageVolume]:
    config = PhantomConfig(regions=("chest", "abdomen"), output_size_vox=(size,) * 3, spacing_mm=SPACING)
    out = []
    for i in range(n):
        case = generate_phantom(config, seed=first_seed + i)
        out.append(mio.ImageVolume(synthesize_ct(case.label_map, SPACING, seed=first_seed + 50 + i), case.affine))
    return out


def _degraded(vols: list[mio.ImageVolume]) -> dict[str, list[mio.ImageVolume]]:
    rng = np.random.default_rng(0)
    ops = {"noise": lambda a: a + rng.normal(0.0, 80.0, a.shape), "blur": lambda a: ndimage.gaussian_filter(a, 1.5),
           "shift": lambda a: a + 120.0}
    return {k: [mio.ImageVolume(op(v.array).astype(np.float32), v.affine) for v in vols] for k, op in ops.items()}


def _cases(vols: list[mio.ImageVolume]) -> list[dict]:
    return [{"sample_id": f"s{i:03d}", "spacing_mm": SPACING, "image": v.array,
             "label": np.where(v.array > -500, 200, 0).astype(np.uint8), "affine": v.affine}
            for i, v in enumerate(vols)]


def test_fallback_ranks_noise_blur_and_shift_behind_a_fresh_good_set():
    reference, good = _set(6, 1000), _set(6, 2000)
    dist = {name: compute_frechet([v.array for v in reference], [v.array for v in vols]).mean
            for name, vols in {"good": good, **_degraded(good)}.items()}
    assert all(dist[k] > 2 * dist["good"] for k in ("noise", "blur", "shift")), dist


def test_metric_sources_name_the_fallback_and_every_metric():
    metrics = compute_dataset_metrics(_cases(_set(3, 10, size=16)), image_distance="fallback")
    sources = metric_sources(metrics)
    assert set(sources) == set(metrics) and FRD_METRIC not in metrics
    assert FALLBACK in sources["fd_radiomics"] and "ctfactory 0." in sources["fd_radiomics"]
    assert sources["metric_n_generated"].startswith("count")
    assert metric_sources({FRD_METRIC: 1.0})[FRD_METRIC] == frd.describe_frd_extractor()


def test_record_validation_writes_metric_sources_in_the_datasets_row(tmp_path):
    cases = _cases(_set(3, 10, size=16))
    records = []
    for i, case in enumerate(cases):
        name = f"{case['sample_id']}.nii.gz"
        img = mio.save_image(str(tmp_path / "images" / name), case["image"], case["affine"])
        lab = mio.save_label(str(tmp_path / "labels" / name), case["label"], case["affine"])
        records.append(make_record(i, sample_id=case["sample_id"], image_uri=f"images/{name}",
                                   label_uri=f"labels/{name}", image_sha256=img.sha256, label_sha256=lab.sha256,
                                   image_bytes=img.n_bytes, label_bytes=lab.n_bytes, spacing_mm=SPACING,
                                   output_size=(16, 16, 16)))
    cat = open_catalog(str(tmp_path))
    cat.append_samples(records, commit_metadata={"spec_id": "spec-abc123"})
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec_id": "spec-abc123"})
    metrics = compute_dataset_metrics(validate.load_generated(cat), image_distance="fallback")
    record_validation(cat, metrics, reference="phantom")
    latest = [r for r in open_catalog(str(tmp_path)).read_table("datasets").to_pylist() if r["fd_radiomics"]][0]
    sources = dict(latest["metric_sources"])
    assert set(sources) == set(metrics) and FALLBACK in sources["diversity_radiomics_mean_pairwise"]


def test_dataset_row_records_metric_sources(tmp_path):
    cat = open_catalog(str(tmp_path))
    cat.append_samples([make_record(0)], commit_metadata={"spec_id": "spec-abc123"})
    row = dataset_row(tiny_spec(tmp_path), "spec-abc123", cat, metrics={"fd_radiomics": 2.0, FRD_METRIC: 1.5},
                      timings={}, code_version="t")
    assert FALLBACK in row["metric_sources"]["fd_radiomics"]
    assert row["metric_sources"][FRD_METRIC].startswith("frd-score")
    cat.append_dataset(row)
    stored = open_catalog(str(tmp_path)).read_table("datasets").to_pylist()[-1]
    assert dict(stored["metric_sources"]) == row["metric_sources"] and stored[FRD_METRIC] == 1.5


def test_missing_extra_is_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "frd_score", None)  # makes `import frd_score` raise ImportError
    with pytest.raises(FrdNotInstalledError, match=r"^frd_v1 expects the 'frd' extra \(frd-score and "
                       r"pyradiomics-bhklab\), but got missing='frd_score'\. Install it with "
                       r"`pip install 'ctfactory\[frd\]'`"):
        frd_v1([np.zeros((4, 4, 4))] * 2, [np.zeros((4, 4, 4))] * 2, spacing_mm=SPACING)
    assert issubclass(FrdNotInstalledError, ImportError)
    cases = _cases(_set(2, 10, size=16))
    with pytest.raises(FrdNotInstalledError):
        compute_dataset_metrics(cases, image_distance="frd_v1")
    monkeypatch.setattr(frd, "frd_available", lambda: False)
    metrics = compute_dataset_metrics(cases, image_distance="auto")  # fallback only, never an error
    assert FRD_METRIC not in metrics and "fd_radiomics" in metrics


def test_unknown_image_distance_is_refused():
    with pytest.raises(ValidationInputError, match=r"expects image_distance in \['auto', 'frd_v1', 'fallback'\], "
                       r"but got image_distance='fid'\."):
        compute_dataset_metrics(_cases(_set(2, 10, size=16)), image_distance="fid")


def test_frd_extractor_names_the_installed_versions():
    from importlib import metadata

    if frd.frd_available():
        assert frd.FRD_EXTRACTOR == (f"frd-score {metadata.version('frd-score')} (FRD v1, Konz et al. 2026; "
                                     f"pyradiomics-bhklab {metadata.version('pyradiomics-bhklab')})")
    else:
        assert frd.FRD_EXTRACTOR == "frd-score (not installed)"


@pytest.mark.skipif(not frd.frd_available(), reason="needs the frd extra (frd-score, pyradiomics-bhklab)")
def test_frd_v1_input_errors_are_clear():
    vols = _set(2, 10, size=8)
    with pytest.raises(FeatureError, match=r"expects a sequence of at least 2 volumes per set, but got generated "
                       r"with 1\."):
        frd_v1(vols, vols[:1])
    with pytest.raises(FeatureError, match=r"expects spacing_mm for volumes given as arrays"):
        frd_v1([v.array for v in vols], vols)
    with pytest.raises(FeatureError, match=r"expects masks for both sets or neither"):
        frd_v1(vols, vols, reference_masks=[v.array for v in vols])


@pytest.mark.slow  # about 2 minutes on one core: FRD v1 resamples to 2 mm and filters 13 images per volume
@pytest.mark.skipif(not frd.frd_available(), reason="needs the frd extra (frd-score, pyradiomics-bhklab)")
def test_frd_v1_ranks_noise_and_blur_behind_a_fresh_good_set(tmp_path):
    reference, good = _set(4, 1000, size=16), _set(4, 2000, size=16)
    paths = [mio.save_image(str(tmp_path / f"r{i}.nii.gz"), v.array, v.affine).uri for i, v in enumerate(reference)]
    degraded = _degraded(good)
    scores = {name: frd_v1(paths, vols, num_workers=1) for name, vols in
              {"good": good, "noise": degraded["noise"], "blur": degraded["blur"]}.items()}
    assert all(np.isfinite(v) for v in scores.values()), scores
    assert scores["noise"] > scores["good"] + 1.0 and scores["blur"] > scores["good"] + 1.0, scores


@pytest.mark.slow  # about 20 s: two FRD v1 extractions of 2 volumes each
@pytest.mark.skipif(not frd.frd_available(), reason="needs the frd extra (frd-score, pyradiomics-bhklab)")
def test_auto_adds_the_published_frd_beside_the_fallback_with_its_source():
    metrics = compute_dataset_metrics(_cases(_set(2, 10, size=8)), image_distance="auto")
    assert np.isfinite(metrics[FRD_METRIC]) and np.isfinite(metrics["fd_radiomics"])
    sources = metric_sources(metrics)
    assert sources[FRD_METRIC] == frd.FRD_EXTRACTOR and FALLBACK in sources["fd_radiomics"]


def test_a_run_ends_with_the_fast_distance_only(monkeypatch):
    """FRD v1 (~20 s a small volume) is `ctfactory validate`'s; the end of every run keeps the fast fallback."""
    from factory import dataset

    seen = {}

    def fake_validate_dataset(cat, **kwargs):
        seen.update(kwargs)
        return {"fd_radiomics": 1.0}

    monkeypatch.setattr(validate, "validate_dataset", fake_validate_dataset)

    class Root:
        def catalog(self):
            return None

    assert dataset.dataset_metrics(None, "sid", Root()) == {"fd_radiomics": 1.0}
    assert seen["image_distance"] == "fallback"
