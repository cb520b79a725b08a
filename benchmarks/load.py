"""Load on the model server over HTTP keep-alive: concurrent clients, throughput, the server's CPU per request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sales_forecast.errors import PipelineError
from sales_forecast.serving.client import LatencyStats, predict


@dataclass(frozen=True)
class Throughput:
    clients: int
    requests: int
    seconds: float
    latency: LatencyStats

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def measure_throughput(base_url: str, body: dict[str, Any], clients: int, requests_per_client: int,
                       timeout: float = 30.0) -> Throughput:
    """``clients`` threads, each with its own keep-alive connection, sending back-to-back requests."""
    samples: list[list[float]] = [[] for _ in range(clients)]
    errors: list[Exception] = []
    barrier = threading.Barrier(clients + 1)

    def run(slot: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout) as client:
            try:
                predict(client, body)  # connect before the clock starts
            except Exception as exc:  # reported by the caller
                errors.append(exc)
            barrier.wait()
            try:
                for _ in range(0 if errors else requests_per_client):
                    start = time.perf_counter()
                    predict(client, body)
                    samples[slot].append(time.perf_counter() - start)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    flat = [s for client_samples in samples for s in client_samples]
    return Throughput(clients, len(flat), elapsed, LatencyStats.of(flat))


def server_cpu_seconds(client: httpx.Client) -> float:
    """The server process's CPU time, from its Prometheus metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            return float(line.split()[1])
    raise PipelineError("the server's /metrics lacks process_cpu_seconds_total")
