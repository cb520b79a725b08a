"""Hot reload and the background gauges of a running model server (``SERVING_RELOAD_SECONDS=1``), with clients
sending requests continuously:

- a new bundle published into the shared model directory, and the MLflow alias moved to a new version: every
  answer is a 200, and the answers switch to the new model's (values and version);
- a broken bundle published: the old model keeps serving, the failure is logged and counted;
- the realized-accuracy gauges from ``forecast_accuracy``, created and filled here in the test database.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import psycopg
import pytest
from mlflow import MlflowClient

from sales_forecast import model_dir
from sales_forecast.config import Settings
from sales_forecast.contract import ACCURACY_TABLE, FORECASTER_ARTIFACT, MODEL_NAME
from sales_forecast.forecaster import META_FILE, Forecaster
from sales_forecast.serving.client import SAMPLE_REQUEST
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from sales_forecast.training.tracking import example_rows, log_network
from tests.support.quick_model import fit_quick_forecaster, labelled_rows
from tests.support.traffic import Answer, Traffic

PREDICT = f"/v1/models/{MODEL_NAME}:predict"
QUANTILES_REQUEST = {**SAMPLE_REQUEST, "parameters": {"quantiles": True}}
LEVELS = (0.1, 0.5, 0.9)
RELOAD_ENV = {"SERVING_RELOAD_SECONDS": "1"}
SWITCH_SECONDS = 30  # a reload check every second, then a load: well within this even on a busy machine
TEST_MODEL = "sales-forecast-reload-test"


@pytest.fixture(scope="module")
def forecasters(settings: Settings) -> list[Forecaster]:
    rows = labelled_rows(settings)
    return [fit_quick_forecaster(rows, epochs=30, seed=seed, quantiles=LEVELS) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def expected(forecasters: list[Forecaster], latest_rows: pd.DataFrame) -> list[np.ndarray]:
    keys = [(i["store"], i["dept"]) for i in SAMPLE_REQUEST["instances"]]
    return [f.predict_quantiles(latest_rows.loc[keys]) for f in forecasters]


@pytest.fixture(scope="module")
def shared_dir(forecasters: list[Forecaster], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    model_dir.publish(forecasters[0], directory, {"registered_model": "sales-forecast", "version": "1"})
    return directory


@pytest.fixture(scope="module")
def server(settings: Settings, shared_dir: Path) -> Iterator[str]:
    name = "test-serving-reload"
    url = model_server.start(settings, free_port(), model_dir=shared_dir, name=name, extra_env=RELOAD_ENV)
    yield url
    model_server.stop(settings.stack_dir, name)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def metric(url: str, name: str) -> float | None:
    for line in metrics(url).splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def check_switch(answers: list[Answer], old: str, new: str, before: np.ndarray, after: np.ndarray) -> None:
    """Every answer a 200 from the old or the new model, with that model's values; never back to the old one."""
    assert answers
    assert {a.status for a in answers} == {200}, {a.status: a.body for a in answers if a.status != 200}
    versions = [a.version for a in sorted(answers, key=lambda a: a.ended)]
    assert set(versions) == {old, new}, set(versions)
    switched = versions.index(new)
    # answers that started after the first new one ended were all the new model's (no flapping back)
    first_new_end = min(a.ended for a in answers if a.version == new)
    assert all(a.version == new for a in answers if a.started > first_new_end)
    assert switched > 0
    for answer in answers:
        want = after if answer.version == new else before
        np.testing.assert_allclose(answer.body["predictions"], want[:, 1], rtol=1e-6)
        np.testing.assert_allclose(answer.body["quantiles"]["p10"], want[:, 0], rtol=1e-6)
        np.testing.assert_allclose(answer.body["quantiles"]["p90"], want[:, 2], rtol=1e-6)


def test_a_new_bundle_in_the_model_directory_is_served_without_a_failed_request(
        server: str, shared_dir: Path, forecasters: list[Forecaster], expected: list[np.ndarray]) -> None:
    with Traffic(server, PREDICT, QUANTILES_REQUEST, clients=2, max_seconds=120) as traffic:
        assert traffic.wait_for(lambda a: a.version == "1", 30)
        time.sleep(1.0)
        model_dir.publish(forecasters[1], shared_dir, {"registered_model": "sales-forecast", "version": "2"})
        switched = traffic.wait_for(lambda a: a.version == "2", SWITCH_SECONDS)
        assert switched is not None, traffic.statuses()
        time.sleep(1.0)
    check_switch(traffic.answers, "1", "2", expected[0], expected[1])
    assert metric(server, "sales_model_reloads_total") == 1
    text = metrics(server)
    assert f'sales_served_model_info{{source="{shared_dir}",version="2"}} 1.0' in text
    assert 'version="1"' not in text
    v2 = httpx.get(f"{server}/v2/models/{MODEL_NAME}", timeout=30).json()
    assert v2["versions"] == ["2"] and [o["name"] for o in v2["outputs"]] == ["predictions", "p10", "p90"]


