"""The volume browser (``ctfactory view``): its routes, filters, path rule, read-only methods and CLI.

The server runs in a thread on a free port against tiny 8x8x8 catalogs; requests go through
``http.client`` so raw, unnormalised paths reach the server as written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _catalog_cases import make_failed_record, make_record, write_case
from _viewer import serving

from catalog.root import DatasetRoot
from catalog.store import open_catalog
from catalog.viewer import NIIVUE_VERSION, WINDOW_PRESETS, build_label_colormap, build_viewer_server
from catalog.viewer.server import STATIC_DIR
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value-never-logged"




def request(server, path: str, *, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """Send one request as written; return ``(status, headers, body)``."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(server, path: str):
    status, headers, body = request(server, path)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Four passing cases and one failed one (cohort, body_region, pathology from make_record's pattern)."""
    root = tmp_path_factory.mktemp("viewer") / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, i) for i in range(4)])
    cat.append_samples([make_failed_record(4, tumor_contrast_hu=float("nan"))])
    return root


@pytest.fixture(scope="module")
def server(root):
    with serving(root) as server:
        yield server


def test_viewer_lists_every_case_with_its_volume_urls(server):
    status, listing = get_json(server, "/api/samples")
    assert status == 200
    assert (listing["version"], listing["total"], listing["count"]) == (1, 5, 5)
    ids = [c["sample_id"] for c in listing["samples"]]
    assert ids == [f"case_{i:04d}" for i in range(5)]
    first, failed = listing["samples"][0], listing["samples"][4]
    assert first["image_url"] == "/volumes/case_0000/image.nii.gz"
    assert first["label_url"] == "/volumes/case_0000/label.nii.gz"
    assert (failed["status"], failed["image_url"], failed["label_url"]) == ("failed", None, None)


@pytest.mark.parametrize(("query", "expected"), [
    ("cohort=test", [0, 3]),
    ("body_region=chest", [1, 3]),
    ("pathology=hepatic_tumor", [0, 4]),
    ("qc=fail", [4]),
    ("qc=pass", [0, 1, 2, 3]),
    ("status=failed", [4]),
    ("cohort=train&body_region=abdomen", [2, 4]),
    ("cohort=&qc=", [0, 1, 2, 3, 4]),
    ("cohort=nobody", []),
])
def test_viewer_filters_the_case_list(server, query, expected):
    status, listing = get_json(server, f"/api/samples?{query}")
    assert status == 200
    assert [c["sample_id"] for c in listing["samples"]] == [f"case_{i:04d}" for i in expected]
    assert listing["total"] == len(expected)


def test_viewer_pages_the_case_list(server):
    _, listing = get_json(server, "/api/samples?limit=2&offset=3")
    assert (listing["total"], listing["count"], listing["offset"]) == (5, 2, 3)
    assert [c["sample_id"] for c in listing["samples"]] == ["case_0003", "case_0004"]


@pytest.mark.parametrize(("query", "message"), [
    ("region=chest", "viewer expects filters from ['body_region', 'cohort', 'limit', 'offset', 'pathology', 'qc', "
                     "'status'], but got region='chest'."),
    ("qc=maybe", "viewer expects qc in ['pass', 'fail'], but got qc='maybe'."),
    ("limit=0", "viewer expects limit an integer in [1, 100000], but got limit='0'."),
    ("offset=x", "viewer expects offset an integer in [0, 100000], but got offset='x'."),
])
def test_viewer_bad_filter_is_400_with_the_rule(server, query, message):
    status, answer = get_json(server, f"/api/samples?{query}")
    assert (status, answer) == (400, {"error": message})


def test_viewer_catalog_summary_has_facets_and_ct_windows(server, root):
    status, summary = get_json(server, "/api/catalog")
    assert status == 200
    assert (summary["root"], summary["version"], summary["pinned"], summary["total"]) == (str(root), 1, False, 5)
    assert summary["facets"] == {"cohort": ["test", "train"], "body_region": ["abdomen", "chest"],
                                 "pathology": ["hepatic_tumor", "none"], "status": ["failed", "passed"],
                                 "qc": ["pass", "fail"]}
    windows = {w["key"]: (w["width_hu"], w["level_hu"], w["min_hu"], w["max_hu"]) for w in summary["windows"]}
    assert windows["soft_tissue"] == (400.0, 40.0, -160.0, 240.0)
    assert windows["lung"] == (1500.0, -600.0, -1350.0, 150.0)
    assert windows["bone"] == (1800.0, 400.0, -500.0, 1300.0)
    assert summary["viewer"] == {"library": "niivue", "version": NIIVUE_VERSION}


