"""A run's ephemeral Prefect server, and every other process it started, dies with the run.

Finding: SIGKILL or SIGTERM of ``ctfactory run`` left the ephemeral uvicorn server (about 230 MB)
running, 6 of 6 trials. Fast tier: the watchdog of :mod:`flows.lifetime` on small stand-in process
trees and the signal bridge in a subprocess. Slow tier: real ``ctfactory run`` and ``ctfactory serve``
processes (ephemeral Prefect in a temporary PREFECT_HOME) signalled while a case is in flight; each
takes about 20-30 s on 2 cores, most of it the server's start.

The slow tests drive the CLI as a subprocess and never import :mod:`flows.lifetime`, so they also run
(and fail) against a tree without it; the fast tests import it inside each test for the same reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from _child import child_env, flows_argv, wait_for
from _specs import tiny_spec_text

REPO = Path(__file__).resolve().parents[2]
LEFTOVER_TIMEOUT_S = 10.0
"""Seconds after the signal by which no process of the run's tree may be left."""


def _stub_spec_text(root, count: int = 4, seconds: float = 60) -> str:
    """Cases of a ``seconds`` sleep stub, one at a time: with 60 s a case is always in flight when the signal
    arrives, and no CPU goes to generation while the server starts."""
    return tiny_spec_text(root, name="lifetime", seed=3, cohort="stub", count=count, steps=1,
                          qc="{organ_hu_check: false, max_retries: 0}",
                          runtime=f'{{batch_size: 1, max_workers: 1, generator: "sleep:{seconds}"}}')


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # is_running checks create_time
    except psutil.NoSuchProcess:
        return False


