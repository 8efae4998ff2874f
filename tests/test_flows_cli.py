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
from pathlib import Path

import pytest

from _child import child_env, flows_argv, wait_for
from _specs import tiny_spec_text
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from factory.plan import plan_dataset
from factory.spec import load_spec

REPO = Path(__file__).resolve().parent.parent


def _spec_text(root, **changes) -> str:
    """Eight chest cases of 64³ at 5 mm, 4 steps, committed two at a time; ``changes`` as in ``tiny_spec_text``."""
    return tiny_spec_text(root, **{"name": "resume", "seed": 5, "cohort": "chest", "count": 8, "size": 64,
                                   "spacing": 5, "steps": 4, "runtime": "{batch_size: 2, max_workers: 1}", **changes})


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.mark.slow
def test_run_killed_after_first_commit_resumes(tmp_path):
    root = tmp_path / "ds"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(_spec_text(root))
    cmd = flows_argv("run", spec_file, "--no-progress")
    env = child_env(tmp_path / "prefect")
    first_log = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (root / "catalog/samples/_delta_log/00000000000000000000.json").exists(), 180,
                 "the first batch commit", interval=0.05)
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
    env = child_env(tmp_path / "prefect", PREFECT_API_URL=api)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "nightly.yaml").write_text(_spec_text(tmp_path / "served", name="nightly", count=2, size=32, spacing=8,
                                                   extra="schedule: {cron: '0 2 * * *'}\n"))
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

        wait_for(healthy, 120, "the Prefect server", interval=0.5)
        serve = subprocess.Popen(flows_argv("serve", specs), cwd=REPO, env=env,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)

        def deployments():
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
            return {d["name"]: d for d in r.json()} if r.status_code == 200 else {}

        found = wait_for(lambda: (d := deployments()) and {"adhoc", "nightly"} <= set(d) and d, 120,
                         "the served deployments", interval=0.5)
        schedules = found["nightly"]["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == ["0 2 * * *"]

        out = tmp_path / "submitted"
        spec_file = specs / "nightly.yaml"
        sub = subprocess.run(flows_argv("submit", spec_file, "--out", out), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        run_id = sub.stdout.strip().splitlines()[-1]

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        assert wait_for(finished, 240, "the submitted run", interval=1.0) == "COMPLETED"
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
