"""A shared Prefect server on PostgreSQL under load: concurrent ``ctfactory submit`` runs lose and repeat nothing.

One throwaway PostgreSQL cluster (Debian's ``postgresql``, :mod:`pg_server`), ``prefect server start`` on it,
``ctfactory serve`` on a folder of four specs, then six ``ctfactory submit`` processes started together:
the four specs once each, and alpha and beta a second time, all writing into ONE output root. That covers
(a) concurrent Delta commits of distinct specs from separate flow-run processes and (b) two runs of one
spec generating the same cases at once (the duplicate-row risk). Every run must complete; the catalog must
hold each planned sample_id exactly once with its files intact, and the server must never answer 5xx (a
SQLite-backed server answers 503 under load: ../shared/reference/ORCHESTRATION.md, section 1.2). Cases use
the ``sleep:3`` stub generator: no CPU goes to a model, and a run's cases stay in flight long enough (9 s)
for the other run of its spec to plan them too, even when the flow-run processes start seconds apart on
busy cores (5.4 s seen with 0.2 s cases, which let the second run find every case committed).

Slow (55-95 s on 2 cores shared with other work); skipped without PostgreSQL's binaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from _child import child_env, flows_argv, wait_for
from _specs import tiny_spec_text
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from factory.plan import plan_dataset
from factory.spec import load_spec
from pg_server import PostgresServer, free_port, postgres_server

REPO = Path(__file__).resolve().parent.parent
CASES_PER_SPEC = 3
SPECS = ("alpha", "beta", "gamma", "delta")
SUBMISSIONS = (("alpha", "adhoc"), ("alpha", "alpha"), ("beta", "adhoc"), ("beta", "adhoc"),
               ("gamma", "adhoc"), ("delta", "delta"))
"""(spec, deployment) of each concurrent submission: alpha and beta run twice into the same root."""
TWICE = ("alpha", "beta")
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
ACCESS_LINE = re.compile(r'"[A-Z]+ (/api/\S*) HTTP/[\d.]+" (\d{3})')
"""A uvicorn access-log line of the server (logged at INFO): path and HTTP status."""


def _spec_text(root: Path, name: str, seed: int) -> str:
    """Three cases of the 3 s stub, one at a time, each committed on its own (many small concurrent commits)."""
    return tiny_spec_text(root, name=name, seed=seed, cohort="c", count=CASES_PER_SPEC, steps=1,
                          qc="{organ_hu_check: false, max_retries: 0}",
                          runtime='{batch_size: 1, max_workers: 1, generator: "sleep:3"}')


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group (SIGKILL after 15 s), then kill any descendant that left the group."""
    if proc is None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
            break
        except subprocess.TimeoutExpired:
            continue
    _, alive = psutil.wait_procs(family, timeout=5)
    for child in alive:  # psutil checks each process's create time: a reused pid is never hit
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


