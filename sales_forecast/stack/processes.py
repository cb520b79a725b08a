"""Background server processes of the local stack, tracked by pid files in the stack folder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now, none in ``exclude``. Each port's
    socket stays bound until all are chosen: ports asked for one after another can repeat (a Ray head given the same
    port for two of its agents refused to start)."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            if (port := sock.getsockname()[1]) not in exclude:
                ports.append(port)
        return ports


def pid_of(pid_file: Path) -> int | None:
    """The live process a pid file names (its first line: PostgreSQL's postmaster.pid has more), else None."""
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def start_background(command: list[str], log_file: Path, pid_file: Path, env: dict[str, str] | None = None) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    pid_file.write_text(str(process.pid))
    return process.pid


def stop(pid_file: Path, timeout: float = 10.0) -> bool:
    """Stop the process group of the recorded pid; True when something was running."""
    pid = pid_of(pid_file)
    pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def exited(pid: int) -> bool:
    try:  # reap it if it is our child: an exited, unreaped child still answers kill(pid, 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def running(pid: int | None, pid_file: Path) -> bool:
    """Whether ``pid``, which ``start_background`` recorded in ``pid_file``, still runs: an exited child that was not
    reaped yet (its pid still answers kill 0) counts as exited."""
    return pid is not None and pid_of(pid_file) == pid and not exited(pid)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], bool], seconds: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return False
        time.sleep(0.25)
    return False