def publish_broken(shared_dir: Path) -> None:
    """A bundle folder whose metadata is not JSON, switched in as ``current`` the way publish switches it."""
    folder = shared_dir / model_dir.BUNDLES / "v9-broken"
    folder.mkdir()
    (folder / META_FILE).write_text("{not json")
    (folder / model_dir.INFO_FILE).write_text('{"version": "9"}')
    link = shared_dir / ".current-broken"
    link.symlink_to(Path(model_dir.BUNDLES) / folder.name)
    link.replace(shared_dir / model_dir.CURRENT)


def test_a_broken_bundle_keeps_the_old_model_and_is_counted(
        server: str, settings: Settings, shared_dir: Path, forecasters: list[Forecaster],
        expected: list[np.ndarray]) -> None:
    failures = metric(server, "sales_model_reload_failures_total")
    with Traffic(server, PREDICT, QUANTILES_REQUEST, clients=1, max_seconds=120) as traffic:
        publish_broken(shared_dir)
        deadline = time.monotonic() + SWITCH_SECONDS
        while metric(server, "sales_model_reload_failures_total") < failures + 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert metric(server, "sales_model_reload_failures_total") >= failures + 2  # each check retries it
        model_dir.publish(forecasters[2], shared_dir, {"registered_model": "sales-forecast", "version": "3"})
        assert traffic.wait_for(lambda a: a.version == "3", SWITCH_SECONDS) is not None
        time.sleep(0.5)
    check_switch(traffic.answers, "2", "3", expected[1], expected[2])
    log = model_server.log_file(settings.stack_dir, "test-serving-reload").read_text()
    assert re.search(r"model sales-model: still serving version 2; the check for a new model at \S+ failed: ", log)
    assert "now serving version 3" in log


# ---------------------------------------------------------------- the MLflow alias