def _sleeper(seconds: int = 120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


class Tree:
    """The processes seen below a root process (psutil objects carry their create time)."""

    def __init__(self, root: subprocess.Popen) -> None:
        self.root = psutil.Process(root.pid)
        self.seen: dict[tuple[int, float], psutil.Process] = {}

    def snapshot(self) -> list[psutil.Process]:
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault((child.pid, child.create_time()), child)
        except psutil.NoSuchProcess:
            pass
        return list(self.seen.values())

    def left(self) -> list[str]:
        out = []
        for p in self.seen.values():
            if _alive(p):
                try:
                    out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                except psutil.NoSuchProcess:
                    continue
        return out

    def kill_all(self) -> None:
        for p in [self.root, *self.seen.values()]:
            if _alive(p):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    continue


# -- fast tier: the watchdog and the signal bridge ----------------------------------------------------

_PARENT = """\
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
print("ready", flush=True)
time.sleep(120)
"""


def test_watchdog_terminates_descendants_of_a_killed_process_only(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    unrelated = _sleeper()
    tree = Tree(parent)
    watchdog = None
    try:
        assert parent.stdout.readline().strip() == "ready"
        descendants = wait_for(lambda: len(tree.snapshot()) == 2 and tree.snapshot(), 20, "child and grandchild")
        ct = psutil.Process(parent.pid).create_time()
        watchdog = subprocess.Popen([sys.executable, "-m", "flows.lifetime", str(parent.pid), repr(ct)], cwd=REPO,
                                    stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # several polls: the watchdog has seen the tree
        parent.kill()
        parent.wait(5)
        t0 = time.monotonic()
        wait_for(lambda: not any(_alive(p) for p in descendants), 8, "the orphaned descendants to be stopped")
        elapsed = time.monotonic() - t0
        assert watchdog.wait(5) == 0, watchdog.stderr.read()
        assert unrelated.poll() is None, "the watchdog must never signal a process outside the watched tree"
        assert elapsed < 4.0
    finally:
        tree.kill_all()
        for proc in (unrelated, watchdog):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_watch_process_refuses_a_pid_with_another_create_time():
    from flows.lifetime import watch_process

    unrelated = _sleeper()
    try:
        ct = psutil.Process(unrelated.pid).create_time()
        t0 = time.monotonic()
        assert watch_process(unrelated.pid, ct + 5.0, poll_s=0.05) == []  # a reused pid: not the watched process
        assert time.monotonic() - t0 < 1.0
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait(5)


def test_watch_process_ends_quietly_when_its_process_exits_without_children():
    from flows.lifetime import watch_process

    bystander = _sleeper()
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        ct = psutil.Process(short.pid).create_time()
        assert watch_process(short.pid, ct, poll_s=0.05) == []
        assert bystander.poll() is None
    finally:
        short.wait(5)
        bystander.kill()
        bystander.wait(5)


@pytest.mark.parametrize("argv", [[], ["12"], ["x", "1.5"], ["0", "1.5"], ["12", "soon"], ["1", "2", "3"]])
def test_watchdog_bad_arguments_exit_2_with_message(argv, capsys):
    from flows.lifetime import run_watchdog

    assert run_watchdog(argv) == 2
    assert capsys.readouterr().err == (
        "flows.lifetime expects two arguments PID (> 0) and CREATE_TIME (seconds since the epoch), "
        f"but got argv={argv!r}. It is started by flows.lifetime.start_descendant_watch().\n")


def test_descendant_watch_is_a_no_op_with_prefect_api_url(monkeypatch):
    from flows import lifetime

    monkeypatch.setattr(lifetime, "_watch", None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    before = {p.pid for p in psutil.Process().children()}
    assert lifetime.start_descendant_watch_if_ephemeral() is None
    assert lifetime.current_watchdog_pid() is None
    assert {p.pid for p in psutil.Process().children()} <= before


def test_flow_run_settings_start_one_watch_only_for_the_ephemeral_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import lifetime
    from flows.runtime import flow_run_settings

    monkeypatch.setattr(lifetime, "_watch", None)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), flow_run_settings():
        assert lifetime.current_watchdog_pid() is None
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}), flow_run_settings():
            first = lifetime.current_watchdog_pid()
        assert first is not None
        with temporary_settings(restore_defaults={PREFECT_API_URL}), flow_run_settings():
            assert lifetime.current_watchdog_pid() == first  # once per process
        me = psutil.Process()
        cmdline = psutil.Process(first).cmdline()
        assert cmdline[1:] == ["-m", "flows.lifetime", str(me.pid), repr(me.create_time())]
        assert os.getsid(first) == first  # its own session: a terminal's SIGINT to our group does not reach it
    finally:
        if lifetime._watch is not None:
            lifetime._watch[1].kill()
            lifetime._watch[1].wait(5)


def test_interrupt_on_signals_raises_records_and_restores():
    from flows.lifetime import SignalInterrupt, interrupt_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with interrupt_on_signals(grace_s=None) as received:
        with pytest.raises(SignalInterrupt) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
        assert isinstance(info.value, KeyboardInterrupt) and info.value.signum == signal.SIGTERM
        assert (received.signum, received.exit_code) == (signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) is before


_BLOCKED = """\
import signal, subprocess, sys, threading, time
from flows.lifetime import interrupt_on_signals
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with interrupt_on_signals(grace_s=1.0):
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a library's handler that defers the signal
    busy = threading.Thread(target=time.sleep, args=(60,), name="case-in-flight")
    busy.start()
    print(child.pid, flush=True)
    busy.join()
"""


def test_grace_timer_ends_a_blocked_process_and_its_children():
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 143
        assert time.monotonic() - t0 < 5.0
        assert not _alive(child)
        assert ("ctfactory expects to stop within grace_s=1 of SIGTERM, but got busy_threads=['case-in-flight']. "
                "Stopping its child processes and exiting with 143;") in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and _alive(child):
            child.kill()


# -- slow tier: real ctfactory processes ------------------------------------------------------------------


def _start(tmp_path: Path, log, *args: str | Path) -> subprocess.Popen:
    """``python -m flows ARGS`` with its own ephemeral Prefect in ``tmp_path/prefect``, its output to ``log``."""
    return subprocess.Popen(flows_argv(*args), cwd=REPO, env=child_env(tmp_path / "prefect", PYTHONUNBUFFERED="1"),
                            stdout=log, stderr=subprocess.STDOUT)


def _server_port(tree: Tree) -> int:
    """The port of the ephemeral uvicorn server below the tree's root, once it listens."""
    def listening():
        for p in tree.snapshot():
            try:
                if "uvicorn" in p.cmdline() and "prefect.server.api.server:create_app" in p.cmdline():
                    ports = [c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                    return ports[0] if ports else None
            except psutil.NoSuchProcess:
                continue
        return None

    return wait_for(listening, 120, "the ephemeral Prefect server", interval=0.2)


def _api_post(port: int, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return []


def _signal_and_measure(proc: subprocess.Popen, tree: Tree, sig: int) -> tuple[int | None, float, list[str]]:
    """Send ``sig`` to the root only; return (exit code, seconds until it exited, processes of its tree left)."""
    tree.snapshot()
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(LEFTOVER_TIMEOUT_S + 5)
    except subprocess.TimeoutExpired:
        code = None
    exited = time.monotonic() - t0
    while tree.left() and time.monotonic() - t0 < LEFTOVER_TIMEOUT_S:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    left = tree.left()
    print(f"\nlifetime {signal.Signals(sig).name}: exit {code} after {exited:.2f} s, "
          f"tree {'gone' if not left else 'NOT gone'} after {gone:.2f} s, seen {len(tree.seen)} processes")
    return code, exited, left


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_run_signal_leaves_no_process_behind(tmp_path, sig, code):
    spec = tmp_path / "spec.yaml"
    spec.write_text(_stub_spec_text(tmp_path / "unused"))
    log = (tmp_path / "run.log").open("w")
    unrelated = _sleeper()
    proc = _start(tmp_path, log, "run", spec, "--out", tmp_path / "out", "--no-progress")
    tree = Tree(proc)
    try:
        port = _server_port(tree)
        running = {"task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        wait_for(lambda: _api_post(port, "task_runs/filter", running), 120, "a case in flight", interval=0.5)
        got, exited, left = _signal_and_measure(proc, tree, sig)
        assert got == code and exited < LEFTOVER_TIMEOUT_S, (tmp_path / "run.log").read_text()[-3000:]
        assert not left, f"left behind {LEFTOVER_TIMEOUT_S} s after {signal.Signals(sig).name}: {left}"
        assert unrelated.poll() is None, "a process outside the run's tree was signalled"
    finally:
        tree.kill_all()
        proc.wait(10)
        unrelated.kill()
        unrelated.wait(5)
        log.close()


@pytest.mark.slow
def test_run_sigterm_between_short_cases_unwinds_through_prefect(tmp_path):
    """No long case in flight: Prefect records the crash, ``main`` returns 143 and ``atexit`` stops the server."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(_stub_spec_text(tmp_path / "unused", count=300, seconds=0.2))
    log = (tmp_path / "run.log").open("w")
    proc = _start(tmp_path, log, "run", spec, "--out", tmp_path / "out", "--no-progress")
    tree = Tree(proc)
    try:
        port = _server_port(tree)
        completed = {"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        wait_for(lambda: _api_post(port, "task_runs/filter", completed), 120, "a finished case", interval=0.5)
        got, exited, left = _signal_and_measure(proc, tree, signal.SIGTERM)
        text = (tmp_path / "run.log").read_text()
        assert got == 143 and exited < LEFTOVER_TIMEOUT_S, text[-3000:]
        # Prefect's own "Crash detected!" record stays off the terminal without -v (its server keeps it).
        assert "ctfactory run: stopped by SIGTERM." in text and "expects to stop within" not in text
        assert not left, f"left behind {LEFTOVER_TIMEOUT_S} s after SIGTERM: {left}"
    finally:
        tree.kill_all()
        proc.wait(10)
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig, codes", [(signal.SIGTERM, (0, 143)), (signal.SIGKILL, (-9,))])
def test_serve_signal_leaves_no_process_behind(tmp_path, sig, codes):
    """``serve`` starts its ephemeral server outside any flow run.

    SIGTERM goes to the handler of Prefect's Runner once it serves (it stops and exits with 0), or to
    ours (143) if it arrives while the Runner is still starting: both are clean exits.
    """
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "lifetime.yaml").write_text(_stub_spec_text(tmp_path / "served"))
    log = (tmp_path / "serve.log").open("w")
    unrelated = _sleeper()
    proc = _start(tmp_path, log, "serve", specs)
    tree = Tree(proc)
    try:
        port = _server_port(tree)
        wait_for(lambda: len(_api_post(port, "deployments/filter", {})) >= 2, 120, "the served deployments",
                 interval=0.5)
        got, exited, left = _signal_and_measure(proc, tree, sig)
        assert got in codes and exited < LEFTOVER_TIMEOUT_S, (tmp_path / "serve.log").read_text()[-3000:]
        assert not left, f"left behind {LEFTOVER_TIMEOUT_S} s after {signal.Signals(sig).name}: {left}"
        assert unrelated.poll() is None, "a process outside the serve's tree was signalled"
    finally:
        tree.kill_all()
        proc.wait(10)
        unrelated.kill()
        unrelated.wait(5)
        log.close()