class Api:
    """The few calls of the Prefect server's REST API this test makes."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url, self.httpx = url, httpx

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.httpx.post(f"{self.url}{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def healthy(self) -> bool:
        with contextlib.suppress(self.httpx.HTTPError):
            return self.httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return False

    def deployments(self) -> set[str]:
        with contextlib.suppress(self.httpx.HTTPError):
            return {d["name"] for d in self.post("/deployments/filter", {})}
        return set()

    def flow_runs(self, ids: list[str]) -> dict[str, dict]:
        return {r["id"]: r for r in self.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})}

    def completed_case_tasks(self) -> int:
        """Completed case-generating task runs (``generate-case*``; one case each on a CPU, where the default
        ``runtime.generation_batch: auto`` is 1). The server records them from events, a moment after they end."""
        return len(self.post("/task_runs/filter", {"task_runs": {"name": {"like_": "generate-case"},
                                                                 "state": {"type": {"any_": ["COMPLETED"]}}}}))


@contextlib.contextmanager
def _served(tmp_path: Path, pg: PostgresServer, specs: Path, timings: dict[str, float]) -> Iterator[tuple[Api, dict]]:
    """``prefect server start`` on ``pg`` plus ``ctfactory serve specs``; yields the API and the children's env."""
    port = free_port()
    api = Api(f"http://127.0.0.1:{port}/api")
    env = child_env(tmp_path / "prefect", PREFECT_API_URL=api.url, PREFECT_SERVER_DATABASE_CONNECTION_URL=pg.url,
                    PREFECT_SERVER_LOGGING_LEVEL="INFO", PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true",
                    PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_LOGGING_LEVEL="INFO")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = serve = None
    t0 = time.perf_counter()
    try:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-ui"], env=env, stdout=logs["server"],
                                  stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(api.healthy, 120, "the Prefect server on PostgreSQL", interval=0.2)
        timings["server healthy"] = time.perf_counter() - t0
        serve = subprocess.Popen(flows_argv("serve", specs, "--limit", len(SUBMISSIONS)), cwd=REPO, env=env,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: {"adhoc", *SPECS} <= api.deployments(), 120, "the served deployments", interval=0.5)
        timings["deployments served"] = time.perf_counter() - t0 - timings["server healthy"]
        yield api, env
    finally:
        _stop(serve)
        _stop(server)
        for fh in logs.values():
            fh.close()


