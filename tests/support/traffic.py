"""Continuous client traffic for the serving tests: client threads that send the same request back to back and
record every answer (when it started, how long it took, its status, its body and the served model's version),
until stopped, or at most ``max_seconds`` / ``max_requests`` per client (a test's load always ends by itself)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic()
    seconds: float
    status: int  # 0: no HTTP answer (the exception's text is in body)
    body: Any
    version: str | None  # the x-model-version header

    @property
    def ended(self) -> float:
        return self.started + self.seconds


class Traffic:
    def __init__(self, url: str, path: str, body: dict[str, Any], clients: int = 1, timeout: float = 30.0,
                 max_seconds: float = 300.0, max_requests: int = 100_000):
        self.url, self.path, self.body = url, path, body
        self.clients, self.timeout = clients, timeout
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    response = client.post(self.path, json=self.body)
                    status, version = response.status_code, response.headers.get("x-model-version")
                    try:
                        body = response.json()
                    except ValueError:
                        body = response.text
                except httpx.HTTPError as exc:
                    status, body, version = 0, repr(exc), None
                self.answers.append(Answer(started, time.monotonic() - started, status, body, version))

    def wait_for(self, predicate, seconds: float) -> Answer | None:
        """The first answer (from now on) for which ``predicate`` holds, waiting at most ``seconds``."""
        start = len(self.answers)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for answer in self.answers[start:]:
                if predicate(answer):
                    return answer
            time.sleep(0.05)
        return None

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for answer in self.answers:
            counts[answer.status] = counts.get(answer.status, 0) + 1
        return counts
