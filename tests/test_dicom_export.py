"""DICOM export: CT series + SEG read back independently (pydicom, highdicom), provenance, UIDs, refusals, CLI."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import logging
import threading
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from _catalog_cases import make_record, write_case

from catalog.dicom import FALLBACK_NAMES, MANIFEST, PRIVATE_SCHEME, export_dicom, plan_geometry, write_ct_series
from catalog.errors import ExportError, ExportExistsError
from catalog.export import export_dataset
from catalog.store import open_catalog
from flows.cli import main
from maisi_core.anatomy.labels import known_ids, label_name

SHAPE = (12, 10, 8)  # X, Y, Z: unequal so a swapped axis shows
LIVER, KIDNEY_R, HEPATIC_TUMOR, BODY = 1, 5, 26, 200
AFFINES = {
    "ras": np.array([[1.5, 0, 0, -7.0], [0, 2.0, 0, 12.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]]),
    "lps": np.array([[-1.5, 0, 0, 9.0], [0, -2.0, 0, -4.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]]),
}


def _write_volumes(root: Path, index: int, affine: np.ndarray, label: np.ndarray, **overrides):
    """Write an image/label pair on ``affine`` under ``root`` and return its passing record."""
    image = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 2000 - 1000).astype(np.int16)  # every voxel distinct-ish
    name = f"case_{index:04d}"
    paths = {}
    for kind, data in (("images", image), ("labels", label.astype(np.uint8))):
        path = root / kind / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        paths[kind] = path
    values = dict(image_uri=f"images/{name}.nii.gz", label_uri=f"labels/{name}.nii.gz",
                  image_sha256=hashlib.sha256(paths["images"].read_bytes()).hexdigest(),
                  label_sha256=hashlib.sha256(paths["labels"].read_bytes()).hexdigest(),
                  image_bytes=paths["images"].stat().st_size, label_bytes=paths["labels"].stat().st_size,
                  output_size=SHAPE, mask_source="phantom")
    values.update(overrides)
    return make_record(index, **values)


def _liver_right_label(affine: np.ndarray) -> np.ndarray:
    """Body everywhere inside, liver on the patient's right (the larger RAS x), a tumour inside it, a kidney."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:-1, 1:-1, 1:-1] = BODY
    right_is_high_i = affine[0, 0] > 0  # +i runs toward larger RAS x, i.e. toward the patient's right
    liver = slice(8, 11) if right_is_high_i else slice(1, 4)
    label[liver, 2:6, 2:6] = LIVER
    label[liver, 3, 3] = HEPATIC_TUMOR
    label[(slice(8, 11) if right_is_high_i else slice(1, 4)), 7:9, 5:7] = KIDNEY_R
    return label


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    records = [_write_volumes(root, i, affine, _liver_right_label(affine))
               for i, affine in enumerate(AFFINES.values())]
    open_catalog(root).append_samples(records)
    return root