@pytest.fixture(scope="module")
def registered(mlflow_uri: str, forecasters: list[Forecaster], settings: Settings,
               tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two registered versions of a test-only model, each run with the Forecaster bundle as training logs it."""
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("serving-reload-tests")
    versions = []
    example = example_rows(labelled_rows(settings))
    for index, forecaster in enumerate(forecasters[:2]):
        bundle = tmp_path_factory.mktemp(f"registered-{index}")
        forecaster.save(bundle)
        with mlflow.start_run():
            mlflow.log_artifacts(str(bundle), artifact_path=FORECASTER_ARTIFACT)
            info = log_network(forecaster, example, TEST_MODEL)
        versions.append(str(info.registered_model_version))
    MlflowClient(mlflow_uri).set_registered_model_alias(TEST_MODEL, "champion", versions[0])
    return versions


def test_a_new_alias_target_is_served_without_a_failed_request(
        settings: Settings, mlflow_uri: str, registered: list[str], expected: list[np.ndarray]) -> None:
    name = "test-serving-reload-mlflow"
    url = model_server.start(settings, free_port(), name=name, extra_env=RELOAD_ENV,
                             extra_args=["--model-uri", f"models:/{TEST_MODEL}@champion"])
    try:
        old, new = registered
        with Traffic(url, PREDICT, QUANTILES_REQUEST, clients=2, max_seconds=120) as traffic:
            assert traffic.wait_for(lambda a: a.version == old, 30)
            time.sleep(1.0)
            MlflowClient(mlflow_uri).set_registered_model_alias(TEST_MODEL, "champion", new)
            assert traffic.wait_for(lambda a, new=new: a.version == new, SWITCH_SECONDS) is not None
            time.sleep(1.0)
        check_switch(traffic.answers, old, new, expected[0], expected[1])
        assert f'sales_served_model_info{{source="models:/{TEST_MODEL}@champion",version="{new}"}} 1.0' in metrics(url)
    finally:
        model_server.stop(settings.stack_dir, name)


# ---------------------------------------------------------------- realized accuracy


@pytest.fixture
def accuracy_table(settings: Settings) -> Iterator[psycopg.Connection]:
    """The table as step 4 (operations/monitoring.py) creates it, dropped afterwards."""
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{ACCURACY_TABLE}"')
        yield conn
        conn.execute(f'DROP TABLE IF EXISTS "{ACCURACY_TABLE}"')


def create_accuracy_table(conn: psycopg.Connection) -> None:
    conn.execute(f'''CREATE TABLE "{ACCURACY_TABLE}" (
        week date NOT NULL, as_of date NOT NULL, scope text NOT NULL, dept bigint, model_version text NOT NULL,
        rows bigint NOT NULL, wmae double precision NOT NULL, wape double precision NOT NULL,
        naive_wmae double precision NOT NULL, naive_wape double precision NOT NULL,
        coverage double precision, scored_at timestamptz NOT NULL)''')


def add_rows(conn: psycopg.Connection, week: dt.date, version: str, wmae: float, coverage: float | None,
             scored_at: dt.datetime) -> None:
    rows = [(week, week - dt.timedelta(days=7), "overall", None, version, 156, wmae, 0.1, wmae * 1.1, 0.11, coverage,
             scored_at),
            (week, week - dt.timedelta(days=7), "dept", 3, version, 12, wmae * 3, 0.3, wmae * 2, 0.2, coverage,
             scored_at)]
    with conn.cursor() as cur:
        cur.executemany(f'INSERT INTO "{ACCURACY_TABLE}" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)',
                        rows)


def gauges(url: str) -> dict[str, float]:
    """The sales_forecast_* samples: {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics(url).splitlines()
            if line.startswith("sales_forecast_")}


def wait_for_gauges(url: str, predicate, seconds: float = SWITCH_SECONDS) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        current = gauges(url)
        if predicate(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.25)


def test_realized_accuracy_gauges_follow_the_table(server: str, accuracy_table: psycopg.Connection) -> None:
    time.sleep(2.5)  # two refreshes without the table: no gauges, no failure
    assert gauges(server) == {}
    create_accuracy_table(accuracy_table)
    time.sleep(2.5)  # an empty table: still none
    assert gauges(server) == {}

    now = dt.datetime.now(dt.UTC)
    week = dt.date(2026, 11, 20)
    add_rows(accuracy_table, week - dt.timedelta(days=7), "1", 900.0, 0.7, now)  # an older week
    add_rows(accuracy_table, week, "2", 1200.0, None, now - dt.timedelta(hours=1))  # re-scored below
    add_rows(accuracy_table, week, "2", 1000.0, 0.8, now)
    stamp = dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp()
    want = {'sales_forecast_realized_wmae{model_version="2"}': 1000.0,
            'sales_forecast_realized_wape{model_version="2"}': 0.1,
            'sales_forecast_naive_wmae{model_version="2"}': 1100.0,
            'sales_forecast_naive_wape{model_version="2"}': 0.11,
            'sales_forecast_interval_coverage{model_version="2"}': 0.8,
            'sales_forecast_scored_rows{model_version="2"}': 156.0,
            'sales_forecast_scored_week_timestamp_seconds{model_version="2"}': stamp}
    current = wait_for_gauges(server, lambda g: g.keys() == want.keys())
    assert current.keys() == want.keys()
    for key, value in want.items():
        assert current[key] == pytest.approx(value)

    # the next week, scored for version 3 without an interval: version 2's label sets go, no coverage gauge
    add_rows(accuracy_table, week + dt.timedelta(days=7), "3", 800.0, None, now)
    current = wait_for_gauges(server, lambda g: any('"3"' in key for key in g))
    assert sorted(current) == sorted(key.replace('"2"', '"3"') for key in want
                                     if "coverage" not in key)
    assert current['sales_forecast_realized_wmae{model_version="3"}'] == 800.0


def test_a_scrape_sees_one_refresh_of_the_accuracy_gauges_never_a_mix() -> None:
    """While refreshes switch the latest week between two model versions, every scrape of the registry (what
    GET /metrics sends) holds exactly one version's complete label sets."""
    import threading

    from prometheus_client import REGISTRY, generate_latest

    from sales_forecast.serving.accuracy import AccuracyRow
    from sales_forecast.serving.metrics import ACCURACY

    weeks = [AccuracyRow(dt.date(2026, 11, 20), version, 156, 1000.0, 0.1, 1100.0, 0.11, coverage)
             for version, coverage in (("2", 0.8), ("3", None))]
    stop = threading.Event()

    def refresh() -> None:
        while not stop.is_set():
            for week in weeks:
                ACCURACY.publish([week])

    refresher = threading.Thread(target=refresh)
    refresher.start()
    try:
        seen = []
        for _ in range(300):
            samples = [line for line in generate_latest(REGISTRY).decode().splitlines()
                       if line.startswith("sales_forecast_")]
            versions = {re.search(r'model_version="(\w+)"', line).group(1) for line in samples}
            assert len(versions) == 1 and len(samples) == (7 if versions == {"2"} else 6), samples
            seen.append(versions.pop())
    finally:
        stop.set()
        refresher.join()
        ACCURACY.publish([])
    assert {"2", "3"} <= set(seen)
