#!/usr/bin/env python
"""Benchmark the model server on loopback against the framework's floor, side by side in one run:
``python -m benchmarks.bench_serving [--requests N] [--rounds R]`` (make bench-serving).

It sets up what it needs in its own database (``serving_bench``) on the configured or embedded PostgreSQL, so the
demo's data is untouched: step 1 on a small shape, and a quick Forecaster unless ``--model-dir`` names one. Then it
starts two servers on free loopback ports with the same kserve REST server (``HostModelServer``: one uvicorn
worker, no gRPC, request logs off):

- the model server (``python -m sales_forecast.serving.server``), the real request path;
- a no-op ``kserve.Model`` (``--serve-noop``): kserve's default preprocess, a predict that returns two constant
  predictions without reading the request. It is the floor: HTTP parsing, routing, kserve's data plane and
  histograms, JSON encoding of the answer, and the client's own cost.

What each figure includes (all latencies are client side, over a keep-alive connection, from ``httpx.post`` to
the parsed answer):

- ratio: p50 of 2-instance requests, model server / no-op, each the best p50 of R rounds of N sequential
  requests, the two servers alternating round by round (the goal is at most 2.2);
- lookups alone, called in this process (no HTTP, no model), best p50 of R rounds, for the same 2 series: Feast's
  ``get_online_features`` through the feature service (what the server called before), and the server's own lookup
  (``OnlineFeatureLookup.rows``: one prepared statement on Feast's online table, the values converted and checked);
- 1 and 2 instances, sequential: p50/p95/p99/max of N requests of the model server (after the rounds);
- 2 instances, C clients: requests/s and latency with C threads, each its own connection, back to back;
- server CPU per request: the model server's process CPU time (``process_cpu_seconds_total``) over the N
  sequential 2-instance requests, divided by N (HTTP, the lookup's thread, the model; also its Feast/psycopg
  work; not PostgreSQL's).

Latency figures are noisy on a busy machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg
from rich.console import Console
from rich.table import Table

from benchmarks.load import Throughput, measure_throughput, server_cpu_seconds
from sales_forecast import stack
from sales_forecast.cli import positive_int, run_cli
from sales_forecast.config import Settings, load_settings
from sales_forecast.features.generator import Shape
from sales_forecast.serving.client import SAMPLE_REQUEST, LatencyStats, time_requests
from sales_forecast.stack import model_server, processes
from sales_forecast.stack.processes import free_port
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

BENCH_DATABASE = "serving_bench"
BENCH_SERVER = "serving-bench"
NOOP_SERVER = "serving-bench-noop"
BENCH_SHAPE = Shape(stores=20, depts=15, weeks=12, seed=11)  # holds both series of the sample request
ONE_INSTANCE = {"instances": [{"store": 1, "dept": 3}]}
GOALS = "Goals: p50 at most 2.2x the no-op model's; 2 instances: p50 < 5 ms, p99 < 20 ms, >= 200 requests/s"
MAX_RATIO = 2.2


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


# ---------------------------------------------------------------- the no-op server (the framework's floor)

def serve_noop(port: int) -> None:
    """A kserve.Model that answers two constant predictions, on the model server's REST server: the same app, with
    its error handlers and body limit, and settings."""
    from kserve import Model
    from kserve import model_server as kserve_server

    from sales_forecast.serving.server import (
        HostModelServer,
        install_body_limit,
        install_error_handlers,
        quiet_request_logs,
    )

    class NoopModel(Model):
        def load(self) -> bool:
            self.ready = True
            return True

        def predict(self, payload, headers=None):
            return {"predictions": [0.0, 0.0]}

    server = HostModelServer("127.0.0.1", port, enable_latency_logging=False)
    quiet_request_logs()
    install_error_handlers(kserve_server.app)  # the model server's app as it is: the same handlers and body limit
    install_body_limit(kserve_server.app, load_settings().max_body_bytes)
    model = NoopModel("sales-model")
    model.load()
    server.start([model])


def start_noop(settings: Settings, port: int, timeout: float = 120.0) -> str:
    root = settings.stack_dir / NOOP_SERVER
    root.mkdir(parents=True, exist_ok=True)
    pid_file, log = root / "server.pid", root / "server.log"
    processes.stop(pid_file)
    url = model_server.url_of(port)
    pid = processes.start_background([sys.executable, "-m", "benchmarks.bench_serving", "--serve-noop", str(port)],
                                     log, pid_file)
    alive = lambda: not processes.exited(pid)  # noqa: E731
    if not processes.wait_until(lambda: model_server.is_ready(url), timeout, alive):
        processes.stop(pid_file)
        raise RuntimeError(f"the no-op server did not start; log tail:\n{log.read_text()[-2000:]}")
    return url


def stop_noop(settings: Settings) -> None:
    processes.stop(settings.stack_dir / NOOP_SERVER / "server.pid")


# ---------------------------------------------------------------- measurements

@dataclass(frozen=True)
class SideBySide:
    model: LatencyStats  # best round (lowest p50)
    noop: LatencyStats
    feast_p50_ms: float
    lookup_p50_ms: float
    rounds: int

    @property
    def ratio(self) -> float:
        return self.model.p50 / self.noop.p50


def lookup_p50s(settings: Settings, requests: int, rounds: int) -> tuple[float, float]:
    """Best p50s (ms) of Feast's ``get_online_features`` through the feature service and of the server's lookup,
    for the sample's 2 series, alternating round by round."""
    from sales_forecast.config import set_library_defaults
    from sales_forecast.contract import FEATURE_SERVICE
    from sales_forecast.features.derive import MODEL_FEATURES
    from sales_forecast.serving.instances import Instance
    from sales_forecast.serving.online_features import OnlineFeatureLookup

    set_library_defaults({"PGCONNECT_TIMEOUT": "3"})
    lookup = OnlineFeatureLookup.open(settings, MODEL_FEATURES)
    service = lookup.store.get_feature_service(FEATURE_SERVICE)
    rows = SAMPLE_REQUEST["instances"]
    instances = [Instance(row["store"], row["dept"]) for row in rows]
    calls = {"feast": lambda: lookup.store.get_online_features(features=service, entity_rows=rows),
             "server": lambda: lookup.rows(instances)}
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(50):
        for call in calls.values():
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            seconds = []
            for _ in range(requests):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(seconds)) * 1000)
    return best["feast"], best["server"]