def _ct_world_values(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT series with pydicom; return the LPS centre of every pixel ``(N, 3)`` and its HU ``(N,)``."""
    points, values = [], []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        world = (np.array(ds.ImagePositionPatient, dtype=float) + c[..., None] * dc * row_dir
                 + r[..., None] * dr * col_dir)
        points.append(world.reshape(-1, 3))
        values.append((ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).reshape(-1))
    return np.concatenate(points), np.concatenate(values)


def _seg_world_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a binary SEG with pydicom; return the LPS centre ``(N, 3)`` and segment number ``(N,)`` of set pixels."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    points, numbers = [], []
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        r, c = np.nonzero(frame)
        origin = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        points.append(origin + np.outer(c * dc, orientation[:3]) + np.outer(r * dr, orientation[3:]))
        numbers.append(np.full(len(r), group.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
    return np.concatenate(points), np.concatenate(numbers)


def _to_voxels(points_lps: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """LPS points -> integer NIfTI voxel indices (asserting they land on voxel centres)."""
    ras = points_lps * np.array([-1.0, -1.0, 1.0])
    ijk = (np.linalg.inv(affine_ras) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    assert np.allclose(ijk, np.round(ijk), atol=1e-4)
    return np.round(ijk).astype(int)


@pytest.mark.parametrize("kind,index", [("ras", 0), ("lps", 1)])
def test_export_dicom_round_trip_voxels_geometry_and_liver_on_the_right(root, tmp_path, kind, index):
    result = export_dicom(open_catalog(root), tmp_path / "out")
    case = tmp_path / "out" / f"case_{index:04d}"
    affine = AFFINES[kind]
    image = np.asanyarray(nib.load(root / "images" / f"case_{index:04d}.nii.gz").dataobj)
    label = np.asanyarray(nib.load(root / "labels" / f"case_{index:04d}.nii.gz").dataobj)
    points, values = _ct_world_values(case / "CT")
    ijk = _to_voxels(points, affine)
    assert len(points) == image.size and len(np.unique(ijk, axis=0)) == image.size  # every voxel exactly once
    assert np.array_equal(values, image[tuple(ijk.T)])
    first = pydicom.dcmread(case / "CT" / "0001.dcm")
    assert sorted(float(v) for v in first.PixelSpacing) == [1.5, 2.0] and float(first.SliceThickness) == 2.5
    assert float(first.SpacingBetweenSlices) == 2.5 and first.pixel_array.dtype == np.int16
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, 0.0)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # radiological display

    seg_points, numbers = _seg_world_labels(case / "SEG" / "seg.dcm")
    seg = pydicom.dcmread(case / "SEG" / "seg.dcm")
    maisi = {int(s.SegmentNumber): int(s.SegmentDescription.split()[2].rstrip(":")) for s in seg.SegmentSequence}
    rebuilt = np.zeros_like(label)
    rebuilt[tuple(_to_voxels(seg_points, affine).T)] = [maisi[n] for n in numbers]
    assert np.array_equal(rebuilt, label) and result.label_ids == {1: 1, 5: 5, 26: 26, 200: 200}
    # The liver lies on the patient's right: negative x in DICOM's LPS frame, left of the body's centre.
    liver_x = seg_points[numbers == 1, 0].mean()
    body_x = seg_points[:, 0].mean()
    assert liver_x < body_x and liver_x < 0
    # highdicom's reader agrees (second, independent check of the SEG geometry).
    volume = hd.seg.segread(case / "SEG" / "seg.dcm").get_volume(combine_segments=True)
    liver_ijk = np.argwhere(volume.array == 1).mean(axis=0)
    liver_lps = volume.affine @ np.append(liver_ijk, 1.0)
    assert np.isclose(liver_lps[0], liver_x, atol=1e-6)


def test_export_dicom_provenance_patient_and_segment_codes(root, tmp_path):
    export_dicom(open_catalog(root), tmp_path / "out")
    case = tmp_path / "out" / "case_0000"
    ct, seg = pydicom.dcmread(case / "CT" / "0003.dcm"), pydicom.dcmread(case / "SEG" / "seg.dcm")
    for ds in (ct, seg):
        assert ds.SyntheticData == "YES"
        assert ds.PatientID == "case_0000" and str(ds.PatientName) == "SYNTHETIC^demo"
        synth = [e for e in ds.ContributingEquipmentSequence
                 if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"]
        assert len(synth) == 1
        code = synth[0].PurposeOfReferenceCodeSequence[0]
        assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("DCM", "Synthesizing Equipment")
        assert synth[0].Manufacturer == "ctfactory" and synth[0].ManufacturerModelName == "maisi-tiny"
        assert synth[0].DeviceSerialNumber == "sha256:feed" and synth[0].SoftwareVersions == "0.1.0+g123"
        assert "sample_id=case_0000" in synth[0].ContributionDescription
    assert ct.SOPClassUID == pydicom.uid.CTImageStorage and ct.Modality == "CT" and seg.Modality == "SEG"
    assert ct.StudyInstanceUID == seg.StudyInstanceUID and ct.FrameOfReferenceUID == seg.FrameOfReferenceUID
    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert list(segments) == ["liver", "right kidney", "hepatic tumor", "body"]
    liver = segments["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodingSchemeDesignator) == ("10200004", "SCT")
    kidney = segments["right kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    tumour = segments["hepatic tumor"]
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"
    body = segments["body"].SegmentedPropertyTypeCodeSequence[0]
    assert (body.CodeValue, body.CodingSchemeDesignator, body.CodeMeaning) == ("200", PRIVATE_SCHEME, "body")
    assert seg.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_segment_codes_cover_every_maisi_label():
    from catalog.dicom import segment_description

    names = {label_name(i) for i in known_ids() if i != 0}
    assert set(FALLBACK_NAMES) <= names  # no typo in the fallback list
    for lid in sorted(known_ids() - {0}):
        item = segment_description(1, lid, label_name(lid), mask_source="phantom", code_version="1")
        scheme = item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator
        assert scheme == (PRIVATE_SCHEME if label_name(lid) in FALLBACK_NAMES else "SCT"), label_name(lid)


def test_export_dicom_uids_are_deterministic_and_distinct(root, tmp_path):
    def uids(folder: Path) -> dict[str, tuple[str, ...]]:
        out = {}
        for path in sorted(folder.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[str(path.relative_to(folder))] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                  ds.FrameOfReferenceUID)
        return out

    first = uids(export_dicom(open_catalog(root), tmp_path / "a").path)
    second = uids(export_dicom(open_catalog(root), tmp_path / "b").path)
    assert first == second and len(first) == 2 * (SHAPE[2] + 1)
    sops = [v[2] for v in first.values()]
    assert len(set(sops)) == len(sops)
    assert len({v[0] for v in first.values()}) == 2  # one study per case
    for path in sorted((tmp_path / "a").rglob("*.dcm")):  # byte-identical: no export-time timestamps
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert [c["ct_instances"] for c in manifest["cases"]] == [SHAPE[2]] * 2


def test_export_dicom_refuses_unknown_labels_and_missing_files_leaving_nothing(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0), write_case(root, 1, label_ids=(1, 2, 200))])  # 2: a dummy slot
    with pytest.raises(ExportError, match=r"export_dicom expects label IDs of the MAISI dictionary, but got "
                                          r"label=\[2\] for sample_id='case_0001'"):
        export_dicom(cat, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    root2 = tmp_path / "root2"
    cat2 = open_catalog(root2)
    cat2.append_samples([write_case(root2, 0), write_case(root2, 1)])
    (root2 / "labels" / "case_0001.nii.gz").unlink()
    with pytest.raises(ExportError, match=r"export_dicom expects the label file of every passing case, but got "
                                          r"label_uri='labels/case_0001.nii.gz' missing for sample_id='case_0001'"):
        export_dicom(cat2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mr = tmp_path / "mr"
    open_catalog(mr).append_samples([write_case(mr, 0, modality="MR")])
    with pytest.raises(ExportError, match=r"export_dicom expects CT rows .*, but got modality='MR'"):
        export_dicom(open_catalog(mr), tmp_path / "out")


def test_export_dicom_overwrite_and_no_local_paths(root, tmp_path):
    dest = tmp_path / "out"
    export_dataset(open_catalog(root), dest, format="dicom")
    with pytest.raises(ExportExistsError, match=r"export expects an empty or new destination"):
        export_dicom(open_catalog(root), dest)
    (dest / "case_0000" / "CT" / "0001.dcm").write_bytes(b"edited")
    export_dicom(open_catalog(root), dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["case_0000", "case_0001", MANIFEST]  # no staging left
    assert pydicom.dcmread(dest / "case_0000" / "CT" / "0001.dcm").Modality == "CT"
    for path in dest.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert str(root).encode() not in data and str(tmp_path).encode() not in data, path


class _SliceOnly:
    """A NIfTI ``dataobj`` stand-in that serves single ``[:, :, k]`` slices and refuses whole-volume reads."""

    def __init__(self, data: np.ndarray):
        self.data, self.reads = data, []

    def __getitem__(self, key):
        assert isinstance(key, tuple) and key[:2] == (slice(None), slice(None)) and isinstance(key[2], int)
        self.reads.append(key[2])
        return self.data[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole volume was read at once")


def test_write_ct_series_streams_one_slice_at_a_time(tmp_path):
    data = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 500).astype(np.int16)
    image = type("Image", (), {"dataobj": _SliceOnly(data)})()
    row = dataclasses.asdict(make_record(0)) | {"created_at": None}
    headers = write_ct_series(image, plan_geometry(AFFINES["ras"], SHAPE), row, tmp_path / "CT")
    assert image.dataobj.reads == list(range(SHAPE[2]))
    assert len(headers) == SHAPE[2] and not any("PixelData" in h for h in headers)
    assert len(list((tmp_path / "CT").glob("*.dcm"))) == SHAPE[2]


def test_plan_geometry_flips_to_radiological_and_refuses_shear():
    ras = plan_geometry(AFFINES["ras"], SHAPE)
    assert ras.flip == (True, True) and [float(v) for v in ras.orientation] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ras.position(0)] == [7.0 - 1.5 * 11, -12.0 - 2.0 * 9, 30.0]
    assert plan_geometry(AFFINES["lps"], SHAPE).flip == (False, False)
    sheared = AFFINES["ras"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ExportError, match=r"export_dicom expects an affine with orthogonal voxel axes, but got "
                                          r"a largest \|cosine\|=0\.24"):
        plan_geometry(sheared, SHAPE)


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with 401 and remembers the Authorization headers it saw."""

    seen: list[str] = []

    def _deny(self):
        self.seen.append(self.headers.get("Authorization", ""))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _deny

    def log_message(self, *args):  # keep the test output clean
        pass


def test_cli_export_dicom_to_server_never_prints_the_password(root, tmp_path, monkeypatch, capsys, caplog):
    secret = "Hunter2-very-secret"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    monkeypatch.setenv("CTFACTORY_DICOMWEB_PASSWORD", secret)
    caplog.set_level(logging.DEBUG)
    try:
        code = main(["catalog", "export", str(root), "--format", "dicom", "--dest", str(tmp_path / "out"),
                     "--to", url, "--dicomweb-user", "tester"])
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    token = base64.b64encode(f"tester:{secret}".encode()).decode()
    assert code == 2 and _Unauthorized.seen and _Unauthorized.seen[0] == f"Basic {token}"  # it was sent
    assert f"send_dicom_export expects the DICOMweb server at {url} to accept a STOW-RS store, but got HTTP 401" in err
    everything = out + err + caplog.text
    assert secret not in everything and token not in everything
    assert "exported 2 cases" in out and (tmp_path / "out" / MANIFEST).is_file()


def test_cli_export_to_refuses_other_formats_credentials_in_url_and_missing_password(root, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.delenv("CTFACTORY_DICOMWEB_PASSWORD", raising=False)
    base = ["catalog", "export", str(root), "--dest", str(tmp_path / "out")]
    assert main(base + ["--format", "nnunet", "--to", "http://127.0.0.1:9/dicom-web"]) == 2
    assert "catalog export expects --format dicom with --to, but got format='nnunet'." in capsys.readouterr().err
    assert main(base + ["--format", "dicom", "--to", "http://u:Pass-in-url-77@127.0.0.1:9/dicom-web"]) == 2
    err = capsys.readouterr().err
    assert "send_dicom_export expects a URL without credentials, but got url='http://127.0.0.1:9/dicom-web'" in err
    assert "Pass-in-url-77" not in err
    assert main(base + ["--format", "dicom", "--to", "http://127.0.0.1:9/dicom-web", "--dicomweb-user", "u"]) == 2
    assert "in the environment variable CTFACTORY_DICOMWEB_PASSWORD, but got none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main(base + ["--format", "dicom"]) == 0
    assert "exported 2 cases of version 0 as dicom" in capsys.readouterr().out
