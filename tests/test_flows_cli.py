"""``ctfactory run`` killed mid-way and resumed; ``serve`` + ``submit`` against a real Prefect server.

Both start subprocesses with their own Prefect (ephemeral, or ``prefect server start`` on SQLite in a
temporary PREFECT_HOME), so they are slow (about 45 s and 60-90 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.store import open_catalog
from catalog.verify import verify_catalog
from factory.plan import plan_dataset
from factory.spec import load_spec

REPO = Path(__file__).resolve().parent.parent

RESUME_SPEC = """\
name: resume
version: "1"
model: preset:tiny
output_root: {root}
seed: 5
cohorts:
  - name: chest
    count: 8
    body_region: chest
    output_size: [64, 64, 64]
    spacing_mm: [5, 5, 5]
    num_inference_steps: 4
    qc: {{organ_hu_check: false}}
runtime: {{batch_size: 2, max_workers: 1}}
"""


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", **extra)
    return env


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_run_killed_after_first_commit_resumes(tmp_path):
    root = tmp_path / "ds"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(RESUME_SPEC.format(root=root))
    cmd = [sys.executable, "-m", "flows", "run", str(spec_file), "--no-progress"]
    env = _env(tmp_path / "prefect")
    first_log = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: (root / "catalog/samples/_delta_log/00000000000000000000.json").exists(), 180,
                  "the first batch commit")
    finally:
        _kill_group(proc)
        proc.wait(30)
    cat = open_catalog(root)
    committed = cat.committed_sample_ids()
    plan = plan_dataset(load_spec(spec_file))
    assert 2 <= len(committed) < 8, f"expected a partial run, got {len(committed)} rows"
    pending = [c for c in plan.cases if c.sample_id not in committed]
    garbage = root / pending[-1].image_uri  # a half-written orphan where an uncommitted case goes
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"\x1f\x8b truncated")

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipped (already committed) {len(committed)}" in done.stdout
    rows = cat.read_table().to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(c.sample_id for c in plan.cases)  # each exactly once
    report = verify_catalog(cat)
    assert report.ok and report.orphans == () and report.files_checked == 16
    for row in rows:
        assert hashlib.sha256((root / row["image_uri"]).read_bytes()).hexdigest() == row["image_sha256"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_and_submit_against_prefect_server(tmp_path):
    import httpx

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path / "prefect", PREFECT_API_URL=api)
    specs = tmp_path / "specs"
    specs.mkdir()
    spec_text = RESUME_SPEC.format(root=tmp_path / "served").replace("count: 8", "count: 2").replace(
        "[64, 64, 64]", "[32, 32, 32]").replace("[5, 5, 5]", "[8, 8, 8]").replace("name: resume", "name: nightly")
    (specs / "nightly.yaml").write_text(spec_text + "schedule: {cron: '0 2 * * *'}\n")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port), "--no-ui"], env=env, stdout=logs["server"], stderr=subprocess.STDOUT,
                              start_new_session=True)
    serve = None
    try:
        def healthy():
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            return False

        _wait_for(healthy, 120, "the Prefect server", interval=0.5)
        serve = subprocess.Popen([sys.executable, "-m", "flows", "serve", str(specs)], cwd=REPO, env=env,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)

        def deployments():
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
            return {d["name"]: d for d in r.json()} if r.status_code == 200 else {}

        found = _wait_for(lambda: (d := deployments()) and {"adhoc", "nightly"} <= set(d) and d, 120,
                          "the served deployments", interval=0.5)
        schedules = found["nightly"]["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == ["0 2 * * *"]

        out = tmp_path / "submitted"
        spec_file = specs / "nightly.yaml"
        sub = subprocess.run([sys.executable, "-m", "flows", "submit", str(spec_file), "--out", str(out)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        run_id = sub.stdout.strip().splitlines()[-1]

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        assert _wait_for(finished, 240, "the submitted run", interval=1.0) == "COMPLETED"
        rows = open_catalog(out).read_table().to_pylist()
        assert len(rows) == 2 and {r["status"] for r in rows} == {"passed"}
    finally:
        for proc in (serve, server):
            if proc is not None:
                _kill_group(proc, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    proc.wait(15)
        for fh in logs.values():
            fh.close()
