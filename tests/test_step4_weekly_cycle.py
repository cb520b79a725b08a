"""The weekly cycle end to end, as `04_weekly_cycle.py --weeks 2` runs it: history ending two weeks ago, a first
champion, the local model server following it, then two weeks arriving one by one with a challenger trained each
week; clients query the server the whole time. Real PostgreSQL, Ray, MLflow and model server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections import Counter

import httpx
import mlflow
import psycopg
import pytest
from conftest import database_settings

from sales_forecast.contract import ACCURACY_TABLE, FORECASTS_TABLE
from sales_forecast.features.generator import Shape, latest_friday
from sales_forecast.operations.cycle import RetrainPolicy, WeeklyCycle
from sales_forecast.operations.serving import follow_local_server
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from sales_forecast.training.params import TrainingParams

WEEKS = 2
WEEK = dt.timedelta(days=7)
SHAPE = Shape(stores=20, depts=10, weeks=104, seed=11)  # two years: the model wins whatever the season
SERIES = SHAPE.stores * SHAPE.depts
SERVER = "cycle-test"
CLIENTS = 3


class Clients:
    """Threads sending v1 requests back to back; every status, and the version of every answer, is counted."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(CLIENTS)]

    def run(self, k: int) -> None:
        body = {"instances": [{"store": 1 + k, "dept": 1 + k}, {"store": 10, "dept": 8}]}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/v1/models/sales-model:predict", json=body)
                except httpx.TransportError:
                    status, version = 0, ""
                else:
                    status, version = response.status_code, response.headers.get("x-model-version", "")
                with self.lock:
                    self.statuses[status] += 1
                    if status == 200:
                        self.versions[version] += 1

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture(scope="module")
def replay(stack_settings, mlflow_uri, tmp_path_factory):
    """prepare_replay + the local server following the model directory + replay of WEEKS weeks under load."""
    settings = database_settings(stack_settings, "weekly_cycle")
    settings = dataclasses.replace(settings, model_dir=tmp_path_factory.mktemp("cycle-models"),
                                   mlflow_experiment="cycle-test")
    params = TrainingParams(registered_model="cycle-test-model")
    cycle = WeeklyCycle(settings, RetrainPolicy(), params)
    start = cycle.prepare_replay(SHAPE, WEEKS)
    first = str(cycle.champion().info["version"])
    port = free_port()
    cycle.on_promotion, cycle.served_version = follow_local_server(cycle.settings, port, SERVER)
    try:
        with Clients(f"http://127.0.0.1:{port}") as clients:
            reports = cycle.replay(start, WEEKS)
        cycle.finish()
        yield cycle, start, reports, clients, first
    finally:
        model_server.stop(settings.stack_dir, SERVER)


def test_every_week_is_appended_scored_and_forecast(replay) -> None:
    cycle, start, reports, _, _ = replay
    weeks = [start + k * WEEK for k in range(1, WEEKS + 1)]
    assert [r.week for r in reports] == weeks
    assert weeks[-1] == latest_friday(dt.datetime.now(dt.UTC).date())
    assert [r.online for r in reports] == [False] * (WEEKS - 1) + [True]  # only the current week is materialized
    assert all(r.retrained for r in reports)
    for report in reports:  # the forecasts made the week before were scored against the week's actuals
        assert report.accuracy is not None and report.accuracy.rows == SERIES
        assert 0 < report.accuracy.wmae < 10 * report.accuracy.naive_wmae
    with psycopg.connect(cycle.settings.postgres.libpq_url()) as conn:
        made = dict(conn.execute(f'SELECT as_of, count(*) FROM "{FORECASTS_TABLE}" GROUP BY as_of').fetchall())
        scored = {row[0] for row in conn.execute(
            f"SELECT week FROM \"{ACCURACY_TABLE}\" WHERE scope = 'overall'").fetchall()}
    assert {week: made.get(week) for week in [start, *weeks]} == {week: SERIES for week in [start, *weeks]}
    assert scored == set(weeks)


def test_the_server_serves_each_weeks_champion_and_never_fails_a_request(replay) -> None:
    _, _, reports, clients, first = replay
    for report in reports:
        assert report.served_version == report.champion_version  # after a promotion the server had switched
    # Until the current week arrives the replayed weeks are older than the ttl, so the online store has nothing
    # for these series: 404 (never a made-up forecast); then 200. Never a 5xx or a dropped connection.
    assert set(clients.statuses) <= {200, 404}, clients.statuses
    assert clients.statuses[200] > 20, clients.statuses
    assert set(clients.versions) <= {first} | {r.champion_version for r in reports}  # only champions were served
    promoted = [r.champion_version for r in reports if r.promoted]
    for version in promoted:  # a promotion during the load was served to the clients
        assert clients.versions[version] > 0


def test_the_weeks_are_logged_to_mlflow(replay) -> None:
    cycle, _, reports, _, _ = replay
    client = mlflow.MlflowClient(cycle.settings.tracking_uri)
    run = client.get_run(cycle.run_id)
    history = client.get_metric_history(cycle.run_id, "realized_wmae")
    assert len(history) == WEEKS
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r.accuracy.wmae for r in reports]
    assert run.info.status == "FINISHED"
    assert "monitoring/accuracy_per_week.png" in [a.path for a in client.list_artifacts(cycle.run_id, "monitoring")]
