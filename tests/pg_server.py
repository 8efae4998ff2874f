"""A throwaway PostgreSQL cluster on 127.0.0.1 from Debian's ``postgresql`` package (no tests here).

:func:`postgres_server` runs ``initdb`` into a new temporary folder, starts the ``postgres`` server on a
free port (TCP on 127.0.0.1 only, trust authentication, durability switched off: nothing here outlives
the test), creates the database ``prefect`` and yields a :class:`PostgresServer` whose ``url`` is the
SQLAlchemy URL Prefect's server takes (``postgresql+asyncpg://...``). On exit the server is stopped with
``pg_ctl stop -m immediate``, every process of it still alive is killed, and the folder is removed.

``initdb`` and ``postgres`` refuse to run as root; as root (this machine and CI) they run as the
``postgres`` system user the Debian package creates, through ``setpriv``. The server process is started
with ``--pdeathsig KILL``: should the test process die without running its cleanup (SIGKILL), the kernel
kills the server, and its backends exit on their own when they see their postmaster gone. (The kernel
sends that signal when the *thread* that started the server ends: enter the context in the thread that
outlives the test, as pytest fixtures and test bodies do.) A temporary folder of about 40 MB stays behind
in that case (``/tmp/ctfactory-pg-*``).

Tests skip, with the reason, where the binaries or the ``postgres`` user are missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

PG_LIB = Path("/usr/lib/postgresql")
"""Where Debian installs each PostgreSQL major version's binaries (``<version>/bin``)."""
BINARIES = ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb")
SYSTEM_USER = "postgres"
DATABASE = "prefect"
STARTUP_TIMEOUT_S = 60.0
INSTALL_HINT = "Install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql"
_SERVER_SETTINGS = (  # throwaway cluster: no durability, TCP on 127.0.0.1 only
    "fsync=off", "synchronous_commit=off", "full_page_writes=off", "listen_addresses=127.0.0.1",
    "max_connections=200",
)


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster: its port, the SQLAlchemy ``url`` of database ``prefect``, its log file."""

    port: int
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def postgres_bin_dir() -> Path | None:
    """The ``bin`` folder of the newest PostgreSQL under ``/usr/lib/postgresql`` holding every binary used here."""
    versions = []
    for child in PG_LIB.glob("*") if PG_LIB.is_dir() else ():
        if re.fullmatch(r"\d+(\.\d+)?", child.name) and all((child / "bin" / b).is_file() for b in BINARIES):
            versions.append((tuple(int(p) for p in child.name.split(".")), child / "bin"))
    return max(versions)[1] if versions else None


def _skip_reason() -> str | None:
    if postgres_bin_dir() is None:
        return (f"needs PostgreSQL's server binaries ({', '.join(BINARIES)}) under {PG_LIB}/<version>/bin, "
                f"which are absent. {INSTALL_HINT}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"runs as root and needs the {SYSTEM_USER!r} system user (PostgreSQL refuses root). {INSTALL_HINT}"
        if shutil.which("setpriv") is None:
            return "runs as root and needs util-linux's setpriv to run PostgreSQL as the 'postgres' user"
    return None


def _as_server_user(argv: list[str], *, die_with_parent: bool = False) -> list[str]:
    """``argv`` run as the ``postgres`` user when this process is root (PostgreSQL refuses root)."""
    prefix = ["setpriv"]
    if os.geteuid() == 0:
        prefix += ["--reuid", SYSTEM_USER, "--regid", SYSTEM_USER, "--init-groups"]
    if die_with_parent:
        prefix += ["--pdeathsig", "KILL"]
    return [*prefix, "--", *argv] if len(prefix) > 1 else argv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(argv: list[str], *, env: dict[str, str], what: str, timeout: float = 120) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"postgres_server expects {what} to succeed, but got exit code {done.returncode}: "
                           f"{(done.stdout + done.stderr).strip()[-3000:]}")


def _server_env(socket_dir: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
            "PGHOST": str(socket_dir), "TZ": "UTC"}


def _stop(bin_dir: Path, data: Path, postmaster: subprocess.Popen, env: dict[str, str]) -> list[str]:
    """Stop the cluster; kill whatever of it survives. Returns the processes that had to be killed."""
    try:
        family = [psutil.Process(postmaster.pid), *psutil.Process(postmaster.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if postmaster.poll() is None:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate",
                                        "-w", "-t", "30"]), env=env, capture_output=True, timeout=60)
    try:
        postmaster.wait(10)
    except subprocess.TimeoutExpired:
        postmaster.kill()
        postmaster.wait(10)
    killed = []
    gone, alive = psutil.wait_procs(family, timeout=10)
    for proc in alive:  # psutil checks the create time: a reused pid is never hit
        with contextlib.suppress(psutil.NoSuchProcess):
            killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return killed


@contextlib.contextmanager
def postgres_server(database: str = DATABASE) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL cluster with database ``database``; stop and delete it on exit.

    Skips the calling test (``pytest.skip``) when PostgreSQL's binaries or the ``postgres`` user are absent.

    Yields:
        The running server; ``url`` is ``postgresql+asyncpg://postgres@127.0.0.1:PORT/<database>``.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    bin_dir = postgres_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="ctfactory-pg-"))  # not pytest's tmp_path: the postgres user cannot enter it
    if os.geteuid() == 0:
        user = pwd.getpwnam(SYSTEM_USER)
        os.chown(base, user.pw_uid, user.pw_gid)
    data, log_path = base / "data", base / "postgres.log"
    env = _server_env(base)
    postmaster = None
    try:
        _run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", SYSTEM_USER, "--auth=trust",
                              "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]), env=env, what="initdb")
        port = free_port()
        options = [f"-c{setting}" for setting in _SERVER_SETTINGS]
        with log_path.open("wb") as log:
            postmaster = subprocess.Popen(
                _as_server_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
                                 *options], die_with_parent=True),
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = PostgresServer(port=port, url=f"postgresql+asyncpg://{SYSTEM_USER}@127.0.0.1:{port}/{database}",
                                log_path=log_path)
        _wait_ready(bin_dir, port, postmaster, server, env)
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SYSTEM_USER, database],
             env=env, what=f"createdb {database}")
        yield server
    finally:
        if postmaster is not None:
            _stop(bin_dir, data, postmaster, env)
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(bin_dir: Path, port: int, postmaster: subprocess.Popen, server: PostgresServer,
                env: dict[str, str]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if postmaster.poll() is not None:
            raise RuntimeError(f"postgres_server expects the server to start, but got exit code "
                               f"{postmaster.returncode}. Log:\n{server.log_tail()}")
        ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                               env=env, capture_output=True)
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"postgres_server expects the server to accept connections within {STARTUP_TIMEOUT_S} s, "
                       f"but got none on port={port}. Log:\n{server.log_tail()}")
