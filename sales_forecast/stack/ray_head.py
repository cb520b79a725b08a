"""A local Ray head on loopback, the laptop's stand-in for the cluster's RayCluster ``feast-ray``.

Step 1's materialization (Feast's Ray engine) and step 2's point-in-time join attach to it as drivers
(``RAY_ADDRESS=127.0.0.1:<port>``, never Ray Client), so they skip Ray's start-up. Its dashboard doubles as
the job-submission API, as the cluster's does. ``ray start --block`` keeps the head's processes in one
process group, which ``stop`` ends; ``ray stop`` would end every Ray on the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

from sales_forecast.errors import PipelineError
from sales_forecast.stack import processes


def _paths(stack_dir: Path) -> tuple[Path, Path, Path]:
    root = stack_dir / "ray"
    return root, root / "head.log", root / "head.pid"


def head_pid(stack_dir: Path) -> int | None:
    """The running head's ``ray start --block`` process, else None."""
    return processes.pid_of(_paths(stack_dir)[2])


def temp_dir(stack_dir: Path) -> Path:
    """Ray's session folder: short, since its socket paths must fit in 107 bytes."""
    digest = hashlib.sha1(str(stack_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"sales-ray-{digest}"


def address(port: int) -> str:
    return f"127.0.0.1:{port}"


def dashboard_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def is_running(stack_dir: Path) -> bool:
    return head_pid(stack_dir) is not None


def start(stack_dir: Path, port: int, dashboard_port: int, num_cpus: int | None = None,
          timeout: float = 120.0, reserved: Collection[int] = ()) -> str:
    """Start (or reuse) the head; returns its GCS address. ``reserved``: ports its agents must not take (the stack's
    other services, which may start later)."""
    root, log, pid_file = _paths(stack_dir)
    if processes.pid_of(pid_file) is not None and processes.http_ok(f"{dashboard_url(dashboard_port)}/api/version"):
        return address(port)
    processes.stop(pid_file)
    root.mkdir(parents=True, exist_ok=True)
    session = temp_dir(stack_dir)
    shutil.rmtree(session, ignore_errors=True)
    # Every port explicit, free and distinct: a second Ray on the machine must not take this head's agents.
    agent, agent_grpc, runtime_env, metrics, client = processes.free_ports(5, exclude={port, dashboard_port, *reserved})
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
               "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={session}",
               "--disable-usage-stats",
               f"--num-cpus={num_cpus or os.cpu_count() or 1}"]
    # Ray 2.58 drains a node for up to 30 s on SIGTERM, for Ray Serve replicas; this head has none to move, and
    # without the drain `stack down` ends it at once instead of after 30 s.
    pid = processes.start_background(command, log, pid_file, env={"RAY_DISABLE_USAGE_STATS": "1",
                                                                  "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    ready = processes.wait_until(lambda: processes.http_ok(f"{dashboard_url(dashboard_port)}/api/version"),
                                 timeout, lambda: processes.running(pid, pid_file))
    if not ready:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        processes.stop(pid_file)
        raise PipelineError(f"the local Ray head did not start on port {port}; log tail:\n{tail}")
    return address(port)


def stop(stack_dir: Path) -> bool:
    stopped = processes.stop(_paths(stack_dir)[2], timeout=30.0)
    shutil.rmtree(temp_dir(stack_dir), ignore_errors=True)
    return stopped
