"""NIfTI IO: exact affines, dtypes, atomic and non-overwriting writes, fsspec URIs, previews."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import nibabel as nib
import numpy as np
import pytest

from maisi_core import io as mio
from maisi_core.errors import (
    AffineError,
    ImageError,
    LabelMapError,
    MaisiError,
    OutputExistsError,
    VolumeFileError,
    VolumeNotFoundError,
)
from maisi_core.preview import preview_center_vox, radiological_slices, save_preview_png
from tests._volumes import make_phantom

AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 120.5], [0.0, 0.8, 0.0, -99.25], [0.0, 0.0, 2.5, 33.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def case():
    return make_phantom(24, seed=3)


def test_affine_from_spacing_builds_diagonal_ras():
    aff = mio.affine_from_spacing((0.7, 0.8, 1.5), origin_mm=(1, 2, 3))
    np.testing.assert_array_equal(aff, [[0.7, 0, 0, 1], [0, 0.8, 0, 2], [0, 0, 1.5, 3], [0, 0, 0, 1]])
    with pytest.raises(AffineError, match=r"affine_from_spacing expects three positive finite spacings in mm, "
                                          r"but got spacing_mm=\(1, 0, 1\)"):
        mio.affine_from_spacing((1, 0, 1))


def test_save_image_round_trip_keeps_affine_spacing_and_int16_hu(tmp_path, case):
    image, _ = case
    image = image.copy()
    image[0, 0, 0], image[1, 0, 0] = -5000.0, 9999.4
    info = mio.save_image(tmp_path / "img.nii.gz", image, AFFINE)
    vol = mio.load_image(info.uri)
    assert isinstance(vol, mio.ImageVolume)
    assert vol.array.dtype == np.int16 and vol.affine.dtype == np.float64
    np.testing.assert_array_equal(vol.affine, AFFINE)
    assert vol.spacing_mm == pytest.approx((0.8, 0.8, 2.5))
    np.testing.assert_array_equal(vol.array, np.clip(np.rint(image), -1024, 3071).astype(np.int16))
    raw = (tmp_path / "img.nii.gz").read_bytes()
    assert info.sha256 == hashlib.sha256(raw).hexdigest() and info.n_bytes == len(raw)


def test_save_image_clips_each_modality_to_its_own_stored_range(tmp_path):
    image = np.array([-20.0, 0.4, 999.6, 5000.0], np.float32).reshape(4, 1, 1)
    mr = mio.load_image(mio.save_image(tmp_path / "mr.nii.gz", image, AFFINE, modality="MR").uri)
    assert mr.array.ravel().tolist() == [0, 0, 1000, 5000]  # MR: no upper clip at 3071 HU
    ct = mio.load_image(mio.save_image(tmp_path / "ct.nii.gz", image, AFFINE).uri)
    assert ct.array.ravel().tolist() == [-20, 0, 1000, 3071]
    with pytest.raises(ImageError, match=r"save_image expects modality in \['CT', 'MR'\], but got modality='PET'"):
        mio.save_image(tmp_path / "pet.nii.gz", image, AFFINE, modality="PET")


def test_saved_files_are_readable_by_plain_nibabel_with_sform_and_qform(tmp_path, case):
    image, label = case
    mio.save_image(tmp_path / "i.nii.gz", image, AFFINE)
    mio.save_label(tmp_path / "l.nii", label, AFFINE)
    for name in ("i.nii.gz", "l.nii"):
        img = nib.load(tmp_path / name)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), AFFINE, atol=1e-5)
        np.testing.assert_allclose(img.get_sform(), AFFINE, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "l.nii").dataobj), label)


def test_affine_without_short_decimals_round_trips_to_float32_precision(tmp_path):
    affine = mio.affine_from_spacing((1 / 3, 0.7071067811865476, 1.1), origin_mm=(-123.456789, 0, 1e-3))
    vol = mio.load_image(mio.save_image(tmp_path / "a.nii", np.zeros((3, 3, 3)), affine).uri)
    np.testing.assert_allclose(vol.affine, affine, rtol=1e-7, atol=1e-9)


def test_save_image_is_deterministic(tmp_path, case):
    a = mio.save_image(tmp_path / "a.nii.gz", case[0], AFFINE)
    b = mio.save_image(tmp_path / "b.nii.gz", case[0], AFFINE)
    assert a.sha256 == b.sha256


def test_save_label_picks_uint8_or_uint16(tmp_path, case):
    _, label = case
    small = mio.load_label(mio.save_label(tmp_path / "s.nii.gz", label, AFFINE).uri)
    assert isinstance(small, mio.LabelVolume) and small.array.dtype == np.uint8
    np.testing.assert_array_equal(small.array, label)
    big_map = label.astype(np.int32)
    big_map[0, 0, 0] = 300
    big = mio.load_label(mio.save_label(tmp_path / "b.nii.gz", big_map, AFFINE).uri)
    assert big.array.dtype == np.uint16 and big.array[0, 0, 0] == 300


def test_save_label_refuses_fractional_or_negative_ids(tmp_path):
    with pytest.raises(LabelMapError, match=r"save_label expects integer label IDs, but got label_map with "
                                            r"dtype=float32 and non-integer values"):
        mio.save_label(tmp_path / "x.nii.gz", np.full((2, 2, 2), 0.5, np.float32), AFFINE)
    negative = np.zeros((2, 2, 2), np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(LabelMapError, match=r"save_label expects label IDs in 0..65535, but got range=\(-1, 0\)"):
        mio.save_label(tmp_path / "x.nii.gz", negative, AFFINE)


def test_load_label_refuses_an_image_file(tmp_path, case):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(case[0], AFFINE), path)  # float32 HU with fractions
    with pytest.raises(VolumeFileError, match=r"load_label expects integer label IDs, but got the data of .*"
                                              r"dtype=float32.*use load_image"):
        mio.load_label(path)


def test_write_refuses_to_overwrite_unless_asked(tmp_path, case):
    path = tmp_path / "img.nii.gz"
    first = mio.save_image(path, case[0], AFFINE)
    with pytest.raises(OutputExistsError, match=r"save_image expects a URI that does not exist yet, but got "
                                                r"uri=.*img.nii.gz', which exists. Pass overwrite=True"):
        mio.save_image(path, case[0] + 100, AFFINE)
    assert isinstance(OutputExistsError("x"), FileExistsError) and issubclass(OutputExistsError, MaisiError)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first.sha256
    second = mio.save_image(path, case[0] + 100, AFFINE, overwrite=True)
    assert second.sha256 != first.sha256


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path, case, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(mio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        mio.save_image(tmp_path / "img.nii.gz", case[0], AFFINE)
    assert os.listdir(tmp_path) == []


def test_fsspec_memory_uri_round_trip_and_overwrite_rule(case):
    image, label = case
    uri = "memory://ctfactory-test/case0/label.nii.gz"
    info = mio.save_label(uri, label, AFFINE)
    vol = mio.load_label(uri)
    np.testing.assert_array_equal(vol.array, label)
    np.testing.assert_array_equal(vol.affine, AFFINE)
    assert info.uri == uri
    with pytest.raises(OutputExistsError, match="Pass overwrite=True"):
        mio.save_label(uri, label, AFFINE)


def test_save_image_refuses_nan_bad_shape_bad_affine_and_bad_suffix(tmp_path):
    bad = np.zeros((4, 4, 4), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match=r"save_image expects finite values, but got 1 NaN/inf voxels"):
        mio.save_image(tmp_path / "a.nii.gz", bad, AFFINE)
    with pytest.raises(ImageError, match=r"save_image expects a 3D image \(X, Y, Z\), but got shape=\(4, 4\)"):
        mio.save_image(tmp_path / "a.nii.gz", np.zeros((4, 4)), AFFINE)
    with pytest.raises(AffineError, match=r"save_image expects an invertible affine"):
        mio.save_image(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)), np.zeros((4, 4)))
    with pytest.raises(VolumeFileError, match=r"save_image expects a URI ending in .nii or .nii.gz, but got "
                                              r"uri=.*a.nrrd"):
        mio.save_image(tmp_path / "a.nrrd", np.zeros((4, 4, 4)), AFFINE)
    assert os.listdir(tmp_path) == []


def test_load_missing_file_raises_not_found(tmp_path):
    with pytest.raises(VolumeNotFoundError, match=r"load_image expects an existing NIfTI file, but got uri="):
        mio.load_image(tmp_path / "nope.nii.gz")
    assert issubclass(VolumeNotFoundError, FileNotFoundError)


def test_save_preview_png_writes_a_png(case):
    buf = io.BytesIO()
    save_preview_png(case[0], case[1], buf)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LabelMapError, match=r"save_preview_png expects a label map of the image shape"):
        save_preview_png(case[0], case[1][:2], io.BytesIO())


def test_radiological_slices_put_the_patients_right_on_the_viewers_left():
    vol = np.zeros((10, 8, 6), np.int16)
    vol[8, 4, 3] = 1  # patient's right (high x), centre in y and z
    vol[5, 7, 3] = 2  # anterior (high y)
    vol[5, 4, 5] = 3  # superior (high z)
    axial = radiological_slices(vol, (5, 4, 3))["axial"]
    assert axial.shape == (8, 10)  # rows: y (bottom to top), columns: x shown right to left
    assert np.argwhere(axial == 1).tolist() == [[4, 1]]  # near the viewer's left edge
    assert np.argwhere(axial == 2).tolist() == [[7, 4]]  # anterior at the top
    coronal = radiological_slices(vol, (5, 4, 3))["coronal"]
    assert np.argwhere(coronal == 1).tolist() == [[3, 1]] and np.argwhere(coronal == 3).tolist() == [[5, 4]]
    sagittal = radiological_slices(vol, (5, 4, 3))["sagittal"]
    assert np.argwhere(sagittal == 2).tolist() == [[3, 0]]  # anterior on the viewer's left


def test_preview_center_goes_through_a_tumour():
    lab = np.full((16, 16, 16), 200, np.uint8)
    lab[10:13, 2:5, 11:14] = 23
    assert preview_center_vox(lab, lab.shape) == (11, 3, 12)
    assert preview_center_vox(np.full((16, 16, 16), 200, np.uint8), lab.shape) == (8, 8, 8)
    with pytest.raises(ImageError, match=r"save_preview_png expects center_vox inside the volume"):
        save_preview_png(lab.astype(np.float32), lab, io.BytesIO(), center_vox=(16, 0, 0))


def _nrrd_bytes(array: np.ndarray, *, encoding: str) -> bytes:
    import gzip

    header = (
        "NRRD0004\n# comment\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(str(s) for s in array.shape)}\n"
        "space directions: (0.5,0,0) (0,0.75,0) (0,0,2.5)\nkinds: domain domain domain\nendian: little\n"
        f"encoding: {encoding}\nspace origin: (-10,-20,30)\n\n"
    )
    payload = array.astype("<i2").tobytes(order="F")
    return header.encode() + (gzip.compress(payload) if encoding == "gzip" else payload)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_read_nrrd_converts_lps_to_ras_and_keeps_voxel_order(encoding):
    from maisi_core.evaluation.reference import read_nrrd

    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 12
    out, affine = read_nrrd(_nrrd_bytes(array, encoding=encoding))
    np.testing.assert_array_equal(out, array)
    np.testing.assert_array_equal(affine, [[-0.5, 0, 0, 10], [0, -0.75, 0, 20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    with pytest.raises(VolumeFileError, match=r"read_nrrd expects an NRRD file with attached data, but got a file "
                                              r"starting b'NIFTI"):
        read_nrrd(b"NIFTI...")


def _nifti_bytes(shape, dtype=np.uint8) -> bytes:
    data = np.random.default_rng(1).integers(0, 100, shape).astype(dtype)
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


def test_header_declaring_a_huge_volume_is_refused_before_allocation(tmp_path):
    header = bytearray(_nifti_bytes((4, 4, 4))[:352])
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(header)))
    hdr.set_data_shape((4096, 4096, 4096))
    small = tmp_path / "huge.nii"
    small.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    with pytest.raises(VolumeFileError, match=r"^load_label expects a volume of at most 2147483648 bytes, but got a "
                                              r"header declaring shape=\(4096, 4096, 4096\)"):
        mio.load_label(small)
    gz = tmp_path / "huge.nii.gz"
    gz.write_bytes(gzip.compress(small.read_bytes()))
    with pytest.raises(VolumeFileError, match=r"header declaring shape=\(4096, 4096, 4096\)"):
        mio.load_image(gz)


def test_gzip_bomb_inflating_past_its_header_is_refused(tmp_path):
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(_nifti_bytes((8, 8, 8)) + b"\x00" * (4 << 20), 9))  # 4 MiB more than declared
    with pytest.raises(VolumeFileError, match=r"load_label expects the data to inflate to the size its header "
                                              r"declares, but got more than \d+ bytes"):
        mio.load_label(bomb)


def test_truncated_and_corrupt_files_are_one_line_errors(tmp_path):
    good = gzip.compress(_nifti_bytes((16, 16, 16)))
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(VolumeFileError, match=r"expects a complete gzip stream, but got a truncated one"):
        mio.load_label(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(good[:10] + b"\xff" * 200)
    with pytest.raises(VolumeFileError, match=r"expects a valid gzip stream, but got a corrupt one"):
        mio.load_label(tmp_path / "junk.nii.gz")
    (tmp_path / "cut.nii").write_bytes(_nifti_bytes((16, 16, 16))[:600])
    with pytest.raises(VolumeFileError, match=r"expects the 4448 bytes its header declares, but got a file of 600 "
                                              r"bytes .*\(truncated\)"):
        mio.load_label(tmp_path / "cut.nii")


def test_multi_member_gzip_written_by_save_label_reads_back(tmp_path):
    big = np.random.default_rng(0).integers(0, 200, (256, 256, 160), dtype=np.uint8)  # > one 8 MiB chunk
    mio.save_label(tmp_path / "multi.nii.gz", big, np.eye(4))
    assert np.array_equal(mio.load_label(tmp_path / "multi.nii.gz").array, big)
