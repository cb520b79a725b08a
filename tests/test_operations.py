"""Operating it week after week, against a real PostgreSQL, Ray, MLflow and model server: batch forecasts for every
series (bit-identical to the server's answers for the current week), scoring them when the actuals arrive, drift."""

from __future__ import annotations

import dataclasses
import datetime as dt

import httpx
import numpy as np
import pandas as pd
import psycopg
import pytest
from conftest import database_settings

from sales_forecast import model_dir
from sales_forecast.contract import ACCURACY_TABLE, DRIFT_TABLE, FEATURE_TABLE, FORECASTS_TABLE, RAW_TABLE
from sales_forecast.features.append import append_week
from sales_forecast.features.derive import CALENDAR_FEATURES, MODEL_FEATURES, REQUIRED_FEATURES
from sales_forecast.features.generator import Shape, latest_friday
from sales_forecast.features.pipeline import run_feature_pipeline
from sales_forecast.operations import monitoring
from sales_forecast.operations.cycle import RetrainPolicy
from sales_forecast.operations.forecasts import batch_forecast
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

WEEK = dt.timedelta(days=7)
LATEST = latest_friday(dt.datetime.now(dt.UTC).date())
SHAPE = Shape(stores=6, depts=7, weeks=30, seed=21, end_date=LATEST - 2 * WEEK)
SERIES = SHAPE.stores * SHAPE.depts


def query(settings, sql: str, params=()) -> pd.DataFrame:
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


@pytest.fixture(scope="module")
def world(stack_settings, tmp_path_factory):
    """History ending two weeks ago (offline only) and a champion bundle (version 7) in a model directory."""
    settings = database_settings(stack_settings, "operations")
    settings = dataclasses.replace(settings, model_dir=tmp_path_factory.mktemp("models"))
    run_feature_pipeline(SHAPE, settings, online=False)
    model_dir.publish(fit_quick_forecaster(labelled_rows(settings)), settings.model_dir,
                      {"registered_model": "m", "version": "7"})
    return settings


def test_batch_forecasts_cover_every_series_with_the_version(world) -> None:
    bundle = model_dir.load(world.model_dir)
    result = batch_forecast(world, bundle, SHAPE.end_date)
    assert (len(result.forecasts), result.skipped) == (SERIES, 0)
    stored = query(world, f'SELECT * FROM "{FORECASTS_TABLE}" WHERE as_of = %s ORDER BY store, dept',
                   (SHAPE.end_date,))
    assert len(stored) == SERIES and set(stored["model_version"]) == {"7"}
    assert set(stored["week"]) == {SHAPE.end_date + WEEK}
    rows = query(world, f'SELECT * FROM "{FEATURE_TABLE}" WHERE event_timestamp = %s ORDER BY store, dept',
                 (pd.Timestamp(SHAPE.end_date, tz="UTC"),))
    rows[MODEL_FEATURES] = rows[MODEL_FEATURES].astype("float64")
    np.testing.assert_array_equal(stored["p50"].to_numpy(), bundle.forecaster.predict(rows))
    assert stored["p10"].isna().all()  # this model has no interval: NULL, never a made-up one
    again = batch_forecast(world, bundle, SHAPE.end_date)  # a re-run replaces
    assert len(again.forecasts) == SERIES
    assert query(world, f'SELECT count(*) AS n FROM "{FORECASTS_TABLE}"')["n"][0] == SERIES


def test_a_weeks_actuals_score_the_forecasts_made_for_it(world) -> None:
    week = SHAPE.end_date + WEEK
    append_week(world, week)
    accuracy = monitoring.score_week(world, week)
    assert accuracy is not None and accuracy.rows == SERIES and accuracy.model_version == "7"
    truth = query(world, f'''SELECT f.dept, f.p50, a.weekly_sales AS actual, n.weekly_sales AS naive
        FROM "{FORECASTS_TABLE}" f JOIN "{RAW_TABLE}" a ON (a.store, a.dept, a.date) = (f.store, f.dept, f.week)
        JOIN "{RAW_TABLE}" n ON (n.store, n.dept, n.date) = (f.store, f.dept, f.as_of) WHERE f.week = %s''', (week,))
    assert accuracy.wmae == pytest.approx(np.mean(np.abs(truth["actual"] - truth["p50"])))
    assert accuracy.naive_wmae == pytest.approx(np.mean(np.abs(truth["actual"] - truth["naive"])))
    assert accuracy.wape == pytest.approx(np.abs(truth["actual"] - truth["p50"]).sum() / truth["actual"].abs().sum())
    table = query(world, f'SELECT * FROM "{ACCURACY_TABLE}" WHERE week = %s', (week,))
    assert sorted(table["scope"].unique()) == ["dept", "overall"] and len(table) == 1 + SHAPE.depts
    per_dept = table[table["scope"] == "dept"].set_index("dept")["wmae"].sort_index()
    expected = truth.assign(e=(truth["actual"] - truth["p50"]).abs()).groupby("dept")["e"].mean()
    np.testing.assert_allclose(per_dept.to_numpy(), expected.to_numpy())
    assert monitoring.score_week(world, week + 5 * WEEK) is None  # no forecasts for that week


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 20_000)
    assert monitoring.psi(base, rng.normal(0, 1, 5_000)) < 0.01
    assert monitoring.psi(base, rng.normal(1.5, 1, 5_000)) > 1.0
    assert np.isnan(monitoring.psi(base, np.array([np.nan])))


def test_drift_of_a_week_is_stored_per_feature(world) -> None:
    week = SHAPE.end_date + WEEK
    drift = monitoring.feature_drift(world, week, (SHAPE.end_date - 20 * WEEK, SHAPE.end_date))
    assert list(drift.index) == monitoring.DRIFT_FEATURES
    assert "sales_lag_1" in drift.index and not set(CALENDAR_FEATURES) & set(drift.index)
    loaded = monitoring.feature_drift(world, SHAPE.end_date, (SHAPE.end_date - 20 * WEEK, SHAPE.end_date - WEEK))
    assert loaded[[name for name in REQUIRED_FEATURES if name not in CALENDAR_FEATURES]].notna().all()
    stored = query(world, f'SELECT feature, psi FROM "{DRIFT_TABLE}" WHERE week = %s', (week,))
    assert len(stored) == len(monitoring.DRIFT_FEATURES)
    policy = RetrainPolicy("on-alert", max_wmae_ratio=1e9, max_psi=drift.max() / 2)
    assert policy.retrain(policy.alerts(None, drift))
    assert not RetrainPolicy("on-alert", 1e9, 1e9).retrain(RetrainPolicy("on-alert", 1e9, 1e9).alerts(None, drift))
    assert RetrainPolicy("weekly").retrain([]) and not RetrainPolicy("never").retrain(["x"])


def test_current_batch_forecasts_are_the_servers_answers(world) -> None:
    """For the current week, every series' batch forecast equals what the model server answers, bit for bit."""
    appended = append_week(world, LATEST)
    assert appended.materialized
    bundle = model_dir.load(world.model_dir)
    forecasts = batch_forecast(world, bundle, LATEST).forecasts
    url = model_server.start(world, free_port(), model_dir=world.model_dir, name="operations-server")
    try:
        body = {"instances": [{"store": int(s), "dept": int(d)}
                              for s, d in zip(forecasts["store"], forecasts["dept"], strict=True)]}
        answer = httpx.post(f"{url}/v1/models/sales-model:predict", json=body, timeout=30).json()
    finally:
        model_server.stop(world.stack_dir, "operations-server")
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype="float64"), forecasts["p50"].to_numpy())
