"""Exports: nnU-Net v2 (consecutive labels), MSD datalist (MONAI loadable), Croissant JSON-LD."""

from __future__ import annotations



import json

import nibabel as nib
import numpy as np
import pytest
from _catalog_cases import make_failed_record, write_case

from catalog.errors import ExportError, ExportExistsError
from catalog.export import export_dataset, export_msd, export_nnunet
from catalog.verify import verify_catalog
from catalog.store import open_catalog


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0, label_ids=(1, 26, 200)), write_case(root, 1, label_ids=(5, 200)),
                        make_failed_record(2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "licence": "CC-BY-4.0"})
    return root


def test_export_nnunet_layout_and_consecutive_labels(root, tmp_path):
    result = export_nnunet(open_catalog(root), tmp_path / "raw", dataset_id=42)
    folder = tmp_path / "raw" / "Dataset042_Demo"
    assert result.path == folder and result.num_cases == 2
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["case_0000_0000.nii.gz", "case_0001_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz"]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "liver": 1, "right kidney": 2, "hepatic tumor": 3, "body": 4}
    assert meta["maisi_label_ids"] == {"1": 1, "2": 5, "3": 26, "4": 200}
    assert result.label_ids == {1: 1, 2: 5, 3: 26, 4: 200}
    original = np.asanyarray(nib.load(root / "labels" / "case_0000.nii.gz").dataobj)
    remapped = np.asanyarray(nib.load(folder / "labelsTr" / "case_0000.nii.gz").dataobj)
    assert sorted(np.unique(remapped).tolist()) == [0, 1, 3, 4]
    lut = {0: 0, 1: 1, 26: 3, 200: 4}
    assert np.array_equal(remapped, np.vectorize(lut.get)(original))
    # Images are copied with identical bytes; the source stays in place, and an edit of the export stays there.
    src = root / "images" / "case_0000.nii.gz"
    exported = folder / "imagesTr" / "case_0000_0000.nii.gz"
    assert src.exists() and exported.read_bytes() == src.read_bytes()
    assert exported.stat().st_ino != src.stat().st_ino and src.stat().st_nlink == 1
    before = src.read_bytes()
    with exported.open("ab") as fh:
        fh.write(b"edited")
    assert src.read_bytes() == before


def test_exports_name_the_rows_modality_and_refuse_mixed_modalities(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0, modality="MR"), write_case(root, 1, modality="MR")])
    export_nnunet(cat, tmp_path / "raw", dataset_id=7)
    meta = json.loads((tmp_path / "raw" / "Dataset007_Demo" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"} and meta["description"].startswith("Synthetic MR")
    export_msd(cat, tmp_path / "msd")
    assert json.loads((tmp_path / "msd" / "dataset.json").read_text())["modality"] == {"0": "MR"}
    cat.append_samples([write_case(root, 2)])
    with pytest.raises(ExportError, match=r"export expects images of one modality, but got modality=\['CT', 'MR'\]"):
        export_nnunet(cat, tmp_path / "mixed", dataset_id=8)
    assert not (tmp_path / "mixed").exists()  # refused before anything is written


def test_export_refuses_non_empty_destination_unless_overwrite(root, tmp_path):
    dest = tmp_path / "raw"
    export_nnunet(open_catalog(root), dest, dataset_id=42)
    with pytest.raises(ExportExistsError, match=r"export expects an empty or new destination, but got dest=.*raw"):
        export_nnunet(open_catalog(root), dest, dataset_id=42)
    result = export_nnunet(open_catalog(root), dest, dataset_id=42, overwrite=True)
    assert result.num_cases == 2
    with pytest.raises(ExportError, match=r"dataset_id in 1..999, but got dataset_id=1000"):
        export_nnunet(open_catalog(root), tmp_path / "other", dataset_id=1000)


def test_export_msd_loads_with_monai(root, tmp_path):
    from monai.data import load_decathlon_datalist

    dest = tmp_path / "msd"
    export_msd(open_catalog(root), dest)
    items = load_decathlon_datalist(str(dest / "dataset.json"), is_segmentation=True,
                                    data_list_key="training", base_dir=str(dest))
    assert len(items) == 2
    assert items[0]["image"] == str(dest / "imagesTr" / "case_0000.nii.gz")
    assert nib.load(items[1]["label"]).shape == (8, 8, 8)
    meta = json.loads((dest / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "5": "right kidney", "26": "hepatic tumor", "200": "body"}
    assert meta["modality"] == {"0": "CT"} and meta["licence"] == "CC-BY-4.0"
    assert meta["ctfactory"]["synthetic"] is True


def test_export_without_passing_samples_and_bad_format(tmp_path):
    cat = open_catalog(tmp_path / "root")
    cat.append_samples([make_failed_record(0)])
    with pytest.raises(ExportError, match=r"export expects at least one passing sample, but got 0 at version=0"):
        export_msd(cat, tmp_path / "out")
    with pytest.raises(ExportError, match=r"export expects format in \['nnunet', 'msd', 'croissant', 'dicom'\], but got format='coco'"):
        export_dataset(cat, tmp_path / "out", format="coco")


def test_export_as_of_exports_that_version_only(root, tmp_path):
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 5, label_ids=(3, 200))])
    assert export_msd(cat, tmp_path / "new").num_cases == 3
    assert export_msd(cat, tmp_path / "old", as_of=0).num_cases == 2


def test_link_is_opt_in_and_verify_catches_an_edit_through_it(root, tmp_path):
    src = root / "images" / "case_0000.nii.gz"
    export_msd(open_catalog(root), tmp_path / "copied")
    assert src.stat().st_nlink == 1  # the default copies
    result = export_dataset(open_catalog(root), tmp_path / "linked", format="msd", link=True)
    linked = result.path / "imagesTr" / "case_0000.nii.gz"
    assert linked.stat().st_ino == src.stat().st_ino and src.stat().st_nlink == 2
    assert verify_catalog(open_catalog(root)).ok
    with linked.open("ab") as fh:  # the stated risk: editing the export edits the catalog's file
        fh.write(b"edited")
    report = verify_catalog(open_catalog(root))
    assert not report.ok and "case_0000" in str(report)


def test_export_options_of_one_format_are_refused_with_another(root, tmp_path):
    with pytest.raises(ExportError, match=r"export expects url only with format='croissant', but got format='msd'"):
        export_dataset(open_catalog(root), tmp_path / "a", format="msd", url="https://example.org/ds")
    with pytest.raises(ExportError, match=r"export expects link=False with format='dicom', but got link=True"):
        export_dataset(open_catalog(root), tmp_path / "b", format="dicom", link=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", ["nnunet", "msd", "croissant"])
def test_exports_name_no_local_path(root, tmp_path, fmt):
    """An export is read elsewhere: no file it writes names the catalog's or the export's local folder."""
    result = export_dataset(open_catalog(root), tmp_path / "out", format=fmt, dataset_id=42)
    texts = [p.read_text() for p in result.path.rglob("*") if p.suffix in (".json", ".csv")]
    assert texts and not any(str(tmp_path) in t for t in texts)
