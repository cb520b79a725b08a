"""Incremental step 1 against a real PostgreSQL and Ray: one more week extends the same history, repeats change
nothing, and only a current week reaches the online store (the ttl is measured against the wall clock)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pandas as pd
import psycopg
import pytest
from conftest import database_settings

from sales_forecast.config import REPO_ROOT
from sales_forecast.contract import FEATURE_TABLE, RAW_TABLE
from sales_forecast.errors import PipelineError
from sales_forecast.features import store as fs_ops
from sales_forecast.features.append import append_week, read_dataset
from sales_forecast.features.derive import build_features
from sales_forecast.features.generator import Shape, generate, latest_friday
from sales_forecast.features.pipeline import run_feature_pipeline

WEEK = dt.timedelta(days=7)
LATEST = latest_friday(dt.datetime.now(dt.UTC).date())
SHAPE = Shape(stores=4, depts=5, weeks=20, seed=13, end_date=LATEST - 3 * WEEK)


def table(settings, name: str, order: str) -> pd.DataFrame:
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{name}" ORDER BY {order}')
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


@pytest.fixture(scope="module")
def history(stack_settings):
    """A full load ending three weeks before the latest Friday: offline only (older than the ttl)."""
    settings = database_settings(stack_settings, "append_week")
    result = run_feature_pipeline(SHAPE, settings, online=False)
    assert result.online_entities == 0
    return settings


def test_appended_weeks_are_the_full_loads_weeks(history) -> None:
    first = append_week(history)
    assert (first.week, first.rows, first.materialized) == (SHAPE.end_date + WEEK, 20, False)
    assert "older than the feature ttl" in first.timer.notes["append to the offline store"]
    longer = Shape(SHAPE.stores, SHAPE.depts, SHAPE.weeks + 1, SHAPE.seed, first.week)
    raw = generate(longer)
    stored = table(history, RAW_TABLE, "store, dept, date")
    pd.testing.assert_frame_equal(stored.astype(raw.dtypes.to_dict()), raw, check_exact=True)
    expected = build_features(raw)
    expected = expected[expected["event_timestamp"] == pd.Timestamp(first.week, tz="UTC")].reset_index(drop=True)
    features = table(history, FEATURE_TABLE, "store, dept, event_timestamp")
    got = features[features["event_timestamp"] == pd.Timestamp(first.week, tz="UTC")].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.astype(expected.dtypes.to_dict()), expected, check_exact=True)


def both_tables(settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (table(settings, RAW_TABLE, "store, dept, date"),
            table(settings, FEATURE_TABLE, "store, dept, event_timestamp"))


def test_a_repeated_append_changes_nothing(history) -> None:
    before = both_tables(history)
    last = read_dataset(history).last_week
    again = append_week(history, last)
    assert again.week == last
    after = both_tables(history)
    for old, new in zip(before, after, strict=True):
        pd.testing.assert_frame_equal(old, new, check_exact=True)


def test_weeks_out_of_order_are_refused(history) -> None:
    last = read_dataset(history).last_week
    with pytest.raises(PipelineError, match="can append only the week after"):
        append_week(history, last + 2 * WEEK)
    with pytest.raises(PipelineError, match="can append only the week after"):
        append_week(history, last - WEEK)


def test_the_current_week_reaches_the_online_store(history) -> None:
    while (result := append_week(history)).week < LATEST:
        assert not result.materialized
    assert result.materialized  # verify_online checked every series' values inside
    stats = fs_ops.online_stats(history)
    assert stats.entities == 20 and stats.newest == dt.datetime.combine(LATEST, dt.time(), dt.UTC)
    with psycopg.connect(history.postgres.libpq_url()) as conn:
        weeks = conn.execute(f'SELECT count(DISTINCT date) FROM "{RAW_TABLE}"').fetchone()[0]
    assert weeks == SHAPE.weeks + 3


def test_cli_append_repeats_the_current_week_and_an_empty_database_is_refused(history, stack_settings) -> None:
    env = {"PATH": "/usr/bin:/bin", **history.environment()}
    done = subprocess.run([sys.executable, "01_feast_features.py", "--append-week"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"appended the week ending {LATEST}: 20 series, offline and online stores" in done.stdout
    empty = database_settings(stack_settings, "append_nothing")
    done = subprocess.run([sys.executable, "01_feast_features.py", "--append-week"], cwd=REPO_ROOT,
                          env={"PATH": "/usr/bin:/bin", **empty.environment()}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "run 01_feast_features.py (a full load) first" in done.stderr
