"""Send a DICOM export to a DICOMweb server (STOW-RS) and check with QIDO-RS that every study arrived whole.

The objects are read from the export folder (:mod:`catalog.dicom`, its ``dicom_export.json``) a batch at a
time and stored with ``dicomweb-client``. Afterwards each study is looked up by its Study Instance UID and
its Number of Study Related Instances (0020,1208) must equal what the export wrote.

Credentials are arguments (this library reads no environment variables): HTTP basic auth from
``username``/``password``. They are never part of a URL, a log line or an error message: a URL with
``user:password@`` is refused without echoing it, and every error names the server by its credential-free
URL only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from catalog.dicom import MANIFEST
from catalog.errors import ExportError, describe_cause

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # instances per STOW-RS request: bounded memory on large series
_INSTANCES_TAG = "00201208"  # Number of Study Related Instances
_HINT = "Check the URL, the user and the password."


@dataclasses.dataclass(frozen=True)
class SendResult:
    """What :func:`send_dicom_export` stored and confirmed."""

    url: str  # the server, without credentials
    studies: int
    instances: int


def check_dicomweb_url(url: str) -> str:
    """Return ``url`` without a trailing slash; refuse anything but ``http(s)://host/...`` without credentials.

    Raises:
        ExportError: A different scheme, no host, or ``user:password@`` in the URL (the message omits it).
    """
    parts = urlsplit(str(url))
    if parts.username is not None or parts.password is not None:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        safe = urlunsplit((parts.scheme, host, parts.path, "", ""))
        raise ExportError(f"send_dicom_export expects a URL without credentials, but got url={safe!r} with "
                          "user information (not shown). Pass the user and password separately (ctfactory: "
                          "--dicomweb-user and CTFACTORY_DICOMWEB_PASSWORD).")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ExportError(f"send_dicom_export expects an http:// or https:// DICOMweb URL, but got url={url!r}. "
                          "Example: http://pacs:8042/dicom-web")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def send_dicom_export(folder: str | Path, url: str, *, username: str | None = None, password: str | None = None,
                      batch_size: int = DEFAULT_BATCH, timeout_s: float = 60.0) -> SendResult:
    """Store every object of the export in ``folder`` on the DICOMweb server at ``url``, then check each study.

    Args:
        folder: A folder written by :func:`catalog.dicom.export_dicom`.
        url: The DICOMweb root (``.../dicom-web``), without credentials.
        username: HTTP basic auth user; None for an open server.
        password: Its password (needed with ``username``).
        batch_size: Instances per STOW-RS request.
        timeout_s: Seconds to wait for each HTTP request.

    Raises:
        ExportError: No export manifest in ``folder``, a refused or failed request (HTTP status, connection),
            objects the server did not store, or a study whose instance count differs.
    """
    base = check_dicomweb_url(url)
    if (username is None) != (password is None):
        raise ExportError(f"send_dicom_export expects a username and a password together, but got "
                          f"username={'set' if username else None}, password={'set' if password else None}. "
                          f"{_HINT}")
    if batch_size < 1:
        raise ExportError(f"send_dicom_export expects batch_size >= 1, but got batch_size={batch_size}.")
    cases = _read_manifest(Path(folder))
    session = create_session_from_user_pass(username, password) if username is not None else create_session()
    client = DICOMwebClient(base, session=session, timeout=timeout_s)
    total = 0
    for case in cases:
        files = _case_files(Path(folder), case)
        for start in range(0, len(files), batch_size):
            _store(client, base, files[start:start + batch_size], case["study_instance_uid"], password)
        expected = int(case["ct_instances"]) + int(case["seg_instances"])
        found = count_study_instances(client, base, case["study_instance_uid"], password=password)
        if found != expected:
            raise ExportError(f"send_dicom_export expects {expected} instances of study "
                              f"{case['study_instance_uid']} on the server after storing, but got count={found} "
                              f"(QIDO at {base}). The server may reject or drop some objects: see its log.")
        total += expected
        logger.info("send_dicom_export: stored %d instances of %s", expected, case["sample_id"])
    return SendResult(base, len(cases), total)


def count_study_instances(client: DICOMwebClient, base: str, study_uid: str, *, password: str | None = None) -> int:
    """Return the server's Number of Study Related Instances of ``study_uid`` (QIDO-RS); 0 when it has no such study."""
    found = _call(lambda: client.search_for_studies(search_filters={"StudyInstanceUID": study_uid},
                                                    fields=["NumberOfStudyRelatedInstances"]),
                  "QIDO-RS search", base, password)
    if not found:
        return 0
    value = found[0].get(_INSTANCES_TAG, {}).get("Value")
    if not value:
        raise ExportError(f"send_dicom_export expects QIDO results with Number of Study Related Instances "
                          f"(0020,1208), but got none for study {study_uid} from {base}.")
    return int(value[0])


def _store(client: DICOMwebClient, base: str, files: list[Path], study_uid: str, password: str | None) -> None:
    datasets = [pydicom.dcmread(path) for path in files]
    response = _call(lambda: client.store_instances(datasets=datasets, study_instance_uid=study_uid),
                     "STOW-RS store", base, password)
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise ExportError(f"send_dicom_export expects the server to store every instance, but got "
                          f"{len(failed)} failed (FailureReason={reasons}) in study {study_uid} at {base}.")


def _call(action, what: str, base: str, password: str | None) -> Any:
    """Run one request; turn HTTP and connection errors into one line that never holds ``password``."""
    try:
        return action()
    except requests.exceptions.RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        cause = describe_cause(exc)
        if password:
            cause = cause.replace(password, "***")
        raise ExportError(f"send_dicom_export expects the DICOMweb server at {base} to accept a {what}, but got "
                          f"{'HTTP ' + str(status) if status else type(exc).__name__}: {cause}. {_HINT}") from None


def _case_files(folder: Path, case: dict[str, Any]) -> list[Path]:
    """The case's CT instances in slice order, then its SEG; refuse a case whose files are not all there."""
    files = sorted((folder / case["folder"] / "CT").glob("*.dcm")) + [folder / case["folder"] / "SEG" / "seg.dcm"]
    expected = int(case["ct_instances"]) + int(case["seg_instances"])
    if len(files) != expected or not all(path.is_file() for path in files):
        raise ExportError(f"send_dicom_export expects {expected} DICOM files of sample_id={case['sample_id']!r} in "
                          f"{case['folder']}/, but got {sum(p.is_file() for p in files)}. "
                          "Export again with --overwrite.")
    return files


def _read_manifest(folder: Path) -> list[dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"send_dicom_export expects a DICOM export folder with {MANIFEST}, but got "
                          f"folder={str(folder)!r} without it. Export with --format dicom first.")
    return list(json.loads(path.read_text())["cases"])