def test_viewer_full_row_is_strict_json(server):
    status, row = get_json(server, "/api/samples/case_0004")
    assert status == 200
    assert (row["sample_id"], row["status"], row["tumor_contrast_hu"]) == ("case_0004", "failed", None)
    assert row["qc_failures"] == ["liver: median 250.0 HU outside [-21.6, 162.0]"]


@pytest.mark.parametrize("kind", ["image", "label"])
def test_viewer_volume_is_the_files_bytes(server, root, kind):
    expected = (root / f"{kind}s" / "case_0001.nii.gz").read_bytes()
    status, headers, body = request(server, f"/volumes/case_0001/{kind}.nii.gz")
    assert status == 200
    assert body == expected
    assert headers["content-type"] == "application/gzip"
    assert headers["content-length"] == str(len(expected))
    assert "content-encoding" not in headers  # the browser must not unzip it; NiiVue reads the .gz itself
    status, head_headers, head_body = request(server, f"/volumes/case_0001/{kind}.nii.gz", method="HEAD")
    assert (status, head_body, head_headers["content-length"]) == (200, b"", str(len(expected)))
    status, _, body = request(server, f"/volumes/case_0001/{kind}.nii.gz", headers={"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")


UNKNOWN_CASE = ("viewer expects a sample_id of the catalog (version 1), but got sample_id='case_9999'. "
                "List them at /api/samples.")


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/volumes/case_9999/image.nii.gz", 404, UNKNOWN_CASE),
    ("/api/samples/case_9999", 404, UNKNOWN_CASE),
    ("/volumes/case_0004/image.nii.gz", 404,
     "viewer expects a case with volume files, but got sample_id='case_0004' with status='failed'. "
     "Failed cases have no files."),
    ("/volumes/case_0001/image.nii", 404,
     "viewer expects a volume named image or label with the file's suffix, but got name='image.nii' for "
     "sample_id='case_0001'."),
    ("/nowhere", 404, "viewer expects a path of its routes (/, /static/..., /api/catalog, /api/samples, /api/labels, "
                      "/volumes/...), but got path='/nowhere'."),
])
def test_viewer_unknown_things_are_json_errors(server, path, status, message):
    assert get_json(server, path) == (status, {"error": message})


@pytest.mark.parametrize("path", [
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/static/..%2fserver.py",
    "/static/%2E%2E%2Fcases.py",
    "/volumes/../images/case_0001.nii.gz",
    "/volumes/case_0001/../../images/case_0001.nii.gz",
    "/volumes/%2e%2e%2fimages%2fcase_0001.nii.gz/image.nii.gz",
    "/volumes/%2Fetc%2Fpasswd/image.nii.gz",
    "//etc/passwd",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/static/..\\server.py",
    "http://127.0.0.1/static/../server.py",
    "/images/case_0001.nii.gz",
    "/catalog/samples/_delta_log/00000000000000000000.json",
])
def test_viewer_refuses_paths_that_escape(server, root, path):
    status, headers, body = request(server, path)
    assert status in (400, 404)
    assert headers["content-type"] == "application/json"
    assert set(json.loads(body)) == {"error"}
    assert body != (root / "images" / "case_0001.nii.gz").read_bytes()


def test_viewer_dot_segments_are_400_with_the_rule(server):
    status, answer = get_json(server, "/static/%2e%2e/server.py")
    assert (status, answer) == (400, {"error": "viewer expects a path of plain names without '.' or '..' segments, "
                                               "but got path='/static/%2e%2e/server.py'."})