def side_by_side(model_url: str, noop_url: str, requests: int, rounds: int) -> tuple[LatencyStats, LatencyStats]:
    best: dict[str, LatencyStats] = {}
    with httpx.Client(base_url=model_url, timeout=30.0) as model, httpx.Client(base_url=noop_url, timeout=30.0) as noop:
        for client in (model, noop):
            time_requests(client, SAMPLE_REQUEST, 200)  # warm-up: imports, caches, connection
        for round_ in range(rounds):
            order = [("model", model), ("noop", noop)]
            for name, client in order if round_ % 2 == 0 else order[::-1]:
                stats = time_requests(client, SAMPLE_REQUEST, requests)
                if name not in best or stats.p50 < best[name].p50:
                    best[name] = stats
    return best["model"], best["noop"]


def run(settings: Settings, requests: int, rounds: int, clients: int, model_dir: Path | None) -> list[Table]:
    prepare_features(settings)
    model_dir = model_dir or prepare_model(settings, settings.stack_dir / BENCH_SERVER / "model")
    load_before = os.getloadavg()
    url = model_server.start(settings, free_port(), model_dir=model_dir, name=BENCH_SERVER)
    try:
        noop_url = start_noop(settings, free_port())
        try:
            model, noop = side_by_side(url, noop_url, requests, rounds)
        finally:
            stop_noop(settings)
        pair = SideBySide(model, noop, *lookup_p50s(settings, requests, rounds), rounds)
        with httpx.Client(base_url=url, timeout=30.0) as client:
            one = time_requests(client, ONE_INSTANCE, requests)
            cpu_before = server_cpu_seconds(client)
            two = time_requests(client, SAMPLE_REQUEST, requests)
            cpu_per_request = (server_cpu_seconds(client) - cpu_before) / requests
        load = measure_throughput(url, SAMPLE_REQUEST, clients, max(1, requests // clients))
    finally:
        model_server.stop(settings.stack_dir, BENCH_SERVER)
    return [comparison(pair, requests, load_before), report(one, two, load, cpu_per_request)]


def comparison(pair: SideBySide, requests: int, load_before: tuple[float, float, float]) -> Table:
    load_after = os.getloadavg()
    verdict = "meets" if pair.ratio <= MAX_RATIO else "misses"
    table = Table(title=f"side by side: {requests} sequential 2-instance requests, best p50 of {pair.rounds} rounds",
                  caption=f"ratio {pair.ratio:.2f} ({verdict} the goal of at most {MAX_RATIO}). Load average "
                          f"(1/5/15 min) before {_load(load_before)}, after {_load(load_after)} on "
                          f"{os.cpu_count()} CPUs.")
    for column in ("server", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for label, stats in (("model server", pair.model), ("no-op kserve.Model", pair.noop)):
        table.add_row(label, f"{stats.p50:.2f}", f"{stats.p95:.2f}", f"{stats.p99:.2f}", f"{stats.max:.2f}")
    table.add_row("Feast get_online_features alone (in process)", f"{pair.feast_p50_ms:.2f}", "", "", "")
    table.add_row("the server's lookup alone (in process)", f"{pair.lookup_p50_ms:.2f}", "", "", "")
    table.add_row("ratio model / no-op (p50)", f"{pair.ratio:.2f}", "", "", "")
    return table


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


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
    parser.add_argument("--requests", type=positive_int, default=400, help="requests per measurement")
    parser.add_argument("--rounds", type=positive_int, default=3, help="side-by-side rounds (best p50 counts)")
    parser.add_argument("--clients", type=positive_int, default=4, help="concurrent clients for requests/s")
    parser.add_argument("--model-dir", type=Path, default=None, help="serve this bundle instead of a quick model")
    parser.add_argument("--serve-noop", type=positive_int, metavar="PORT", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return
    console = Console()
    for table in run(bench_settings(load_settings()), args.requests, args.rounds, args.clients, args.model_dir):
        console.print(table)


if __name__ == "__main__":
    run_cli(main)