def _submit_together(specs: Path, env: dict[str, str]) -> list[str]:
    """Start one ``ctfactory submit`` process per submission at once; return their flow-run IDs in order."""
    procs = [subprocess.Popen(flows_argv("submit", specs / f"{name}.yaml", "--deployment", deployment), cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, deployment in SUBMISSIONS]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err
    ids = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert len(set(ids)) == len(SUBMISSIONS), ids
    return ids


def _wait_completed(api: Api, ids: list[str], serve_log: Path) -> dict[str, dict]:
    """Wait for every run to end; fail with the states and the warnings logged if one did not complete."""
    def all_final():
        runs = api.flow_runs(ids)
        return runs if len(runs) == len(ids) and all(r["state"]["type"] in FINAL_STATES for r in runs.values()) else None

    runs = wait_for(all_final, 240, "every submitted run to finish", interval=1.0)
    bad = {i: r["state"] for i, r in runs.items() if r["state"]["type"] != "COMPLETED"}
    if bad:
        logged = [w["message"] for w in api.post("/logs/filter", {"logs": {"level": {"ge_": 30}}, "limit": 50})]
        pytest.fail(f"runs not COMPLETED: {json.dumps(bad, indent=1)[:3000]}\nwarnings and errors logged: "
                    f"{json.dumps(logged)[:6000]}\nserve log tail:\n{serve_log.read_text()[-4000:]}")
    return runs


def _states_in_postgres(url: str, ids: list[str]) -> dict[str, str]:
    """``{flow run id: state type}`` as the server's PostgreSQL database holds them (not through the API)."""
    import asyncpg

    async def query() -> dict[str, str]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            rows = await conn.fetch("SELECT id::text, state_type::text FROM flow_run WHERE id::text = ANY($1::text[])",
                                    ids)
        finally:
            await conn.close()
        return {r["id"]: r["state_type"] for r in rows}

    return asyncio.run(query())


def _peak_overlap(runs: list[dict]) -> int:
    """The most flow runs running at one instant (from the server's start and end times)."""
    events = sorted([(_time(r["start_time"]), 1) for r in runs] + [(_time(r["end_time"]), -1) for r in runs])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def _check_runs(api: Api, pg: PostgresServer, ids: list[str], runs: dict[str, dict]) -> dict[str, Any]:
    """No run lost or started twice, both runs of a twice-submitted spec in flight together; returns figures."""
    served = api.post("/flow_runs/filter", {"flows": {"name": {"any_": ["run-spec"]}}})
    assert sorted(r["id"] for r in served) == sorted(ids)
    assert _states_in_postgres(pg.url, ids) == dict.fromkeys(ids, "COMPLETED")
    for name in TWICE:
        first, second = sorted((runs[i] for i, (n, _) in zip(ids, SUBMISSIONS, strict=True) if n == name),
                               key=lambda r: _time(r["start_time"]))
        assert _time(second["start_time"]) < _time(first["end_time"]), (name, first, second)
    peak = _peak_overlap(list(runs.values()))
    assert peak >= 4, f"expected at least 4 runs in flight at once, got {peak}"
    planned = len(SPECS) * CASES_PER_SPEC  # more generated than planned: both runs of a spec made the same case
    generated = wait_for(lambda: (n := api.completed_case_tasks()) > planned and n, 30,
                         f"more than {planned} completed generate-case task runs (cases generated by both runs "
                         "of one spec, so that their second commit is exercised)", interval=0.5)
    return {"peak runs at once": peak, "cases generated": generated}


def _check_catalog(root: Path, expected: dict[str, set[str]]) -> dict[str, Any]:
    """Each planned sample_id exactly once (one append each), passed, files matching; every spec's dataset row."""
    cat = open_catalog(root)
    rows = cat.read_table().to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(set().union(*expected.values()))
    assert {r["status"] for r in rows} == {"passed"}
    for name, wanted in expected.items():
        assert {r["sample_id"] for r in rows if r["dataset"] == name} == wanted
    assert cat.duplicate_sample_ids() == {}
    appended = [int(h["ctfactory.rows"]) for h in cat.history("samples")
                if h.get("ctfactory.operation") == "append_samples"]
    assert sum(appended) == len(rows), f"commits appended {sum(appended)} rows for {len(rows)} sample_ids"
    report = verify_catalog(cat)
    assert report.ok and report.orphans == () and report.files_checked == 2 * len(rows), report
    for row in rows:
        for kind in ("image", "label"):
            digest = hashlib.sha256((root / row[f"{kind}_uri"]).read_bytes()).hexdigest()
            assert digest == row[f"{kind}_sha256"], (row["sample_id"], kind)
    datasets = cat.read_table("datasets").to_pylist()
    assert {(d["dataset"], d["n_samples"], d["n_passed"]) for d in datasets} == {
        (name, CASES_PER_SPEC, CASES_PER_SPEC) for name in SPECS}
    assert [p.name for p in root.rglob("*.tmp")] == []
    return {"rows": len(rows), "append commits": len(appended), "dataset rows": len(datasets)}


def _check_server_log(log: Path) -> dict[str, int]:
    """No 5xx answer and no logged request exception; returns the count of each HTTP status."""
    text = log.read_text()
    statuses = Counter(code for _, code in ACCESS_LINE.findall(text))
    assert sum(n for code, n in statuses.items() if code.startswith("2")) > 100, statuses  # the access log is there
    assert {code: n for code, n in statuses.items() if code.startswith("5")} == {}, statuses
    assert "Encountered retryable exception" not in text and "Encountered exception" not in text
    return dict(sorted(statuses.items()))


@pytest.mark.slow
def test_concurrent_submissions_on_postgres_server_record_each_case_once(tmp_path):
    root = tmp_path / "shared-root"
    specs = tmp_path / "specs"
    specs.mkdir()
    for seed, name in enumerate(SPECS, start=11):
        (specs / f"{name}.yaml").write_text(_spec_text(root, name, seed))
    expected = {name: {c.sample_id for c in plan_dataset(load_spec(specs / f"{name}.yaml")).cases} for name in SPECS}
    timings: dict[str, float] = {}
    with postgres_server() as pg, _served(tmp_path, pg, specs, timings) as (api, env):
        t0 = time.perf_counter()
        ids = _submit_together(specs, env)
        runs = _wait_completed(api, ids, tmp_path / "serve.log")
        timings["submitted runs done"] = time.perf_counter() - t0
        figures = _check_runs(api, pg, ids, runs)
    figures |= _check_catalog(root, expected)
    statuses = _check_server_log(tmp_path / "server.log")
    print("\n" + "; ".join([f"{k} {v:.1f} s" for k, v in timings.items()] + [f"{k} {v}" for k, v in figures.items()])
          + f"; HTTP statuses {statuses}")
