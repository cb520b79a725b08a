#!/usr/bin/env python
"""Benchmark the model server on loopback: ``python -m benchmarks.bench_serving [--requests N]`` (make bench-serving).

Sets up what it needs in its own database (``serving_bench``) on the configured or embedded PostgreSQL, so the
demo's data is untouched: step 1 on a small shape when the database lacks current online features, and a quick
Forecaster unless ``--model-dir`` names one. Then it starts the server on a free loopback port and reports
p50/p95/p99 latency of sequential 1- and 2-instance requests, and requests per second from concurrent clients.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from benchmarks.load import Throughput, measure_throughput, server_cpu_seconds
from sales_forecast import stack
from sales_forecast.cli import positive_int, run_cli
from sales_forecast.config import Settings, load_settings
from sales_forecast.features.generator import Shape
from sales_forecast.serving.client import SAMPLE_REQUEST, LatencyStats, time_requests
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

BENCH_DATABASE = "serving_bench"
BENCH_SERVER = "serving-bench"
BENCH_SHAPE = Shape(stores=20, depts=15, weeks=12, seed=11)  # holds both series of the sample request
ONE_INSTANCE = {"instances": [{"store": 1, "dept": 3}]}
GOALS = "Goal for 2 instances: p50 < 5 ms, p99 < 20 ms, >= 200 requests/s"


def bench_settings(settings: Settings) -> Settings:
    return settings.with_database(BENCH_DATABASE)


def prepare_features(settings: Settings) -> None:
    """Step 1 on BENCH_SHAPE into a fresh benchmark database (a few seconds; never stale or of an older layout)."""
    from sales_forecast.features.pipeline import run_feature_pipeline

    stack.ensure_postgres(settings)
    with psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{settings.postgres.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{settings.postgres.database}"')
    run_feature_pipeline(BENCH_SHAPE, settings)


def prepare_model(settings: Settings, directory: Path) -> Path:
    from sales_forecast.forecaster import META_FILE

    if not (directory / META_FILE).is_file():
        fit_quick_forecaster(labelled_rows(settings)).save(directory)
    return directory


def run(settings: Settings, requests: int, clients: int, model_dir: Path | None) -> Table:
    prepare_features(settings)
    model_dir = model_dir or prepare_model(settings, settings.stack_dir / BENCH_SERVER / "model")
    url = model_server.start(settings, free_port(), model_dir=model_dir, name=BENCH_SERVER)
    try:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            time_requests(client, SAMPLE_REQUEST, min(200, requests))  # warm-up: imports, caches, connection
            one = time_requests(client, ONE_INSTANCE, requests)
            cpu_before = server_cpu_seconds(client)
            two = time_requests(client, SAMPLE_REQUEST, requests)
            cpu_per_request = (server_cpu_seconds(client) - cpu_before) / requests
        load = measure_throughput(url, SAMPLE_REQUEST, clients, max(1, requests // clients))
    finally:
        model_server.stop(settings.stack_dir, BENCH_SERVER)
    return report(one, two, load, cpu_per_request)


def report(one: LatencyStats, two: LatencyStats, load: Throughput, cpu_per_request: float) -> Table:
    load_1, _, _ = os.getloadavg()
    table = Table(title="model server on loopback",
                  caption=f"{GOALS}. Server CPU per 2-instance request: {cpu_per_request * 1000:.2f} ms. "
                          f"Load average when done: {load_1:.1f} on {os.cpu_count()} CPUs.")
    for column in ("requests", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s"):
        table.add_column(column, justify="left" if column == "requests" else "right")
    rows = [("1 instance, sequential", one, ""), ("2 instances, sequential", two, ""),
            (f"2 instances, {load.clients} clients", load.latency, f"{load.per_second:.0f}")]
    for label, stats, rate in rows:
        table.add_row(label, str(stats.count), f"{stats.p50:.2f}", f"{stats.p95:.2f}", f"{stats.p99:.2f}",
                      f"{stats.max:.2f}", rate)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=positive_int, default=1000, help="requests per measurement")
    parser.add_argument("--clients", type=positive_int, default=4, help="concurrent clients for requests/s")
    parser.add_argument("--model-dir", type=Path, default=None, help="serve this bundle instead of a quick model")
    args = parser.parse_args(argv)
    Console().print(run(bench_settings(load_settings()), args.requests, args.clients, args.model_dir))


if __name__ == "__main__":
    run_cli(main)
