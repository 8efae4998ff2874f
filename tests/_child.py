"""Running ``python -m flows ...`` in a child process with its own Prefect (no tests here)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def child_env(prefect_home: str | Path, **extra: str) -> dict[str, str]:
    """The environment of a child process with its own Prefect home, plus ``extra`` variables.

    Every ``PREFECT_*`` variable of this process is left out (no API URL: the child starts its own
    ephemeral server; none of the session harness's switches); analytics off, one OpenMP thread, and
    120 s for the ephemeral server to start on a busy machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", **extra)
    return env


def flows_argv(*args: str | Path) -> list[str]:
    """The command line of ``python -m flows ARGS`` with this interpreter."""
    return [sys.executable, "-m", "flows", *map(str, args)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` every ``interval`` s; return its first truthy value, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
