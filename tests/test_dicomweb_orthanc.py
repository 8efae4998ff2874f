"""Slow tier: the DICOM export checked by dciodvfy (dicom3tools) and stored on a real Orthanc over DICOMweb.

Needs Debian's ``dicom3tools``, ``orthanc`` and ``orthanc-dicomweb``; each test skips with the reason when
its tool is absent. Orthanc runs on 127.0.0.1 with free ports, a temporary config and storage, and basic
authentication on.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from _catalog_cases import write_case

from catalog.dicom import MANIFEST, export_dicom
from catalog.store import open_catalog
from flows.cli import main

pytestmark = pytest.mark.slow

USER, PASSWORD = "tester", "orthanc-Test-pass-42"
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
# dicom3tools 1.00~20220618 (Debian 12) predates Synthetic Data (0008,001C) in its data dictionary: it reports
# the attribute as an unknown even-group tag. pydicom 3 and the current standard know it.
OUTDATED_DICTIONARY_ERROR = "Attribute with an even group number is not a recognized standard attribute"


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    open_catalog(root).append_samples([write_case(root, 0, label_ids=(1, 26, 200)),
                                       write_case(root, 1, label_ids=(5, 14, 200))])
    return root


def test_dciodvfy_reports_no_errors(root, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not found: apt-get install dicom3tools")
    export_dicom(open_catalog(root), tmp_path / "out")
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(files) == 2 * (8 + 1)
    errors, warnings = [], set()
    for path in files:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        text = report.stdout + report.stderr
        outdated = "(0x0008,0x001c)  ?  - Warning - Unrecognized tag" in text
        for line in text.splitlines():
            if line.startswith("Error") and not (outdated and OUTDATED_DICTIONARY_ERROR in line
                                                 and "(0x0008,0x001c)" in line):
                errors.append(f"{path.relative_to(tmp_path)}: {line}")
            elif "Warning" in line:
                warnings.add(line.strip())
    assert errors == []
    print("dciodvfy warnings:", *sorted(warnings), sep="\n  ")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def orthanc(tmp_path):
    """Start Orthanc with its DICOMweb plugin and authentication; yield the DICOMweb root URL; stop it."""
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)
    plugin = next((p for p in PLUGIN_PATHS if Path(p).exists()), None)
    if binary is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin not found: apt-get install orthanc orthanc-dicomweb")
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "ctfactory-test", "StorageDirectory": str(tmp_path / "orthanc" / "storage"),
        "IndexDirectory": str(tmp_path / "orthanc" / "index"), "HttpPort": http_port, "DicomPort": dicom_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(tmp_path / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_export_to_orthanc_stores_every_study(root, tmp_path, orthanc, monkeypatch, capsys):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    monkeypatch.setenv("CTFACTORY_DICOMWEB_PASSWORD", "wrong-" + PASSWORD)
    argv = ["catalog", "export", str(root), "--format", "dicom", "--dest", str(tmp_path / "out"),
            "--to", orthanc, "--dicomweb-user", USER]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "but got HTTP 401" in err and PASSWORD not in out + err

    monkeypatch.setenv("CTFACTORY_DICOMWEB_PASSWORD", PASSWORD)
    assert main(argv + ["--overwrite"]) == 0
    out, err = capsys.readouterr()
    assert f"stored 18 instances in 2 studies at {orthanc} (QIDO: every study complete)" in out
    assert PASSWORD not in out + err

    client = DICOMwebClient(orthanc, session=create_session_from_user_pass(USER, PASSWORD))
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    for case in manifest["cases"]:
        uid = case["study_instance_uid"]
        studies = client.search_for_studies(search_filters={"StudyInstanceUID": uid},
                                            fields=["NumberOfStudyRelatedInstances"])
        assert len(studies) == 1 and studies[0]["00201208"]["Value"] == [9]
        assert studies[0]["00100020"]["Value"] == [case["sample_id"]]
        series = client.search_for_series(study_instance_uid=uid, fields=["NumberOfSeriesRelatedInstances"])
        assert sorted((s["00080060"]["Value"][0], s["00201209"]["Value"][0]) for s in series) == [("CT", 8), ("SEG", 1)]
        # Orthanc 1.10's QIDO does not return tags its DCMTK dictionary lacks, Synthetic Data among them:
        # read the stored objects' metadata (WADO-RS) for it.
        for s in series:
            metadata = client.retrieve_series_metadata(uid, s["0020000E"]["Value"][0])
            assert {m["0008001C"]["Value"][0] for m in metadata} == {"YES"}
