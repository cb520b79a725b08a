"""An embedded PostgreSQL for laptops and CI, from the binaries bundled in the ``pgserver`` wheel.

pgserver's own ``get_server`` listens on a Unix socket only; we run the same binaries on 127.0.0.1 so the
local configuration has the same host:port shape as the cluster's. PostgreSQL refuses to run as root, so
as root the server runs as pgserver's unprivileged ``pgserver`` system user.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
import warnings
from pathlib import Path

import psycopg

from sales_forecast.config import PostgresSettings
from sales_forecast.errors import PipelineError
from sales_forecast.stack import processes

POSTMASTER_PID = "postmaster.pid"  # PostgreSQL's own file in the data directory

DATABASES = ("feast", "mlflow")


def _pg_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the pgserver package is not installed (pip install -r requirements.txt)")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _bin(name: str) -> str:
    return str(_pg_bin_dir() / name)


def _system_user(pgdata: Path) -> str | None:
    """As root, prepare the pgserver system user and permissions; otherwise run as ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd
    import stat

    with warnings.catch_warnings():  # pgserver's import warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    bin_dir = _pg_bin_dir()

    user = "pgserver"
    ensure_user_exists(user)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(bin_dir)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    return user


def _run(args: list[str], user: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, user=user, capture_output=True, text=True, timeout=timeout, check=False)


def is_ready(settings: PostgresSettings, timeout: float = 2.0) -> bool:
    try:
        with psycopg.connect(settings.libpq_url("postgres"), connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.OperationalError:
        return False


def start(settings: PostgresSettings, pgdata: Path) -> None:
    """Start (or reuse) the embedded server and create the project's databases."""
    if not is_ready(settings):
        pgdata.mkdir(parents=True, exist_ok=True)
        user = _system_user(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            result = _run([_bin("initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=utf8",
                           "-U", settings.user], user)
            if result.returncode != 0:
                raise PipelineError(f"initdb failed: {result.stderr.strip()}")
        options = (f"-h 127.0.0.1 -p {settings.port} -k '' -c max_connections=200 -c fsync=off "
                   "-c wal_level=minimal -c max_wal_senders=0")
        result = _run([_bin("pg_ctl"), "-D", str(pgdata), "-w", "-t", "30", "-l", str(pgdata / "server.log"),
                       "-o", options, "start"], user)
        if result.returncode != 0 or not _wait_ready(settings, 30):
            log_file = pgdata / "server.log"
            log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise PipelineError(f"PostgreSQL did not start on port {settings.port}: "
                                     f"{result.stderr.strip()}\n{log}")
    create_databases(settings)


def _wait_ready(settings: PostgresSettings, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if is_ready(settings):
            return True
        time.sleep(0.2)
    return False


def create_databases(settings: PostgresSettings) -> None:
    with psycopg.connect(settings.libpq_url("postgres"), autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def server_pid(pgdata: Path) -> int | None:
    """The running embedded server's postmaster pid (the first line of its postmaster.pid), else None."""
    return processes.pid_of(pgdata / POSTMASTER_PID)


def stop(pgdata: Path) -> bool:
    """Stop the embedded server; True when one was running."""
    if not (pgdata / POSTMASTER_PID).exists():
        return False
    user = "pgserver" if os.geteuid() == 0 else None
    result = _run([_bin("pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "stop"], user)
    return result.returncode == 0