def test_viewer_refuses_rows_whose_uri_leaves_the_root(tmp_path):
    """A row written around the catalog's checks (``..`` in its URI) and a volume that is a link out: 404."""
    import deltalake

    from catalog.schema import SAMPLES_SCHEMA, rows_to_table

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.nii.gz"
    secret.write_bytes(b"not for the viewer")
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0), write_case(root, 1)])
    (root / "images" / "case_0001.nii.gz").unlink()
    (root / "images" / "case_0001.nii.gz").symlink_to(secret)
    rogue = write_case(root, 2).to_row()
    rogue["image_uri"] = "../outside/secret.nii.gz"
    deltalake.write_deltalake(str(root / "catalog" / "samples"), rows_to_table([rogue], SAMPLES_SCHEMA), mode="append")
    with serving(root) as server:
        assert request(server, "/volumes/case_0000/image.nii.gz")[0] == 200
        for sample_id in ("case_0001", "case_0002"):
            status, headers, body = request(server, f"/volumes/{sample_id}/image.nii.gz")
            assert status == 404
            assert b"not for the viewer" not in body
            assert "expects a path that stays inside" in json.loads(body)["error"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_viewer_answers_other_methods_with_405(server, root, method):
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    status, headers, body = request(server, "/api/samples", method=method, body=b'{"sample_id": "x"}')
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body) == {"error": f"viewer expects a method in ['GET', 'HEAD'] (it is read-only), but got "
                                         f"method='{method}'."}
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.parametrize(("path", "content_type", "name"), [
    ("/", "text/html; charset=utf-8", "index.html"),
    ("/static/niivue.umd.js", "text/javascript; charset=utf-8", "niivue.umd.js"),
    ("/static/viewer.js", "text/javascript; charset=utf-8", "viewer.js"),
    ("/static/viewer.css", "text/css; charset=utf-8", "viewer.css"),
    ("/static/niivue-LICENSE.txt", "text/plain; charset=utf-8", "niivue-LICENSE.txt"),
])
def test_viewer_serves_its_static_files_with_their_content_types(server, path, content_type, name):
    status, headers, body = request(server, path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert body == (STATIC_DIR / name).read_bytes()


def test_viewer_page_loads_nothing_from_elsewhere():
    page = (STATIC_DIR / "index.html").read_text()
    assert '<script src="/static/niivue.umd.js"></script>' in page
    for name in ("index.html", "viewer.js", "viewer.css"):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    bundle = (STATIC_DIR / "niivue.umd.js").read_text()
    assert f'"{NIIVUE_VERSION}"' in bundle  # the bundle is the version the server reports
    assert "BSD 2-Clause License" in (STATIC_DIR / "niivue-LICENSE.txt").read_text()
    vendored = (STATIC_DIR / "VENDORED.txt").read_text()
    assert f"@niivue/niivue {NIIVUE_VERSION}" in vendored
    assert hashlib.sha256((STATIC_DIR / "niivue.umd.js").read_bytes()).hexdigest() in vendored


def test_viewer_refuses_a_foreign_host_header(server):
    """DNS rebinding: a page on another domain that resolves to 127.0.0.1 still sends its own name."""
    status, _, body = request(server, "/api/catalog", headers={"Host": f"attacker.example:{server.port}"})
    assert status == 400
    assert json.loads(body)["error"] == ("viewer expects requests addressed to 127.0.0.1 or ::1 or localhost (it "
                                         f"listens on loopback only), but got Host='attacker.example:{server.port}'.")
    for host in (f"localhost:{server.port}", "localhost:9000", "[::1]:9000", "127.0.0.1"):  # tunnels may change port
        assert request(server, "/api/catalog", headers={"Host": host})[0] == 200, host


def test_viewer_follows_new_commits_unless_pinned(tmp_path):
    root = tmp_path / "root"
    cat = open_catalog(root)
    cat.append_samples([write_case(root, 0)])
    with serving(root) as latest, serving(root, as_of=0) as pinned:
        cat.append_samples([write_case(root, 1)])
        assert get_json(latest, "/api/catalog")[1]["version"] == 1
        assert get_json(latest, "/api/samples")[1]["total"] == 2
        assert request(latest, "/volumes/case_0001/image.nii.gz")[0] == 200
        summary = get_json(pinned, "/api/catalog")[1]
        assert (summary["version"], summary["pinned"], summary["total"]) == (0, True, 1)
        assert request(pinned, "/volumes/case_0001/image.nii.gz")[0] == 404


def test_label_colormap_names_every_maisi_label():
    from maisi_core.anatomy.labels import known_ids, label_name

    cmap = build_label_colormap()
    assert cmap["I"] == sorted(known_ids())
    assert all(len(cmap[k]) == len(cmap["I"]) for k in ("R", "G", "B", "A", "labels"))
    by_id = {i: (cmap["labels"][k], (cmap["R"][k], cmap["G"][k], cmap["B"][k]), cmap["A"][k])
             for k, i in enumerate(cmap["I"])}
    assert by_id[0][0] == "background" and by_id[0][2] == 0
    assert by_id[200][0] == "body" and by_id[200][2] == 0  # the envelope would hide every organ
    assert by_id[1] == (label_name(1), by_id[1][1], 255)
    assert by_id[26][1] == (255, 0, 0)  # hepatic tumour
    drawn = [c for _, c, a in by_id.values() if a]
    assert len(drawn) == len(set(drawn))  # every drawn label has its own colour


def test_window_presets_span_their_width_around_their_level():
    for preset in WINDOW_PRESETS:
        low, high = preset.range_hu
        assert (high - low, (high + low) / 2) == (preset.width_hu, preset.level_hu)


def test_viewer_package_imports_no_torch_or_prefect():
    code = ("import sys, catalog.viewer, flows.cli_view\n"
            "print(','.join(m for m in ('torch', 'monai', 'prefect') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_cli_view_without_a_catalog_exits_2(tmp_path, capsys):
    assert main(["view", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ctfactory view: Catalog expects a samples table at {tmp_path / 'empty'}/catalog/samples, but got "
                   "none. Append rows first or check ROOT.")


def test_cli_view_unknown_version_exits_2(root, capsys):
    assert main(["view", str(root), "--as-of", "9"]) == 2
    assert capsys.readouterr().err.strip() == ("ctfactory view: Catalog expects a samples version in [0, 1], but got "
                                               "version=9.")


def test_cli_view_port_in_use_exits_2(root, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["view", str(root), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ctfactory view expects an address it can listen on, but got host='127.0.0.1' port={port} (")
    assert err.endswith("). Pick another --port (0 picks a free one).")


def test_cli_view_bad_port_is_refused_by_the_parser(root, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["view", str(root), "--port", "70000"])
    assert exc.value.code == 2
    assert "--port expects an integer in [0, 65535] (0 picks a free port), but got '70000'" in capsys.readouterr().err


def test_cli_view_serves_until_ctrl_c_and_never_logs_secrets(root):
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows", "view", str(root), "--storage-option", f"AWS_SECRET_ACCESS_KEY={SECRET}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("serving at" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = next(line for line in lines if "serving at" in line).split("serving at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        host, port = url[len("http://"):].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/api/samples?qc=pass")
        assert json.loads(conn.getresponse().read())["total"] == 4
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "ctfactory view: stopped by SIGINT." in err
    assert '"GET /api/samples?qc=pass HTTP/1.1" 200' in err  # one line per request...
    assert SECRET not in "".join(lines) + out + err  # ...and never a storage secret


def test_viewer_serves_an_s3_root(tmp_path):
    """An s3:// root: the list from its Delta table, a volume's bytes through fsspec."""
    import fsspec
    from s3_server import local_s3_server

    local = tmp_path / "local"
    records = [write_case(local, i) for i in range(2)]
    with local_s3_server(bucket="viewer") as s3:
        fs = fsspec.filesystem("s3", **s3.fsspec_options)
        fs.put(str(local / "images"), "viewer/ds/images", recursive=True)
        fs.put(str(local / "labels"), "viewer/ds/labels", recursive=True)
        open_catalog("s3://viewer/ds", storage_options=s3.delta_options).append_samples(records)
        server = build_viewer_server(DatasetRoot.of("s3://viewer/ds", s3.delta_options))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            assert get_json(server, "/api/samples?body_region=chest")[1]["total"] == 1
            status, _, body = request(server, "/volumes/case_0001/label.nii.gz")
            assert (status, body) == (200, (local / "labels" / "case_0001.nii.gz").read_bytes())
        finally:
            server.shutdown()
            server.server_close()


def test_make_record_fixture_still_validates_uris():
    """The rogue-row test writes around this check on purpose: the catalog itself refuses such a row."""
    from catalog.errors import RecordError

    with pytest.raises(RecordError, match=r"expects image_uri relative to the output root"):
        make_record(0, image_uri="../outside/secret.nii.gz")


def test_viewer_serves_uncompressed_nifti_under_its_own_suffix(tmp_path):
    import nibabel as nib

    root = tmp_path / "root"
    write_case(root, 0)
    for kind in ("images", "labels"):
        gz = root / kind / "case_0000.nii.gz"
        nib.save(nib.load(str(gz)), str(root / kind / "case_0000.nii"))
        gz.unlink()
    open_catalog(root).append_samples([make_record(0, image_uri="images/case_0000.nii",
                                                   label_uri="labels/case_0000.nii", output_size=(8, 8, 8))])
    with serving(root) as server:
        case = get_json(server, "/api/samples")[1]["samples"][0]
        assert case["image_url"] == "/volumes/case_0000/image.nii"
        assert case["label_url"] == "/volumes/case_0000/label.nii"
        status, headers, body = request(server, case["image_url"])
        assert (status, headers["content-type"]) == (200, "application/octet-stream")
        assert body == (root / "images" / "case_0000.nii").read_bytes()
        assert request(server, "/volumes/case_0000/image.nii.gz")[0] == 404
