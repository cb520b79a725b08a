#!/usr/bin/env python
"""The embedded stack's footprint: `python -m benchmarks.bench_stack` (make bench-stack).

Starts, side by side on free ports in a temporary folder, MLflow's default server (`mlflow server --workers 1`,
job execution on: uvicorn plus its job runner and consumers) and the project's light one (the same command
with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), then the project's PostgreSQL and Ray head; for each it prints
the start-up time (until its health check answers) and, after a settling pause, its processes, resident memory
(RSS) and proportional memory (PSS, shared pages counted once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from sales_forecast.config import load_settings
from sales_forecast.stack import mlflow_server, postgres, processes, ray_head

SETTLE_SECONDS = 8.0


@dataclass(frozen=True)
class Footprint:
    name: str
    start_seconds: float
    processes: int
    rss_mib: float
    pss_mib: float


def measure(name: str, root_pid: int, started: float, ready: float) -> Footprint:
    time.sleep(SETTLE_SECONDS)
    root = psutil.Process(root_pid)
    tree = [root, *root.children(recursive=True)]
    rss = pss = 0
    for proc in tree:
        info = proc.memory_full_info()
        rss, pss = rss + info.rss, pss + info.pss
    return Footprint(name, ready - started, len(tree), rss / 2**20, pss / 2**20)


def mlflow_default(folder: Path) -> Footprint:
    port = processes.free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'default.db'}", "--serve-artifacts",
               "--artifacts-destination", str(folder / "default-artifacts")]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        processes.wait_until(lambda: processes.http_ok(f"http://127.0.0.1:{port}/health"), 180)
        return measure("MLflow, default (`mlflow server --workers 1`)", process.pid, started, time.perf_counter())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def mlflow_light(folder: Path) -> Footprint:
    started = time.perf_counter()
    mlflow_server.start(folder, processes.free_port())
    ready = time.perf_counter()
    try:
        pid = processes.pid_of(folder / "mlflow" / "mlflow.pid")
        return measure("MLflow, the stack's (no job execution)", pid, started, ready)
    finally:
        mlflow_server.stop(folder)


def postgres_server(folder: Path) -> Footprint:
    settings = load_settings({"SALES_STACK_DIR": str(folder), "POSTGRES_PORT": str(processes.free_port())})
    started = time.perf_counter()
    postgres.start(settings.postgres, folder / "postgres")
    ready = time.perf_counter()
    try:
        pid = postgres.server_pid(folder / "postgres")
        return measure("PostgreSQL (pgserver binaries)", pid, started, ready)
    finally:
        postgres.stop(folder / "postgres")


def ray(folder: Path) -> Footprint:
    started = time.perf_counter()
    ray_head.start(folder, *processes.free_ports(2))
    ready = time.perf_counter()
    try:
        pid = ray_head.head_pid(folder)
        return measure("Ray head (dashboard and job API included)", pid, started, ready)
    finally:
        ray_head.stop(folder)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        for measure_one in (mlflow_default, mlflow_light, postgres_server, ray):
            rows.append(measure_one(Path(tmp)))
    table = Table(title="embedded stack footprint",
                  caption=f"after {SETTLE_SECONDS:.0f} s idle; load average {os.getloadavg()[0]:.1f} "
                          f"on {os.cpu_count()} CPUs")
    for column in ("service", "start-up s", "processes", "RSS MiB", "PSS MiB"):
        table.add_column(column, justify="left" if column == "service" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.start_seconds:.1f}", str(row.processes), f"{row.rss_mib:,.0f}",
                      f"{row.pss_mib:,.0f}")
    Console(highlight=False, width=120).print(table)


if __name__ == "__main__":
    main()
