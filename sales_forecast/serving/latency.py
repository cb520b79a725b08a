"""Client-side latency and throughput of the model server over HTTP keep-alive (03_inference.py, benchmark)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from sales_forecast.config import MODEL_NAME
from sales_forecast.errors import PipelineError

SAMPLE_REQUEST: dict[str, Any] = {"instances": [{"store": 1, "dept": 3}, {"store": 5, "dept": 12}]}
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        ms = np.asarray(seconds, dtype="float64") * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(len(ms), float(p50), float(p95), float(p99), float(ms.max()))

    def line(self) -> str:
        return (f"p50 {self.p50:.2f} ms, p95 {self.p95:.2f} ms, p99 {self.p99:.2f} ms, max {self.max:.2f} ms "
                f"over {self.count} requests")


def predict(client: httpx.Client, body: dict[str, Any]) -> list[float]:
    response = client.post(PREDICT_PATH, json=body)
    if response.status_code != 200:
        raise PipelineError(f"the model server answered {response.status_code}: {response.text[:500]}")
    return response.json()["predictions"]


def time_requests(client: httpx.Client, body: dict[str, Any], count: int) -> LatencyStats:
    """Sequential requests, one at a time; each must succeed."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        predict(client, body)
        seconds.append(time.perf_counter() - start)
    return LatencyStats.of(seconds)


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
