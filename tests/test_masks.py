"""Tests of the mask sources (maisi_core.anatomy.masks): phantom, user label maps, folder retrieval."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi_core.anatomy import labels
from maisi_core.errors import (
    LabelNameError,
    MaskSourceError,
    NoCandidateMaskError,
    UnmappedLabelError,
    UnsafeCheckpointError,
    WeightsError,
    WeightsNotFoundError,
)
from maisi_core.anatomy.mask_folder import build_mask_index, load_mask_index, save_mask_index, score_candidate
from maisi_core.anatomy.mask_remap import (
    load_user_mask,
    remap_labels,
    resample_label_map,
    totalsegmentator_mapping,
    totalsegmentator_names,
)
from maisi_core.anatomy.mask_types import (
    OPTION_CLASSES,
    FolderOptions,
    GeneratorOptions,
    MaskRequest,
    PhantomOptions,
    UserOptions,
)
from maisi_core.anatomy.masks import MASK_SOURCES, make_mask
from maisi_core.anatomy.phantom import PhantomConfig, TumorSpec, generate_phantom


def _write_nifti(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(path))
    return path


def _ts_volume():
    """A 20x16x12 TotalSegmentator-style map, 2 mm, RAS: liver (5) at high x (patient right), spleen (1) low."""
    arr = np.zeros((20, 16, 12), np.uint8)
    arr[12:18, 4:12, 3:9] = 5  # liver
    arr[3:7, 5:10, 4:8] = 1  # spleen
    arr[9:11, 2:4, :] = 27  # vertebrae_L5
    return arr, np.diag([2.0, 2.0, 2.0, 1.0])


def test_mask_sources_registry_names():
    assert set(MASK_SOURCES) == {"phantom", "folder", "user", "maisi_mask_generator"}


def test_make_mask_phantom_is_deterministic():
    request = MaskRequest(PhantomOptions(), regions="chest", output_size_vox=(32, 32, 32), spacing_mm=(10.0,) * 3, seed=3)
    a, b = make_mask(request), make_mask(request)
    assert a.mask_source == "phantom" and a.mask_id == "phantom:3"
    assert np.array_equal(a.label_map, b.label_map)
    labels.check_label_map(a.label_map, expected_shape=(32, 32, 32))


def test_mask_request_rejects_options_of_no_source():
    with pytest.raises(MaskSourceError, match=r"MaskRequest expects options of one of \['FolderOptions', 'GeneratorOptions', "
                                              r"'PhantomOptions', 'UserOptions'\], but got options=dict"):
        MaskRequest({"folder": "x"})  # type: ignore[arg-type]
    assert set(OPTION_CLASSES) == set(MASK_SOURCES)  # one typed options class per registered source


def test_source_options_check_their_values():
    with pytest.raises(MaskSourceError, match=r"UserOptions expects unmapped in \['error', 'background', 'body'\], "
                                              r"but got unmapped='bdy'\. Did you mean 'body'\?"):
        UserOptions("x.nii.gz", unmapped="bdy")  # type: ignore[arg-type]
    with pytest.raises(MaskSourceError, match=r"UserOptions expects mapping to be a dict or one of"):
        UserOptions("x.nii.gz", mapping="totalseg")  # type: ignore[arg-type]
    with pytest.raises(MaskSourceError, match=r"FolderOptions expects top_k >= 1, but got top_k=0"):
        FolderOptions("masks", top_k=0)
    with pytest.raises(MaskSourceError, match=r"GeneratorOptions expects a MaskGenerator, but got generator=None"):
        GeneratorOptions(None)


def test_totalsegmentator_table_names_map_to_maisi():
    table = totalsegmentator_names()
    expected = {
        "liver": "liver", "kidney_right": "right kidney", "lung_upper_lobe_left": "left lung upper lobe",
        "vertebrae_L5": "vertebrae L5", "rib_left_1": "left rib 1", "femur_left": "left femur",
        "hip_left": "left hip", "urinary_bladder": "bladder", "heart": "heart", "skull": "skull",
        "brain": "brain", "vertebrae_S1": "vertebrae S1", "costal_cartilages": "costal cartilages",
    }
    assert {k: table[k] for k in expected} == expected
    assert all(name in labels.label_dict() for name in table.values())


def test_totalsegmentator_mapping_uses_the_v2_total_class_map():
    mapping = totalsegmentator_mapping()
    assert len(mapping) == 117
    assert (mapping[1], mapping[2], mapping[5], mapping[27], mapping[90], mapping[92], mapping[117]) == (3, 5, 1, 33, 22, 63, 114)
    custom = totalsegmentator_mapping({7: "liver", 9: "kidney_left"})
    assert custom == {7: 1, 9: 14}
    with pytest.raises(LabelNameError, match=r"totalsegmentator_mapping expects TotalSegmentator v2 class names with a MAISI counterpart, but got name='livre' for id=3\. Did you mean 'liver'\?"):
        totalsegmentator_mapping({3: "livre"})


def test_load_user_mask_remaps_totalsegmentator_and_adds_body(tmp_path):
    arr, affine = _ts_volume()
    path = _write_nifti(tmp_path / "ts.nii.gz", arr, affine)
    out, out_affine = load_user_mask(path, spacing_mm=(2.0, 2.0, 2.0), output_size_vox=(20, 16, 12),
                                     mapping="totalsegmentator")
    assert out.dtype == np.uint8
    assert np.array_equal(out_affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert set(np.unique(out).tolist()) == {0, 1, 3, 33, labels.BODY_ID}
    assert np.array_equal(out == 1, arr == 5) and np.array_equal(out == 3, arr == 1)
    labels.check_label_map(out)


def test_load_user_mask_reorients_to_ras(tmp_path):
    arr, _ = _ts_volume()
    las = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS: the array's x index runs to the patient's left
    path = _write_nifti(tmp_path / "las.nii.gz", arr[::-1], las)
    out, _ = load_user_mask(path, spacing_mm=(2.0,) * 3, output_size_vox=(20, 16, 12), mapping="totalsegmentator")
    assert np.array_equal(out == 1, arr == 5)  # liver back at high x


def _world_x(label_map, affine, ids) -> float:
    idx = np.argwhere(np.isin(label_map, ids)).mean(axis=0)
    return float((np.asarray(affine)[:3, :3] @ idx + np.asarray(affine)[:3, 3])[0])


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "I"), ("A", "R", "S")])
def test_load_user_mask_keeps_the_liver_on_the_patients_right(tmp_path, axcodes):
    """A label map stored in LPS (DICOM-style) or any other axis order keeps its anatomy after remapping."""
    case = generate_phantom(PhantomConfig(regions="abdomen", output_size_vox=(40, 40, 24), spacing_mm=(8.0,) * 3),
                            seed=4)
    ras = nib.Nifti1Image(case.label_map, case.affine)
    target = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                             nib.orientations.axcodes2ornt(axcodes))
    stored = ras.as_reoriented(target)
    assert nib.aff2axcodes(stored.affine) == axcodes
    path = tmp_path / f"{''.join(axcodes)}.nii.gz"
    nib.save(stored, str(path))
    out, out_affine = load_user_mask(path, spacing_mm=(8.0,) * 3, output_size_vox=(40, 40, 24), mapping="maisi")
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    assert _world_x(out, out_affine, [1]) > _world_x(out, out_affine, [3]) + 60.0  # liver right of spleen
    assert _world_x(out, out_affine, [5]) > _world_x(out, out_affine, [14])  # right kidney right of left
    assert np.array_equal(out, case.label_map)


def test_load_user_mask_unmapped_labels(tmp_path):
    arr, affine = _ts_volume()
    path = _write_nifti(tmp_path / "ts.nii.gz", arr, affine)
    mapping = {5: "liver", 1: 3}
    kwargs = dict(spacing_mm=(2.0,) * 3, output_size_vox=(20, 16, 12), mapping=mapping)
    with pytest.raises(UnmappedLabelError, match=r"load_user_mask expects every source label to be mapped to a MAISI ID, but got unmapped ids=\[27\]\. Add them to the mapping, or pass unmapped='background' or unmapped='body'\."):
        load_user_mask(path, **kwargs)
    as_body, _ = load_user_mask(path, unmapped="body", add_body=False, **kwargs)
    assert np.all(as_body[arr == 27] == labels.BODY_ID)
    as_background, _ = load_user_mask(path, unmapped="background", add_body=False, **kwargs)
    assert np.all(as_background[arr == 27] == 0)
    with pytest.raises(MaskSourceError, match=r"load_user_mask expects unmapped to be one of \['error', 'background', 'body'\], but got unmapped='bodyy'\. Did you mean 'body'\?"):
        load_user_mask(path, unmapped="bodyy", **kwargs)


def test_remap_labels_rejects_unknown_targets():
    with pytest.raises(LabelNameError, match=r"remap_labels expects mapping targets that are MAISI IDs .*, but got targets=\[2\]\."):
        remap_labels(np.ones((2, 2, 2), np.uint8), {1: 2})


def test_resample_label_map_keeps_mm_size_and_centre():
    arr = np.zeros((32, 32, 32), np.uint8)
    arr[8:24, 12:20, 14:18] = 1  # 32 x 16 x 8 mm at 2 mm
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    out, out_affine = resample_label_map(arr, affine, spacing_mm=(4.0, 4.0, 4.0), output_size_vox=(24, 20, 8))
    assert out.shape == (24, 20, 8)
    assert np.count_nonzero(out) * 64 == np.count_nonzero(arr) * 8
    src_center = affine[:3, :3] @ np.full(3, 15.5) + affine[:3, 3]
    out_center = out_affine[:3, :3] @ ((np.asarray(out.shape) - 1) / 2.0) + out_affine[:3, 3]
    assert out_center == pytest.approx(src_center)
    idx = np.argwhere(out)
    world = idx * 4.0 + out_affine[:3, 3]
    src_world = np.argwhere(arr) * 2.0 + affine[:3, 3]
    assert world.mean(axis=0) == pytest.approx(src_world.mean(axis=0), abs=1.01)


def test_make_mask_user_source_records_file_and_hash(tmp_path):
    case = generate_phantom(PhantomConfig("abdomen", (40, 40, 30), (8.0, 8.0, 8.0)), seed=2)
    path = _write_nifti(tmp_path / "case.nii.gz", case.label_map, case.affine)
    request = MaskRequest(UserOptions(str(path)), regions="abdomen", output_size_vox=(40, 40, 30), spacing_mm=(8.0,) * 3,
                          tumor=TumorSpec("pancreatic tumor", (10.0, 20.0)), seed=4)
    result = make_mask(request)
    assert result.mask_source == "user" and result.mask_id.startswith("user:case.nii.gz:")
    assert np.array_equal(result.label_map[result.label_map != 24], case.label_map[result.label_map != 24])
    assert len(result.tumors) == 1 and np.any(result.label_map == 24)
    with pytest.raises(MaskSourceError, match=r"UserOptions expects the path of a NIfTI label map, but got path=''"):
        make_mask(MaskRequest(UserOptions("")))


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    specs = {
        "a_small.nii.gz": (("chest", "abdomen"), (32, 32, 32), (10.0, 10.0, 10.0), None),
        "b_match.nii.gz": (("chest", "abdomen"), (48, 48, 40), (7.0, 7.0, 8.0), None),
        "c_head.nii.gz": (("head_neck",), (48, 48, 40), (7.0, 7.0, 8.0), None),
        "d_tumor.nii.gz": (("chest", "abdomen"), (48, 48, 40), (7.0, 7.0, 8.0), TumorSpec("hepatic tumor")),
    }
    for seed, (name, (regions, size, spacing, tumor)) in enumerate(specs.items()):
        case = generate_phantom(PhantomConfig(regions, size, spacing, tumor), seed=seed)
        _write_nifti(folder / name, case.label_map, case.affine)
    save_mask_index(build_mask_index(folder), folder / "mask_index.json")
    return folder


def test_build_mask_index_describes_each_file(mask_folder):
    index = load_mask_index(mask_folder / "mask_index.json")
    assert [e["file"] for e in index] == ["a_small.nii.gz", "b_match.nii.gz", "c_head.nii.gz", "d_tumor.nii.gz"]
    b = index[1]
    assert b["dim"] == [48, 48, 40] and b["spacing_mm"] == [7.0, 7.0, 8.0]
    assert 1 in b["label_list"] and labels.BODY_ID in b["label_list"] and 26 not in b["label_list"]
    assert (b["top_region_index"], b["bottom_region_index"]) == (1, 2)
    assert index[2]["top_region_index"] == 0  # a head/neck scan (it may reach the lung apex)
    assert score_candidate(b, spacing_mm=(7.0, 7.0, 8.0), output_size_vox=(48, 48, 40)) == 0.0


def test_make_mask_folder_picks_closest_and_resamples(mask_folder):
    index = load_mask_index(mask_folder / "mask_index.json")
    scores = {e["file"]: score_candidate(e, spacing_mm=(7.0, 7.0, 8.5), output_size_vox=(46, 46, 38)) for e in index}
    assert scores["b_match.nii.gz"] < scores["a_small.nii.gz"]
    request = MaskRequest(FolderOptions(str(mask_folder), required_labels=("liver", 3)), regions=("chest", "abdomen"),
                          output_size_vox=(46, 46, 38), spacing_mm=(7.0, 7.0, 8.5), seed=0)
    result = make_mask(request)
    assert result.mask_source == "folder" and result.mask_id.startswith("folder:b_match.nii.gz:")
    assert result.label_map.shape == (46, 46, 38)
    assert np.allclose(np.diag(result.affine)[:3], (7.0, 7.0, 8.5))
    assert {1, 3} <= set(np.unique(result.label_map).tolist())
    assert np.array_equal(make_mask(request).label_map, result.label_map)


def test_make_mask_folder_handles_tumours(mask_folder):
    base = dict(options=FolderOptions(str(mask_folder)), regions="abdomen", output_size_vox=(48, 48, 40),
                spacing_mm=(7.0, 7.0, 8.0))
    hepatic = make_mask(MaskRequest(tumor=TumorSpec("hepatic tumor"), **base))
    assert hepatic.mask_id.startswith("folder:b_match")  # ties broken by file name; tumour placed
    assert len(hepatic.tumors) == 1 and np.any(hepatic.label_map == 26)
    plain = make_mask(MaskRequest(**base))
    assert not np.any(np.isin(plain.label_map, labels.TUMOR_IDS))


def test_make_mask_folder_without_candidates_raises(mask_folder):
    request = MaskRequest(FolderOptions(str(mask_folder)), regions="lower")
    with pytest.raises(NoCandidateMaskError, match=r"retrieve_mask expects at least one mask in .* with labels \[\], regions \['lower'\] and no other tumour than None, but got candidates=0 of 4"):
        make_mask(request)


# ----------------------------------------------------------------------------- MAISI mask generator


class _NotAWeight:
    """A custom class: pickling it into a checkpoint makes the file unsafe to load."""


@pytest.fixture(scope="module")
def tiny_generator():
    from maisi_core.anatomy.mask_generator import MaskGenerator

    return MaskGenerator.from_config("tiny", seed=0)


def test_mask_generator_official_architecture_parameter_counts():
    from maisi_core.anatomy.mask_generator import MaskGeneratorConfig, build_mask_autoencoder, build_mask_diffusion

    config = MaskGeneratorConfig.official()
    assert config.latent_shape == (4, 64, 64, 64)
    assert config.autoencoder["norm_float16"] is False and config.diffusion["use_flash_attention"] is False
    with torch.device("meta"):
        vae, unet = build_mask_autoencoder(config), build_mask_diffusion(config)
    assert sum(p.numel() for p in vae.parameters()) == 5_256_509
    assert sum(p.numel() for p in unet.parameters()) == 197_163_012


def test_mask_generator_tiny_run_gives_valid_maisi_ids(tiny_generator):
    sizes = [0.5] * 5 + [0.0] * 5
    a = tiny_generator.generate(sizes, seed=1, num_inference_steps=2, latent_shape=(4, 8, 8, 8))
    b = tiny_generator.generate(sizes, seed=1, num_inference_steps=2, latent_shape=(4, 8, 8, 8))
    assert a.shape == (32, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    labels.check_label_map(a, require_body=False)
    assert not np.isin(a, labels.TUMOR_IDS + (129,)).any()  # no tumour requested, kidney mass relabelled


def test_mask_generator_rejects_bad_size_vector(tiny_generator):
    with pytest.raises(MaskSourceError, match=r"MaskGenerator expects a size vector of 10 values in \[0, 1\] or -1, ordered \['gallbladder', .*\], but got size_vector=\[0\.5, 2\.0\]\."):
        tiny_generator.generate([0.5, 2.0], seed=0, num_inference_steps=1)


def test_postprocess_generated_mask_keeps_body_and_relabels_tumours():
    from maisi_core.anatomy.mask_generator import postprocess_generated_mask

    arr = np.zeros((12, 12, 12), np.uint8)
    arr[1:9, 1:9, 1:9] = labels.BODY_ID
    arr[2:6, 2:6, 2:6] = 1
    arr[3, 3, 3] = 26  # hepatic tumour inside the liver
    arr[11, 11, 11] = 3  # a stray island
    out = postprocess_generated_mask(arr, keep_tumors=())
    assert out[3, 3, 3] == 1 and out[11, 11, 11] == 0
    kept = postprocess_generated_mask(arr, keep_tumors=(26,))
    assert kept[3, 3, 3] == 26


def test_mask_generator_loads_weights_only_checkpoints(tmp_path, tiny_generator):
    from maisi_core.anatomy.mask_generator import MaskGenerator, MaskGeneratorConfig

    vae_path, unet_path = tmp_path / "mask_vae.pt", tmp_path / "mask_unet.pt"
    torch.save(tiny_generator.autoencoder.state_dict(), vae_path)
    torch.save({"unet_state_dict": tiny_generator.diffusion.state_dict(), "scale_factor": torch.tensor(0.8)}, unet_path)
    loaded = MaskGenerator.from_checkpoints(MaskGeneratorConfig.tiny(), autoencoder_path=vae_path, diffusion_path=unet_path)
    assert loaded.scale_factor == pytest.approx(0.8)
    for name, tensor in tiny_generator.diffusion.state_dict().items():
        assert torch.equal(loaded.diffusion.state_dict()[name], tensor)
    torch.save({"unet_state_dict": {"nope": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"MaskGenerator.from_checkpoints expects a state dict of the configured architecture, but got path='.*bad\.pt' with missing=\[.*\] unexpected=\['nope'\]\."):
        MaskGenerator.from_checkpoints(MaskGeneratorConfig.tiny(), autoencoder_path=vae_path, diffusion_path=tmp_path / "bad.pt")


def test_load_weights_refuses_pickled_objects(tmp_path):
    from maisi_core.anatomy.mask_generator import load_weights

    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "extra": _NotAWeight()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"loader expects a weights-only checkpoint .* but got path='.*unsafe\.pt' that needs arbitrary pickled objects .* it was not loaded"):
        load_weights(path, who="loader")
    with pytest.raises(WeightsNotFoundError, match=r"loader expects an existing checkpoint file, but got path='.*missing\.pt'\."):
        load_weights(tmp_path / "missing.pt", who="loader")


def test_make_mask_with_the_mask_generator_source(tiny_generator):
    request = MaskRequest(GeneratorOptions(tiny_generator, num_inference_steps=2, latent_shape=(4, 8, 8, 8)),
                          output_size_vox=(24, 24, 16), spacing_mm=(2.0, 2.0, 3.0), seed=5)
    result = make_mask(request)
    assert result.mask_source == "maisi_mask_generator" and result.mask_id.startswith("maisi_mask_generator:5:")
    assert result.label_map.shape == (24, 24, 16)
    assert np.allclose(np.diag(result.affine)[:3], (2.0, 2.0, 3.0))
    labels.check_label_map(result.label_map, require_body=False)
