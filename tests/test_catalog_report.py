"""The HTML dataset card: self-contained, with generation facts, counts, plots, structures, metrics and previews."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from _catalog_cases import make_failed_record, write_case

from catalog.errors import ReportError
from catalog.report import build_report_html, spec_yaml, write_report
from catalog.report_cases import preview_rows, voxel_counts
from catalog.report_html import display_root, render_markdown
from catalog.report_metrics import describe_metric
from catalog.store import open_catalog
from flows.cli import main

MODEL_CARD = """# Tiny test model <script>alert(1)</script>

Trained on phantoms.

## Intended use

Smoke tests of the **factory**.

## Limitations

- Not realistic CT.
- No texture.

![curves](https://example.org/curves.png)

## Licence

Apache-2.0
"""


@pytest.fixture(scope="module")
def report_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_root")
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i, organ_median={"liver": 60.0 + 10 * i, "spleen": 45.0 - 5 * i,
                                                             "bone": 400.0}) for i in range(4)]
                       + [make_failed_record(9, attempt=2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec": "name: demo\ncount: 4\n",
                        "licence": "CC-BY-4.0", "fd_radimagenet_resnet50": 3.25,
                        "metrics": {"diversity_ms_ssim": 0.41},
                        "metric_sources": {"fd_radimagenet_resnet50": "radimagenet-resnet50 1.0"}})  # a map, not a metric
    return root


def test_report_html_is_self_contained_with_sections(report_root, tmp_path):
    dest = tmp_path / "card.html"
    assert main(["report", str(report_root), "--dest", str(dest), "--previews", "2"]) == 0
    text = dest.read_text()
    assert not re.search(r'(src|href)="(?!data:)', text)  # no external assets
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3  # the HU plot and two previews
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    for needle in ("spec-abc123", "maisi-tiny", "sha256:feed", "0.1.0+g123", "1000 – 1009 (5 cases)", "name: demo",
                   "CC-BY-4.0", "fd_radimagenet_resnet50", "3.25", "diversity_ms_ssim", "case_0001"):
        assert needle in text, needle
    assert "Cases passing QC: <b class=\"pass\">4</b> of 5 (80.0 %)" in text
    # four cases passed at their first attempt; the failed one used attempts 0, 1 and 2
    assert "Generation attempts: 7; passing at the first attempt: 4 of 5 cases (80.0 %)" in text
    assert "<td>liver</td><td>1</td>" in text  # failure reasons by organ
    assert "Synthetic CT, not for clinical use." in text
    assert "No model card was recorded" in text


def test_report_names_the_root_by_its_folder_never_its_local_path(tmp_path):
    root = tmp_path / "my_dataset"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i) for i in range(3)])
    (root / "labels" / "case_0001.nii.gz").write_bytes(b"not a nifti")  # a damaged file's error names no path
    (root / "images" / "case_0002.nii.gz").unlink()
    html = build_report_html(cat)
    assert "Dataset root my_dataset, samples version 0." in html
    assert str(tmp_path) not in html and str(root) not in html
    assert "case_0001: no preview, its image or label cannot be read (File my_dataset/labels/" in html
    assert "case_0002: no preview, its image or label cannot be read (missing)." in html
    # the structures still count case_0002's label; case_0001's is left out and named
    assert "1 case(s) could not be read and are left out: case_0001." in html
    assert "<td>1</td><td>liver</td><td>0.0405 (1/1)</td><td>0.0405 (1/1)</td>" in html
    assert display_root("s3://AKIA:secret@bucket/prefix/ds?versionId=3") == "s3://bucket/prefix/ds"
    assert display_root("file:///data/sets/ds/") == "ds"


def test_report_as_of_and_errors(report_root, tmp_path):
    html = build_report_html(open_catalog(report_root), as_of=0, max_previews=0)
    assert "samples version 0" in html and html.count("<img") == 1  # the HU plot only
    assert "No preview of cohort(s) test, train: the card was asked for 0 preview(s)" in html
    with pytest.raises(ReportError, match=r"report expects --dest to be a file in an existing folder, but got dest="):
        write_report(open_catalog(report_root), tmp_path / "no" / "card.html")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report_root, tmp_path):
    dest = write_report(open_catalog(report_root), tmp_path / "card.html")
    shot = tmp_path / "card.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tempfile.mkdtemp()}", f"--screenshot={shot}", "--window-size=1200,2000",
         f"file://{dest}"],
        check=True, capture_output=True, timeout=120,
    )
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000


def test_preview_rows_show_every_cohort_tumours_first():
    rows = [{"sample_id": f"d-{c}-{i:05d}", "cohort": c} for c in ("a", "b") for i in range(3)]
    rows.append({"sample_id": "d-c-00000", "cohort": "c"})
    picked = preview_rows(rows, 4)
    assert [r["sample_id"] for r in picked] == ["d-a-00000", "d-b-00000", "d-c-00000", "d-a-00001"]
    assert preview_rows(rows, 0) == [] and preview_rows([], 3) == []
    rows[4]["tumor_label"] = 23  # d-b-00001 holds the cohort's tumour: it is shown first
    assert [r["sample_id"] for r in preview_rows(rows, 3)] == ["d-a-00000", "d-b-00001", "d-c-00000"]


def test_report_previews_every_cohort_through_its_tumour(tmp_path):
    cat = open_catalog(tmp_path)
    records = [write_case(tmp_path, i, cohort=f"cohort_{i}", label_ids=(1, 200), tumor_label=None,
                          pathology="none", tumor_size_mm=None) for i in range(1, 6)]
    records.append(write_case(tmp_path, 6, cohort="liver_lesions", label_ids=(1, 26, 200), tumor_label=26,
                              pathology="hepatic_tumor", tumor_size_mm=12.5, tumor_diameter_mm=11.0,
                              tumor_contrast_hu=-35.0))
    records.append(write_case(tmp_path, 7, cohort="lung_nodules", label_ids=(1, 200), tumor_label=23,
                              pathology="lung_tumor", tumor_size_mm=20.0))
    records.append(write_case(tmp_path, 8, cohort="user_masks", label_ids=(24, 200), tumor_label=None,
                              pathology="none", tumor_size_mm=None))  # a mask's own tumour is cut too
    cat.append_samples(records)
    html = build_report_html(cat)  # eight cohorts: eight previews by default, one each
    assert html.count("<figure><img") == 8
    assert "seed 1008. Slices through the pancreatic tumor (label 24) at voxel (2, 3, 3), circled.</figcaption>" in html
    for cohort in ("cohort_1", "cohort_5", "liver_lesions", "lung_nodules"):
        assert f"cohort {cohort}," in html
    # write_case puts the hepatic tumour at x 3..4, y 2..4, z 2..4: the voxel nearest its centroid
    assert ("Slices through the hepatic tumor (label 26) at voxel (3, 3, 3), circled. Requested 12 mm, measured "
            "11 mm, tumour -35 HU against its host.") in html
    assert ("The cohort asks for lung_tumor (lung tumor, label 23) but this label map holds no voxel of it; the "
            "slices go through the volume&#x27;s centre.") in html
    assert "No preview of cohort" not in html


def test_report_tabulates_tumours_and_structure_volumes(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i, tumor_label=26, tumor_size_mm=18.0 + i, tumor_contrast_hu=-30.0 - i,
                                   tumor_diameter_mm=20.0 + i) for i in range(3)])
    html = build_report_html(cat)
    # case 0 is "test"; cases 1 and 2 are "train"
    assert ("<td>test</td><td>1</td><td>hepatic tumor</td><td>18 (18 … 18)</td><td>20 (20 … 20)</td>"
            "<td>-30 (-30 … -30)</td>") in html
    assert ("<td>train</td><td>2</td><td>hepatic tumor</td><td>20 (19 … 20)</td><td>22 (21 … 22)</td>"
            "<td>-32 (-32 … -31)</td>") in html
    # 1.5 x 1.5 x 2.0 mm voxels (0.0045 mL): liver keeps 9 voxels, the tumour 18 (write_case's layout)
    assert "<th>test: median mL (cases)</th><th>train: median mL (cases)</th>" in html
    assert "<td>1</td><td>liver</td><td>0.0405 (1/1)</td><td>0.0405 (2/2)</td>" in html
    assert "<td>26</td><td>hepatic tumor</td><td>0.081 (1/1)</td><td>0.081 (2/2)</td>" in html


def test_voxel_counts_count_each_label_and_skip_background():
    import numpy as np

    label = np.zeros((4, 4, 40), np.uint8)  # more z slices than one slab
    label[0, 0, :] = 200
    label[1, 1, 30:35] = 7
    assert voxel_counts(label) == {7: 5, 200: 40}
    assert voxel_counts(label.astype(np.int16) * -1 + 0) == {-7: 5, -200: 40}  # not bincount's domain: unique


def test_report_explains_each_metric_with_its_reference(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i) for i in range(2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "fd_radiomics": 40.0, "fd_radiomics_ref": 2.0,
                        "metrics": {"fd_radiomics_axial": 30.0, "memorisation_radiomics_fraction": 0.0,
                                    "metric_odd_thing": 1.5}})
    html = build_report_html(cat, max_previews=0)
    assert "<td>fd_radiomics</td><td>40</td><td>2 (fd_radiomics_ref)</td>" in html
    assert "here 20× it" in html
    assert "<td>fd_radiomics_axial</td><td>30</td><td>2 (fd_radiomics_ref, mean of the planes)</td>" in html
    assert "<td>metric_odd_thing</td><td>1.5</td><td>—</td><td>No description is recorded for this metric" in html
    assert "≈ 0.05 for fresh samples" in html


def test_describe_metric_knows_each_name_validate_writes():
    metrics = {"fd_astra": 9.0, "fd_astra_ref": 3.0}
    names = ["fd_astra", "fd_astra_ref", "fd_astra_sagittal", "diversity_astra_mean_pairwise",
             "diversity_astra_near_duplicate_pairs", "memorisation_astra_fraction",
             "memorisation_astra_closer_than_own_nn", "metric_n_generated", "metric_n_reference"]
    notes = {name: describe_metric(name, metrics) for name in names}
    assert all("No description" not in n.measures for n in notes.values())
    assert notes["fd_astra"].reference == "3 (fd_astra_ref)" and "Astra" in notes["fd_astra"].measures
    assert notes["diversity_astra_near_duplicate_pairs"].reference == "0"
    assert "No description" in describe_metric("diversity_ms_ssim", {}).measures  # never guessed


def test_report_puts_intended_use_and_limitations_first_and_embeds_the_model_card(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i) for i in range(2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "model_card": MODEL_CARD})
    html = build_report_html(cat, max_previews=0)
    use = html.index("<h3>Intended use</h3>")
    assert html.index("Synthetic CT, not for clinical use.") < use < html.index("<h2>What generated it</h2>")
    assert "<p>Smoke tests of the <b>factory</b>.</p>" in html[use:]
    assert "<ul><li>Not realistic CT.</li><li>No texture.</li></ul>" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<p>[image: curves]</p>" in html and "example.org" not in html  # the card's image stays text
    assert "<h4>Licence</h4>" in html  # the card's own "##" headings sit under the page's h2 (its "#" is h3)


def test_render_markdown_escapes_html_and_keeps_structure():
    markdown = "# T\n\ntext <b>x</b>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\n<raw>\n```\n"
    out = render_markdown(markdown, heading_shift=1)
    assert out.split("\n") == ["<h2>T</h2>", "<p>text &lt;b&gt;x&lt;/b&gt;</p>",
                               "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>",
                               "<pre>&lt;raw&gt;</pre>"]


def test_report_shows_the_spec_as_yaml_in_spec_order(tmp_path):
    spec = {"version": "1", "seed": 3, "name": "demo", "cohorts": [{"qc": {"max_retries": 2}, "count": 2,
                                                                      "name": "a", "body_region": ["chest"]}],
            "runtime": {"device": "cpu"}, "description": "x"}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    assert spec_yaml(canonical).splitlines() == [
        "name: demo", "version: '1'", "description: x", "seed: 3", "cohorts:", "- name: a", "  count: 2",
        "  body_region: [chest]", "  qc: {max_retries: 2}", "runtime: {device: cpu}"]
    assert spec_yaml("name: demo\n") == "name: demo\n"  # YAML text is shown as it is
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i) for i in range(2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec": canonical})
    html = build_report_html(cat, max_previews=0)
    assert "<h3>Spec (YAML)</h3><pre>name: demo\nversion: &#x27;1&#x27;\n" in html and canonical not in html


def test_catalog_report_imports_neither_torch_nor_prefect():
    code = ("import sys, catalog.report, catalog.report_cases, catalog.report_metrics, catalog.report_html; "
            "print(sorted(m for m in ('torch', 'monai', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]"
