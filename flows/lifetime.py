"""Process lifetime of the CLI: child processes die with the run, signals end it promptly.

With ``PREFECT_API_URL`` unset, Prefect's ``get_client()`` starts an ephemeral API server as a child
process (``prefect.server.api.server.SubprocessASGIServer._run_uvicorn_command``: ``subprocess.Popen``
of ``python -m uvicorn ... prefect.server.api.server:create_app``) and stops it from an ``atexit``
hook. Neither SIGKILL nor Python's default SIGTERM action runs ``atexit``, so the server (about
230 MB) outlived such a run. Two parts close that gap without touching Prefect:

* :func:`start_descendant_watch` starts, once per process, a small watchdog process
  (``python -m flows.lifetime PID CREATE_TIME``) in its own session. It polls the watched process's
  descendants (pid plus create time, so a reused pid is never mistaken for one of them) and, when the
  watched process is gone for any reason, SIGKILL included, terminates the ones still running
  (SIGTERM, then SIGKILL after :data:`TERMINATE_TIMEOUT_S`). It only ever signals processes it saw
  in the watched process's tree.
* :func:`interrupt_on_signals` turns SIGTERM (and SIGINT) into :class:`SignalInterrupt`, a
  ``KeyboardInterrupt`` the CLI maps to exit code ``128 + signal``, so ``finally`` blocks and
  Prefect's ``atexit`` server stop run. A run interrupted while a case is in flight cannot finish
  unwinding until that case's worker thread returns (Prefect's task runner waits for it), so a timer
  stops the child processes and exits :data:`GRACE_S` after the signal if the process is still there.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

logger = logging.getLogger(__name__)

POLL_S = 0.25
"""Seconds between two looks of the watchdog at the watched process and its descendants."""
TERMINATE_TIMEOUT_S = 3.0
"""Seconds a child process gets between SIGTERM and SIGKILL."""
GRACE_S = 5.0
"""Seconds an interrupted run gets to unwind (Prefect records the crash) before it is ended."""
CREATE_TIME_TOLERANCE_S = 0.05
"""Two create times closer than this belong to the same process (psutil's clock ticks are 10 ms)."""

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_watch_lock = threading.Lock()
_watch: tuple[int, subprocess.Popen[bytes]] | None = None


class SignalInterrupt(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGINT arrives while :func:`interrupt_on_signals` is active."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- the watchdog ----------------------------------------------------------------------------------


def is_alive(process: psutil.Process) -> bool:
    """True while ``process`` (the very process, not a reuse of its pid) runs and is not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def list_descendants(process: psutil.Process) -> list[psutil.Process]:
    """The processes below ``process`` in the parent tree now (empty once it is gone)."""
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def terminate_processes(processes: Iterable[psutil.Process], *,
                        timeout_s: float = TERMINATE_TIMEOUT_S) -> list[int]:
    """SIGTERM each process still running, SIGKILL those left after ``timeout_s``; return the pids signalled.

    psutil checks the create time before it signals, so a pid that now names another process is
    skipped.
    """
    signalled = []
    for process in processes:
        try:
            process.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        signalled.append(process)
    _, alive = psutil.wait_procs(signalled, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in signalled]


def open_watched_process(pid: int, create_time: float) -> psutil.Process | None:
    """Return the process ``pid`` if it is the one created at ``create_time``, else None (gone or pid reused)."""
    try:
        process = psutil.Process(pid)
        same = abs(process.create_time() - create_time) <= CREATE_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:
        return None
    return process if same else None


def watch_process(pid: int, create_time: float, *, poll_s: float = POLL_S,
                  timeout_s: float = TERMINATE_TIMEOUT_S, stop: threading.Event | None = None) -> list[int]:
    """Remember the descendants of ``pid`` while it runs; when it is gone, terminate those still running.

    Args:
        pid: the watched process.
        create_time: its ``psutil`` create time; a process under ``pid`` created at another time is not it.
        poll_s: seconds between two looks at the process tree. A descendant started and orphaned within
            the last ``poll_s`` before the watched process died is not seen.
        timeout_s: seconds between SIGTERM and SIGKILL.
        stop: when set, the watch ends without terminating anything (for callers that run it in a thread).

    Returns:
        The pids that were signalled (empty when the process was not there, its pid was reused, or it
        left nothing behind).
    """
    stop = stop or threading.Event()
    watched = open_watched_process(pid, create_time)
    if watched is None:
        return []
    me, known = os.getpid(), {}
    while is_alive(watched):
        for child in list_descendants(watched):
            if child.pid != me and not (child.pid in known and is_alive(known[child.pid])):
                known[child.pid] = child
        known = {p: proc for p, proc in known.items() if is_alive(proc)}
        if stop.wait(poll_s):
            return []
    return terminate_processes(known.values(), timeout_s=timeout_s)


def start_descendant_watch() -> int:
    """Start (once per process) the watchdog that stops this process's children when it dies; return its pid.

    The watchdog runs ``python -m flows.lifetime <pid> <create time>`` in its own session, so a
    terminal's SIGINT or SIGHUP to this process group does not end it before it has cleaned up, and
    exits a moment after this process does. It starts in the folder that holds the ``flows`` package,
    so ``-m`` finds this very module whatever the caller's working directory holds.
    """
    global _watch
    with _watch_lock:
        if _watch is not None and _watch[0] == os.getpid() and _watch[1].poll() is None:
            return _watch[1].pid
        me = psutil.Process()
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "flows.lifetime", str(me.pid), repr(me.create_time())],
            cwd=_PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        _watch = (me.pid, watchdog)
        return watchdog.pid


def start_descendant_watch_if_ephemeral() -> int | None:
    """:func:`start_descendant_watch` unless ``PREFECT_API_URL`` is in the environment; return the watchdog's pid.

    Only the environment is read: importing ``prefect.settings`` here would freeze Prefect's settings
    before the CLI has set its defaults. An API URL set in a Prefect profile alone still starts the
    watch, which cannot reach that server: it only ever signals descendants of this process.
    """
    return None if os.environ.get("PREFECT_API_URL") else start_descendant_watch()


def current_watchdog_pid() -> int | None:
    """The pid of this process's running watchdog, or None."""
    watch = _watch
    if watch is None or watch[0] != os.getpid() or watch[1].poll() is not None:
        return None
    return watch[1].pid


def run_watchdog(argv: list[str]) -> int:
    """Entry point of ``python -m flows.lifetime PID CREATE_TIME``; return the exit code."""
    try:
        if len(argv) != 2:
            raise ValueError(argv)
        pid, create_time = int(argv[0]), float(argv[1])
        if pid <= 0:
            raise ValueError(pid)
    except ValueError:
        print(f"flows.lifetime expects two arguments PID (> 0) and CREATE_TIME (seconds since the epoch), "
              f"but got argv={argv!r}. It is started by flows.lifetime.start_descendant_watch().", file=sys.stderr)
        return 2
    for name in ("SIGINT", "SIGHUP"):  # in its own session already; a stray group signal must not end the watch
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    watch_process(pid, create_time)
    return 0


# -- signals ---------------------------------------------------------------------------------------


@dataclass
class SignalRecord:
    """What :func:`interrupt_on_signals` saw: the first signal received, or None."""

    signum: int | None = None

    @property
    def exit_code(self) -> int | None:
        """``128 + signum`` once a signal arrived, else None."""
        return None if self.signum is None else 128 + self.signum


def stop_now(exit_code: int, reason: str) -> None:
    """Log ``reason``, terminate this process's children (not its watchdog), flush, and ``os._exit``."""
    logger.warning(reason)
    watchdog = current_watchdog_pid()
    terminate_processes(p for p in list_descendants(psutil.Process()) if p.pid != watchdog)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
    os._exit(exit_code)


def _stop_after_grace(signum: int, grace_s: float) -> None:
    busy = sorted(t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread())
    name = signal.Signals(signum).name
    stop_now(128 + signum, f"ctfactory expects to stop within grace_s={grace_s:g} of {name}, but got "
                           f"busy_threads={busy}. Stopping its child processes and exiting with {128 + signum}; "
                           "committed cases are kept, run again to resume.")


class _GraceTimer:
    """Starts the grace timer on the first of ``signals`` the process receives, whichever handler takes it.

    Prefect's flow engine replaces the SIGTERM handler while a flow runs and only hands the signal on
    after its task runner has waited for the cases in flight, so a Python handler alone would arm the
    timer too late. Every signal that reaches a Python-level handler is also written, as one byte, to
    the wakeup fd (:func:`signal.set_wakeup_fd`); a daemon thread reads it, arms the timer, and passes
    the bytes on to any wakeup fd that was set before.
    """

    def __init__(self, signals: set[int], grace_s: float, record: SignalRecord | None = None) -> None:
        self.signals, self.grace_s, self.armed = signals, grace_s, False
        self.record = record
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._observe, name="ctfactory-grace-timer", daemon=True)
        self._thread.start()

    def _observe(self) -> None:
        while data := os.read(self._read, 64):
            if self._previous_fd >= 0:
                try:
                    os.write(self._previous_fd, data)
                except OSError:  # its owner closed it or stopped reading: the wakeup is theirs to lose
                    pass
            signum = next((b for b in data if b in self.signals), None)
            if signum is not None and self.record is not None and self.record.signum is None:
                # a signal Prefect's handler took (it may surface as any exception, e.g. Prefect's
                # "Task run is not set" when it lands inside the task engine) still counts as a stop
                self.record.signum = signum
            if signum is not None and not self.armed:
                self.armed = True
                timer = threading.Timer(self.grace_s, _stop_after_grace, args=(signum, self.grace_s))
                timer.daemon = True
                timer.start()
        os.close(self._read)

    def close(self) -> None:
        """Give the wakeup fd back and end the reading thread (an armed timer keeps running)."""
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)


