"""The HTML dataset card: self-contained, with generation facts, counts, plots and previews."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile

import pytest
from _catalog_cases import make_failed_record, write_case

from catalog.errors import ReportError
from catalog.report import build_report_html, write_report
from catalog.store import open_catalog
from flows.cli import main


@pytest.fixture(scope="module")
def report_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_root")
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i, organ_median={"liver": 60.0 + 10 * i, "spleen": 45.0 - 5 * i,
                                                             "bone": 400.0}) for i in range(4)]
                       + [make_failed_record(9, attempt=2)])
    cat.append_dataset({"dataset": "demo", "dataset_version": "1", "spec": "name: demo\ncount: 4\n",
                        "licence": "CC-BY-4.0", "fd_radimagenet_resnet50": 3.25,
                        "metrics": {"diversity_ms_ssim": 0.41}})
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


def test_report_as_of_and_errors(report_root, tmp_path):
    html = build_report_html(open_catalog(report_root), as_of=0, max_previews=0)
    assert "samples version 0" in html and "<img" in html
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


def test_preview_rows_show_every_cohort():
    from catalog.report import preview_rows

    rows = [{"sample_id": f"d-{c}-{i:05d}", "cohort": c} for c in ("a", "b") for i in range(3)]
    rows.append({"sample_id": "d-c-00000", "cohort": "c"})
    picked = preview_rows(rows, 4)
    assert [r["sample_id"] for r in picked] == ["d-a-00000", "d-b-00000", "d-c-00000", "d-a-00001"]
    assert preview_rows(rows, 0) == [] and preview_rows([], 3) == []


def test_report_shows_tumour_contrast_per_cohort_and_in_captions(tmp_path):
    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i, tumor_label=26, tumor_contrast_hu=-30.0 - i,
                                   tumor_diameter_mm=20.0 + i) for i in range(3)])
    html = build_report_html(cat)
    assert "contrast HU, median (range)" in html
    assert "<td>test</td><td>1</td><td>-30 (-30 … -30)</td><td>20</td>" in html  # cases 1 and 2 are "train"
    assert "<td>train</td><td>2</td><td>-32 (-32 … -31)</td><td>22</td>" in html
    assert "tumour -30 HU against its host, 20 mm" in html
