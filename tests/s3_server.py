"""A reusable local S3 for tests: moto's S3 server on 127.0.0.1 (a free port) with a fresh bucket.

The server runs ``ThreadedMotoServer`` in a **child process**, not in a thread of the test process:
deltalake calls such as ``DeltaTable.is_deltatable`` block while holding the GIL, so an in-process
moto thread can never answer them and the request times out after minutes (seen with deltalake
1.6.6 and moto 5.x).

Usage::

    from s3_server import local_s3_server

    with local_s3_server(bucket="ds") as s3:
        open_catalog("s3://ds/root", storage_options=s3.delta_options)
        fsspec.filesystem("s3", **s3.fsspec_options)

The bucket is created with boto3 (s3fs ``mkdir`` in us-east-1 sends a LocationConstraint that S3
rejects). moto enforces ``If-None-Match``, so delta-rs conditional commits are really exercised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
_SERVE = (
    "import sys, time\n"
    "from moto.server import ThreadedMotoServer\n"
    "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
    "while True: time.sleep(3600)\n"
)


@dataclasses.dataclass(frozen=True)
class LocalS3:
    """Connection details of a running local S3 server."""

    endpoint_url: str
    bucket: str
    delta_options: dict[str, str]  # deltalake / object_store storage options (AWS_*)
    fsspec_options: dict  # s3fs.S3FileSystem keyword arguments


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(bucket: str = "ctfactory-test") -> Iterator[LocalS3]:
    """Start moto's S3 on a free 127.0.0.1 port, create ``bucket``, yield a :class:`LocalS3`, stop."""
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for_port(port, server)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY, region_name=REGION).create_bucket(Bucket=bucket)
        yield LocalS3(
            endpoint_url=endpoint,
            bucket=bucket,
            delta_options={
                "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
            },
            fsspec_options={"key": ACCESS_KEY, "secret": SECRET_KEY,
                            "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}},
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_for_port(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"local_s3_server expects moto to start, but got exit code {server.returncode}.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"local_s3_server expects moto on port {port} within {START_TIMEOUT_S} s, but got none.")
