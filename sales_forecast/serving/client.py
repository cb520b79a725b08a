"""A client of the model server: the sample request, a checked predict and client-side latency (03_inference.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from sales_forecast.contract import MODEL_NAME
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


def served_version(base_url: str, timeout: float = 5.0) -> str | None:
    """The version the model server serves now (its v2 model metadata), or None when it does not answer."""
    try:
        response = httpx.get(f"{base_url}/v2/models/{MODEL_NAME}", timeout=timeout)
    except httpx.HTTPError:
        return None
    versions = response.json().get("versions") if response.status_code == 200 else None
    return str(versions[0]) if versions else None


def wait_for_version(base_url: str, version: str, timeout: float) -> bool:
    """Whether the server serves ``version`` within ``timeout`` seconds (it reloads a new champion by itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_version(base_url) == version:
            return True
        time.sleep(0.25)
    return False
