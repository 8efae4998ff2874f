"""Finding 3: storage credentials never become flow parameters, log lines or catalog values.

On 3874b3d ``--storage-option AWS_SECRET_ACCESS_KEY=...`` was stored in plaintext in the Prefect
database (``flow_run.parameters``), where a server's UI shows it. The canary test runs a real
``ctfactory run`` against a local S3 server with a canary secret and greps everything the run left
behind: the Prefect home (database, logs), stdout/stderr and every object written to the bucket.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from pathlib import Path

import pytest

from _child import child_env, flows_argv
from _specs import tiny_spec_text
from flows.cli import main
from factory.errors import FactoryError
from flows.secrets import (
    SecretParameterError,
    redact,
    redact_values,
    refuse_secret_options,
    resolve_storage_options,
    split_storage_options,
)

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_split_keeps_credentials_out_of_the_public_options():
    public, secret = split_storage_options({
        "AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "eu", "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
        "AZURE_STORAGE_ACCOUNT_KEY": "k", "token": "x"})
    assert sorted(public) == ["AWS_ALLOW_HTTP", "AWS_ENDPOINT_URL", "AWS_REGION"]
    assert sorted(secret) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                              "AZURE_STORAGE_ACCOUNT_KEY", "token"]


def test_a_secret_block_reference_is_public_and_resolves_in_memory(prefect_backend):
    from prefect.blocks.system import Secret

    canary = f"canary-{uuid.uuid4().hex}"
    Secret(value={"AWS_SECRET_ACCESS_KEY": canary, "AWS_ACCESS_KEY_ID": "id"}).save("ctf-canary", overwrite=True)
    public, secret = split_storage_options({"AWS_ENDPOINT_URL": "http://s3", "CTFACTORY_SECRET_BLOCK": "ctf-canary"})
    assert secret == {} and public["CTFACTORY_SECRET_BLOCK"] == "ctf-canary"  # a name, safe as a parameter
    refuse_secret_options(public, who="submit")
    resolved = resolve_storage_options(public)
    assert resolved == {"AWS_ENDPOINT_URL": "http://s3", "AWS_SECRET_ACCESS_KEY": canary, "AWS_ACCESS_KEY_ID": "id"}
    assert redact(f"x {canary} y") == "x *** y"
    with pytest.raises(FactoryError, match="expects a Prefect Secret block named 'no-such-block', but got none"):
        resolve_storage_options({"CTFACTORY_SECRET_BLOCK": "no-such-block"})


def test_refusal_names_the_key_never_the_value():
    canary = f"canary-{uuid.uuid4().hex}"
    with pytest.raises(SecretParameterError) as info:
        refuse_secret_options({"AWS_REGION": "eu", "AWS_SECRET_ACCESS_KEY": canary}, who="run_generate")
    assert "key='AWS_SECRET_ACCESS_KEY'" in str(info.value) and canary not in str(info.value)


def test_environment_credentials_are_resolved_in_memory(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env-id")
    assert resolve_storage_options({"AWS_ENDPOINT_URL": "http://s3"}) == {
        "AWS_ENDPOINT_URL": "http://s3", "AWS_ACCESS_KEY_ID": "from-env-id", "AWS_SECRET_ACCESS_KEY": "from-env-secret"}
    assert resolve_storage_options(None) is None  # a local root gets no credentials at all


def test_secret_values_are_redacted_from_every_log_record(caplog):
    canary = f"canary-{uuid.uuid4().hex}"
    redact_values([canary])
    with caplog.at_level(logging.INFO):
        logging.getLogger("prefect.ctfactory_test").warning("connecting with secret=%s", canary)
        logging.getLogger("flows.anything").info(f"inline {canary} too")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert canary not in text and text.count("***") == 2
    assert redact(f"a {canary} b") == "a *** b"


def test_submit_refuses_credentials_as_parameters(capsys, monkeypatch):
    canary = f"canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    code = main(["submit", str(SPECS / "demo.yaml"), "--storage-option", f"AWS_SECRET_ACCESS_KEY={canary}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "submit expects storage options without credentials" in err and canary not in err


@pytest.mark.slow
def test_canary_secret_never_persists_anywhere(tmp_path):
    """A real run on S3 with a canary secret: the Prefect database, logs, output and bucket never hold it."""
    from s3_server import local_s3_server

    canary = f"canary{uuid.uuid4().hex}"
    prefect_home = tmp_path / "prefect"
    spec = tmp_path / "spec.yaml"
    with local_s3_server(bucket="canary") as s3:
        spec.write_text(tiny_spec_text("s3://canary/ds", name="canary", seed=3, steps=2, runtime="{device: cpu}"))
        options = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": canary}
        args = flows_argv("run", spec, "--no-progress")
        for key, value in options.items():
            args += ["--storage-option", f"{key}={value}"]
        env = child_env(prefect_home, PREFECT_LOGGING_LEVEL="DEBUG")  # log everything: no line may hold the canary
        for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            env.pop(key, None)
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        import boto3

        client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="canary")["Contents"]]
        objects = {k: client.get_object(Bucket="canary", Key=k)["Body"].read() for k in keys}
    assert any(k.startswith("ds/images/") for k in keys)  # the credentials really reached the writers
    assert any(k.startswith("ds/catalog/samples/_delta_log/") for k in keys)
    leaks = [k for k, body in objects.items() if canary.encode() in body]
    files = [p for p in prefect_home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)  # the ephemeral server's database is there to grep
    leaks += [str(p) for p in files if canary.encode() in p.read_bytes()]
    leaks += [name for name, text in (("stdout", done.stdout), ("stderr", done.stderr)) if canary in text]
    assert not leaks, f"the canary secret leaked into {leaks}"
