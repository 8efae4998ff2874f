"""Croissant 1.1 export: loads in mlcroissant without issues, RAI fields, SPDX licence, URL, no local paths."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from datetime import datetime, timezone

import mlcroissant as mlc
import pytest
from _catalog_cases import SPEC_ID, make_failed_record, write_case
from packaging.licenses import canonicalize_license_expression

from catalog.croissant import SPDX_LICENCES, check_dataset_url, check_no_local_paths, spdx_licence
from catalog.errors import ExportError
from catalog.export import export_croissant
from catalog.store import open_catalog

CARD = """# tiny-model v1

## Intended use

Testing the factory end to end.

## Limitations

The images are not CT-like.
"""
SPEC_JSON = '{"name":"demo","version":"1.0.0"}'
RECORDED = datetime(2025, 3, 4, 12, 30, tzinfo=timezone.utc)
USE = "From the model card (tiny-model v1), intended use: Testing the factory end to end."
LIMITS = "From the model card (tiny-model v1), limitations: The images are not CT-like."


def make_root(tmp_path, **dataset):
    """A catalog with two passing cases, one failed case and one datasets row (``dataset`` overrides)."""
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0, dataset_version="1.0.0"),
                        write_case(root, 1, label_ids=(5, 200), dataset_version="1.0.0"),
                        make_failed_record(2, dataset_version="1.0.0")])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1.0.0", "spec_id": SPEC_ID, "spec": SPEC_JSON,
                        "licence": "Apache-2.0 (code and weights; trained on procedural phantoms only)",
                        "model_card": CARD, "created_at": RECORDED} | dataset)
    return root


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path)


def export(root, dest, **kwargs):
    export_croissant(open_catalog(root), dest, **kwargs)
    return json.loads((dest / "croissant.json").read_text())


def test_export_croissant_loads_in_mlcroissant_without_issues(root, tmp_path, caplog):
    dest = tmp_path / "out"
    export(root, dest, url="https://example.org/datasets/demo")
    with caplog.at_level(logging.WARNING):
        dataset = mlc.Dataset(jsonld=str(dest / "croissant.json"))
        records = list(dataset.records("samples"))
    assert dataset.metadata.ctx.issues.errors == set()
    assert dataset.metadata.ctx.issues.warnings == set()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r["samples/sample_id"] for r in records] == [b"case_0000", b"case_0001"]  # the failed case is left out
    for record in records:
        image = dest / record["samples/image_path"].decode()
        assert hashlib.sha256(image.read_bytes()).hexdigest() == record["samples/image_sha256"].decode()
        assert (dest / record["samples/label_path"].decode()).is_file()
    assert records[0]["samples/seed"] == 1000 and records[1]["samples/tumor_label"] is None
    metadata = dataset.metadata
    assert metadata.license == ["https://spdx.org/licenses/Apache-2.0.html"]
    assert metadata.url == "https://example.org/datasets/demo"
    assert metadata.data_collection_type == ["Synthetic"]
    assert metadata.data_use_cases[0] == USE


def test_export_croissant_declares_1_1_files_and_record_set(root, tmp_path):
    dest = tmp_path / "out"
    doc = export(root, dest)
    assert doc["@type"] == "sc:Dataset" and doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    assert doc["@context"]["containedIn"] == "cr:containedIn" and doc["@context"]["isArray"] == "cr:isArray"
    files = {f["@id"]: f for f in doc["distribution"]}
    assert set(files) == {"samples.csv", "data/images/case_0000.nii.gz", "data/labels/case_0000.nii.gz",
                          "data/images/case_0001.nii.gz", "data/labels/case_0001.nii.gz"}
    image = dest / "data/images/case_0001.nii.gz"
    assert files["data/images/case_0001.nii.gz"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    (record_set,) = doc["recordSet"]
    assert record_set["key"] == {"@id": "samples/sample_id"}
    assert {f["name"] for f in record_set["field"]} >= {"sample_id", "image_path", "seed", "spec_id", "model_digest"}
    assert [r["sample_id"] for r in csv.DictReader((dest / "samples.csv").open())] == ["case_0000", "case_0001"]
    assert doc["version"] == "1.0.0" and doc["datePublished"] == "2025-03-04"  # the datasets row's date


def test_export_croissant_declares_synthetic_data_and_how_it_was_made(root, tmp_path):
    doc = export(root, tmp_path / "out")
    assert doc["rai:hasSyntheticData"] is True and doc["rai:dataCollectionType"] == ["Synthetic"]
    assert "not images of real patients and must not be used for clinical purposes" in doc["description"]
    assert any("must not be used for clinical purposes" in text for text in doc["rai:dataLimitations"])
    collection = doc["rai:dataCollection"]
    for fact in ("ctfactory 0.1.0+g123", "maisi-tiny (weights sha256:feed)", f"spec {SPEC_ID}", "seeds 1000 to 1001"):
        assert fact in collection
    activity = doc["prov:wasGeneratedBy"]
    assert activity["prov:wasAssociatedWith"] == [{"@type": "prov:SoftwareAgent", "prov:label": "ctfactory 0.1.0+g123",
                                                   "softwareVersion": "0.1.0+g123"}]
    model, spec = activity["prov:used"]
    assert model["name"] == "maisi-tiny" and model["identifier"] == "sha256:feed"
    assert spec["identifier"] == SPEC_ID and spec["prov:value"] == SPEC_JSON
    assert doc["rai:dataBiases"][0].endswith("body_region abdomen 1, chest 1; pathology hepatic_tumor 1, none 1; "
                                             "cohort test 1, train 1.")


def test_export_croissant_takes_use_and_limitations_from_the_model_card(root, tmp_path):
    doc = export(root, tmp_path / "out")
    assert doc["rai:dataUseCases"][0] == USE and doc["rai:dataLimitations"][0] == LIMITS


@pytest.mark.parametrize(("card", "expected"), [
    ("", "No model card was recorded for this dataset version, so nothing states the generator's limitations."),
    ("# A card\n\nNo sections.\n",
     "The model card recorded for this dataset version does not state the generator's limitations."),
])
def test_export_croissant_says_when_the_model_card_does_not_tell(tmp_path, card, expected):
    doc = export(make_root(tmp_path, model_card=card), tmp_path / "out")
    assert doc["rai:dataLimitations"][0] == expected


@pytest.mark.parametrize(("recorded", "expected"), [
    ("Apache-2.0 (code and weights; trained on procedural phantoms only)", "Apache-2.0"),
    ("CC-BY-4.0", "CC-BY-4.0"),
    ("mit, see LICENSE.", "MIT"),
    ("  cc0-1.0 (public domain)", "CC0-1.0"),
])
def test_spdx_licence_takes_the_leading_id(recorded, expected):
    assert spdx_licence(recorded) == expected


@pytest.mark.parametrize("recorded", [
    "NVIDIA Open Model License (released MAISI CT weights); code Apache-2.0", "Apache-2.0-or-whatever", "", None])
def test_spdx_licence_refuses_text_without_a_leading_id(recorded):
    with pytest.raises(ExportError, match=rf"export_croissant expects the catalog's licence to start with an SPDX id, "
                                          rf"but got licence={re.escape(repr(recorded))}\. Pass the dataset's "
                                          r"licence as licence=ID \(--licence ID\), one of: Apache-2\.0, MIT, "):
        spdx_licence(recorded)


def test_spdx_licence_override_wins_and_is_checked():
    assert spdx_licence("NVIDIA Open Model License", override="cc-by-nc-4.0") == "CC-BY-NC-4.0"
    with pytest.raises(ExportError, match=r"export_croissant expects licence to be an SPDX id, one of: Apache-2\.0, "
                                          r".*, but got licence='CC-BY-4'\. Did you mean 'CC-BY-4\.0'\?$"):
        spdx_licence("Apache-2.0", override="CC-BY-4")


def test_spdx_licences_are_canonical_spdx_ids():
    for licence in SPDX_LICENCES:
        assert canonicalize_license_expression(licence) == licence


def test_export_croissant_licence_keyword_and_refusal_before_writing(tmp_path):
    root = make_root(tmp_path, licence="NVIDIA Open Model License (released MAISI CT weights)")
    with pytest.raises(ExportError, match=r"export_croissant expects the catalog's licence to start with an SPDX id"):
        export_croissant(open_catalog(root), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    doc = export(root, tmp_path / "out", licence="CC-BY-NC-4.0")
    assert doc["license"] == "https://spdx.org/licenses/CC-BY-NC-4.0.html"


def test_export_croissant_url_is_given_or_left_out(root, tmp_path):
    assert "url" not in export(root, tmp_path / "plain")
    assert export(root, tmp_path / "with", url="https://huggingface.co/datasets/org/demo")["url"] == (
        "https://huggingface.co/datasets/org/demo")


@pytest.mark.parametrize("url", ["/srv/data/demo", "file:///srv/data/demo", "example.org/demo", "ftp://host/x",
                                 "https://"])
def test_check_dataset_url_refuses_what_is_not_an_absolute_web_address(url):
    with pytest.raises(ExportError, match=rf"export_croissant expects url to be an absolute http\(s\) URL of the "
                                          rf"dataset's page, but got url={url!r}\. Pass the address"):
        check_dataset_url(url)


def test_export_croissant_names_no_local_path(root, tmp_path):
    dest = tmp_path / "out"
    export(root, dest)
    for name in ("croissant.json", "samples.csv"):
        text = (dest / name).read_text()
        assert str(tmp_path) not in text and "file:" not in text


def test_export_croissant_refuses_a_model_card_naming_the_catalog_root(tmp_path):
    root = tmp_path / "root"
    root = make_root(tmp_path, model_card=f"# Card\n\n## Limitations\n\nWeights in {root}/models.\n")
    with pytest.raises(ExportError, match=r"export_croissant expects paths relative to the export folder, but got "
                                          rf"croissant\.json naming the local path '{root}'\."):
        export_croissant(open_catalog(root), tmp_path / "out")


def test_check_no_local_paths_tells_a_path_from_a_url_spelling_it():
    check_no_local_paths('{"url": "https://huggingface.co/datasets/demo"}', ["/datasets"], file="croissant.json")
    with pytest.raises(ExportError, match=r"naming the local path '/datasets'"):
        check_no_local_paths('{"x": "see /datasets/demo"}', ["/datasets"], file="croissant.json")


def test_export_croissant_is_byte_identical_when_repeated(root, tmp_path):
    export(root, tmp_path / "first")
    export(root, tmp_path / "second")
    export(root, tmp_path / "first", overwrite=True)
    for name in ("croissant.json", "samples.csv"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_export_croissant_without_a_datasets_row_needs_a_licence_and_dates_from_the_cases(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0, created_at=RECORDED), write_case(root, 1, created_at=RECORDED)])
    with pytest.raises(ExportError, match=r"but got licence=None\. Pass the dataset's licence as licence=ID"):
        export_croissant(cat, tmp_path / "refused")
    doc = export(root, tmp_path / "out", licence="MIT")
    assert doc["license"] == "https://spdx.org/licenses/MIT.html" and doc["datePublished"] == "2025-03-04"
    assert doc["rai:dataUseCases"][0].startswith("No model card was recorded for this dataset version")
    assert doc["prov:wasGeneratedBy"]["prov:used"][1]["description"] == (
        "The catalog holds no copy of this spec's content.")