@contextmanager
def interrupt_on_signals(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), *,
                         grace_s: float | None = GRACE_S) -> Iterator[SignalRecord]:
    """While the block runs, each of ``signals`` raises :class:`SignalInterrupt` in the main thread.

    The first signal is recorded in the yielded :class:`SignalRecord`. With ``grace_s`` set, the
    first signal the process receives (through this handler or one that library code installed
    meanwhile, such as Prefect's SIGTERM bridge) also starts a timer: if the process is still alive
    ``grace_s`` later, a worker thread still busy, its child processes are terminated and it exits with
    ``128 + signum``. An armed timer outlives the block on purpose: it bounds the time until the
    process exits. Outside the main thread nothing is installed. Previous handlers are restored when
    the block ends.
    """
    record = SignalRecord()
    if threading.current_thread() is not threading.main_thread():
        yield record
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        record.signum = record.signum or signum
        raise SignalInterrupt(signum)

    signals = set(signals)
    previous = {signum: signal.signal(signum, handle) for signum in signals}
    timer = _GraceTimer(signals, grace_s, record) if grace_s is not None else None
    try:
        yield record
    finally:
        if timer is not None:
            timer.close()
        for signum, old in previous.items():
            signal.signal(signum, old)


if __name__ == "__main__":
    sys.exit(run_watchdog(sys.argv[1:]))
