"""The viewer page in headless Chromium (slow tier): list, filter, open a 64³ case, check the WebGL picture.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; WebGL2 runs on
SwiftShader (``--use-angle=swiftshader --enable-unsafe-swiftshader``), no GPU needed. Screenshots and
the measured timings go to ``$CTFACTORY_ARTIFACTS`` when set, else to the test's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _catalog_cases import make_failed_record, make_record
from _viewer import serving

from catalog.store import open_catalog

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
               "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--hide-scrollbars")
SIZE = 64
LOAD_TIMEOUT_S = 60
TUMOUR_VOXEL = (43, 29, 17)  # inside the phantom's hepatic tumour (centre (43.5, 29.5, 17.5), radius 4)


def write_phantom_case(root: Path, index: int, **overrides):
    """Write a 64³ CT-like phantom (body, lungs, liver with a tumour, spine) and return its passing record."""
    grid = np.indices((SIZE, SIZE, SIZE)).astype(np.float32) - SIZE / 2 + 0.5
    x, y, z = grid
    image = np.full((SIZE,) * 3, -1000, dtype=np.int16)
    label = np.zeros((SIZE,) * 3, dtype=np.uint8)
    body = (x / 28) ** 2 + (y / 20) ** 2 <= 1
    image[body], label[body] = 40, 200
    for side, lung_id in ((-1, 28), (1, 30)):  # RAS+: +x is the patient's right
        lung = ((x - side * 12) / 9) ** 2 + (y / 12) ** 2 + ((z - 10) / 18) ** 2 <= 1
        image[lung], label[lung] = -820, lung_id
    liver = ((x - 10) / 12) ** 2 + ((y + 2) / 10) ** 2 + ((z + 14) / 10) ** 2 <= 1
    image[liver], label[liver] = 60, 1
    tumour = (x - 12) ** 2 + (y + 2) ** 2 + (z + 14) ** 2 <= 16
    image[tumour], label[tumour] = 110, 26
    spine = (x / 4) ** 2 + ((y + 14) / 4) ** 2 <= 1  # posterior: -y
    image[spine & body], label[spine & body] = 700, 33
    affine = np.diag([2.5, 2.5, 2.5, 1.0])
    name = f"case_{index:04d}"
    files = {}
    for kind, data in (("images", image), ("labels", label)):
        path = root / kind / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        files[kind] = path
    values = dict(image_uri=f"images/{name}.nii.gz", label_uri=f"labels/{name}.nii.gz",
                  image_sha256=hashlib.sha256(files["images"].read_bytes()).hexdigest(),
                  label_sha256=hashlib.sha256(files["labels"].read_bytes()).hexdigest(),
                  image_bytes=files["images"].stat().st_size, label_bytes=files["labels"].stat().st_size,
                  output_size=(SIZE,) * 3, spacing_mm=(2.5,) * 3)
    values.update(overrides)
    return make_record(index, **values)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("CTFACTORY_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"needs {missing} (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_phantom_case(root, i) for i in range(3)] + [make_failed_record(3)])
    with serving(root) as server:
        yield server


def body_attribute(driver, name: str) -> str | None:
    return driver.find_element("tag name", "body").get_attribute(name)


def click_at_voxel(driver, canvas, voxel: tuple[int, int, int]) -> None:
    """Click the canvas where NiiVue draws the centre of ``voxel`` (of the image volume).

    The slices are first moved through the voxel (a point shows on a slice only when it lies in it).
    """
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = driver.execute_script(
        "const nv = window.ctfactoryViewer.state.nv; const v = nv.volumes[0];"
        "const mm = v.vox2mm(arguments[0], v.matRAS);"
        "const frac = nv.mm2frac(mm); nv.scene.crosshairPos = frac; nv.drawScene();"
        "const pos = nv.frac2canvasPos(frac);"
        "return [pos[0] / window.devicePixelRatio, pos[1] / window.devicePixelRatio];", list(voxel))
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, round(x - size["width"] / 2),
                                                      round(y - size["height"] / 2)).click().perform()


def lung_blue(picture: np.ndarray) -> float:
    """Median blue of the coloured (label) pixels: the right lung (ID 30) is cyan, the left (ID 28) green."""
    coloured = (picture.max(axis=-1) - picture.min(axis=-1)) > 40
    return float(np.median(picture[coloured][:, 2]))


def case_rows(driver) -> list[str]:
    # read in one script call: the list re-renders while a filter applies, and element handles fetched one by
    # one can go stale between calls (seen in CI under load)
    return driver.execute_script("return Array.from(document.querySelectorAll('#cases tbody tr'), "
                                 "tr => tr.getAttribute('data-sample-id'));")


def canvas_picture(canvas) -> tuple[np.ndarray, bytes]:
    """The canvas as an ``(H, W, 3)`` int16 RGB array, and the PNG it came from."""
    from PIL import Image

    png = canvas.screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16), png


def check_list_and_filters(browser, wait) -> None:
    from selenium.webdriver.support.ui import Select

    wait.until(lambda d: body_attribute(d, "data-state") != "loading")
    assert body_attribute(browser, "data-state") == "ready", browser.find_element("id", "count").text
    assert case_rows(browser) == ["case_0000", "case_0001", "case_0002", "case_0003"]
    assert browser.find_element("id", "count").text == "4 of 4 cases"
    Select(browser.find_element("name", "body_region")).select_by_value("chest")
    wait.until(lambda d: case_rows(d) == ["case_0001", "case_0003"])
    assert browser.find_element("id", "count").text == "2 of 4 cases"
    Select(browser.find_element("name", "body_region")).select_by_value("")
    Select(browser.find_element("name", "pathology")).select_by_value("hepatic_tumor")
    wait.until(lambda d: case_rows(d) == ["case_0000"])


def check_rendered_case(browser, canvas) -> None:
    """The canvas shows a picture (not uniform) with coloured labels over the grey CT, named after MAISI."""
    picture, _ = canvas_picture(canvas)
    assert picture.std() > 20, "the WebGL canvas is uniform"
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    overlay = (np.abs(picture[..., 0] - picture[..., 1]) > 60) | (np.abs(picture[..., 1] - picture[..., 2]) > 60)
    assert overlay.mean() > 0.01, "no coloured label overlay on the grey CT"
    loaded = browser.execute_script(
        "const nv = window.ctfactoryViewer.state.nv;"
        "return [nv.volumes.length, nv.volumes[1].colormapLabel.labels[1], nv.volumes[1].colormapLabel.labels[26],"
        "        nv.volumes[0].cal_min, nv.volumes[0].cal_max];")
    assert loaded == [2, "liver", "hepatic tumor", -160, 240]  # soft tissue window W400/L40
    legend = browser.find_element("id", "legend").text
    assert "1 liver" in legend and "26 hepatic tumor" in legend and "200 body (not drawn)" in legend


def check_axial_slice(browser, canvas, artifacts: Path) -> None:
    """Through both lungs: background untinted, the patient's right on the screen's left."""
    browser.find_element("css selector", '#views button[data-view="axial"]').click()
    browser.execute_script("const nv = window.ctfactoryViewer.state.nv;"
                           "nv.scene.crosshairPos = [0.5, 0.5, 0.5]; nv.drawScene();")
    axial, png = canvas_picture(canvas)
    (artifacts / "viewer_axial.png").write_bytes(png)
    height, width = axial.shape[:2]
    corner = axial[4:12, (width - height) // 2 + 4:(width - height) // 2 + 12]  # in the volume, outside the body
    assert corner.max() < 20, "background voxels (label 0) must not be tinted by the label colours"
    blue_left, blue_right = (lung_blue(half) for half in np.array_split(axial, 2, axis=1))
    assert blue_left > blue_right + 50, "radiological convention: the right lung (ID 30, cyan) on the screen's left"


def test_viewer_page_lists_filters_and_renders_a_case(browser, server, artifacts):
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, LOAD_TIMEOUT_S)
    browser.get(server.url)
    check_list_and_filters(browser, wait)

    browser.find_element("css selector", '#cases tbody tr[data-sample-id="case_0000"]').click()
    wait.until(lambda d: body_attribute(d, "data-case-state") in ("rendered", "error"))
    assert body_attribute(browser, "data-case-state") == "rendered", browser.find_element("id", "location").text
    assert body_attribute(browser, "data-case") == "case_0000"
    canvas = browser.find_element("id", "gl")
    check_rendered_case(browser, canvas)
    click_at_voxel(browser, canvas, TUMOUR_VOXEL)
    wait.until(lambda d: "hepatic tumor" in d.find_element("id", "location").text)
    check_axial_slice(browser, canvas, artifacts)

    browser.find_element("css selector", '#windows button[data-window="lung"]').click()
    window = browser.execute_script("const v = window.ctfactoryViewer.state.nv.volumes[0];"
                                    "return [v.cal_min, v.cal_max];")
    assert window == [-1350, 150]  # lung window W1500/L-600
    browser.find_element("css selector", '#views button[data-view="render"]').click()
    browser.execute_script("window.ctfactoryViewer.state.nv.drawScene()")
    (artifacts / "viewer_render.png").write_bytes(canvas_picture(canvas)[1])
    browser.find_element("css selector", '#views button[data-view="multiplanar"]').click()
    browser.find_element("css selector", '#windows button[data-window="soft_tissue"]').click()
    browser.save_screenshot(str(artifacts / "viewer_page.png"))

    timings = browser.execute_script("return window.ctfactoryViewer.timings")
    (artifacts / "viewer_timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    assert timings["pageReadyMs"] > 0 and timings["caseRenderMs"] > 0
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
