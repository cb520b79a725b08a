"""The synthetic data and its features: shape, determinism, Walmart-likeness, and no leakage."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from sales_forecast.features.derive import FEATURE_COLUMNS, MODEL_FEATURES, build_features
from sales_forecast.features.generator import RAW_COLUMNS, Shape, generate, holiday_of_week, latest_friday

SHAPE = Shape(stores=6, depts=9, weeks=70, seed=3, end_date=dt.date(2026, 11, 27))


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return generate(SHAPE)


def test_shape_columns_and_dtypes(raw: pd.DataFrame) -> None:
    assert list(raw.columns) == RAW_COLUMNS
    assert len(raw) == SHAPE.rows == 6 * 9 * 70
    assert raw.groupby(["store", "dept"]).size().eq(70).all()
    assert raw["store"].dtype == "int64" and raw["dept"].dtype == "int64"
    assert raw["is_holiday"].dtype == bool
    assert pd.api.types.is_datetime64_any_dtype(raw["date"])
    assert raw["date"].max() == pd.Timestamp("2026-11-27") and (raw["date"].dt.weekday == 4).all()
    assert not raw.isna().any().any()


def test_default_shape_is_the_designs() -> None:
    assert Shape().rows == 602_316


def test_same_seed_same_data_other_seed_other_data(raw: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(raw, generate(SHAPE))
    other = generate(Shape(6, 9, 70, seed=4, end_date=SHAPE.end_date))
    assert not np.allclose(raw["weekly_sales"], other["weekly_sales"])


def test_latest_friday_and_holiday_calendar() -> None:
    assert latest_friday(dt.date(2026, 11, 28)) == dt.date(2026, 11, 27)
    assert latest_friday(dt.date(2026, 11, 27)) == dt.date(2026, 11, 27)
    # Walmart's flagged weeks of 2010, each ending on a Friday.
    assert holiday_of_week(dt.date(2010, 2, 12)) == "super_bowl"
    assert holiday_of_week(dt.date(2010, 9, 10)) == "labor_day"
    assert holiday_of_week(dt.date(2010, 11, 26)) == "thanksgiving"
    assert holiday_of_week(dt.date(2010, 12, 31)) == "christmas"
    assert holiday_of_week(dt.date(2010, 12, 24)) is None


def test_walmart_like_structure() -> None:
    raw = generate(Shape(stores=20, depts=30, weeks=60, seed=1, end_date=dt.date(2026, 11, 27)))
    sales = raw.pivot_table(index=["store", "dept"], columns="date", values="weekly_sales")
    levels = sales.mean(axis=1)
    assert levels.max() / levels.median() > 10, "series levels should be heavy-tailed (log-normal)"
    assert (raw["weekly_sales"] < 0).any(), "a few returns make negative weekly sales"
    assert (raw["weekly_sales"] < 0).mean() < 0.01
    lag1 = raw.groupby(["store", "dept"])["weekly_sales"].shift(1)
    assert raw["weekly_sales"].corr(lag1) > 0.9, "last week predicts this week well"
    # Thanksgiving lifts some departments a lot and leaves others alone.
    thanksgiving = pd.Timestamp("2026-11-27")
    ratio = (sales[thanksgiving] / sales.drop(columns=thanksgiving).median(axis=1)).groupby("dept").median()
    assert ratio.max() > 1.4 and ratio.min() < 1.2
    for column in ("temperature", "fuel_price", "cpi", "unemployment"):
        assert abs(raw[column].corr(raw["weekly_sales"])) < 0.2, f"{column} should barely move sales"
        steps = raw.groupby("store")[column].diff().abs().median()
        assert steps < raw[column].std(), f"{column} should be a smooth walk"


def _features_from_history(history: pd.DataFrame, row: pd.Series) -> dict[str, float]:
    """Independent computation of one feature row from the raw weeks up to and including its week."""
    past = history[history["date"] <= row["date"]].sort_values("date")["weekly_sales"].to_numpy()
    lags = {f"sales_lag_{k}": past[-k] if len(past) >= k else np.nan for k in range(1, 5)}
    last4 = past[-4:] if len(past) >= 4 else np.full(4, np.nan)
    return {**lags, "sales_mean_4": last4.mean(), "sales_std_4": np.std(last4, ddof=1)}


def test_features_use_only_the_past(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    assert list(features.columns) == FEATURE_COLUMNS
    assert len(features) == len(raw)
    merged = raw.assign(**features[MODEL_FEATURES].to_dict("series"))
    for (store, dept), history in list(merged.groupby(["store", "dept"]))[:6]:
        for _, row in history.iloc[[0, 2, 3, 10, 40, -1]].iterrows():
            expected = _features_from_history(history, row)
            for name, value in expected.items():
                assert row[name] == pytest.approx(value, nan_ok=True), (store, dept, row["date"], name)
    assert features.loc[features["sales_lag_4"].isna(), "event_timestamp"].dt.tz is not None


def test_changing_the_future_changes_no_feature(raw: pd.DataFrame) -> None:
    cutoff = raw["date"].sort_values().unique()[40]
    future = raw["date"] > cutoff
    changed = raw.copy()
    changed.loc[future, "weekly_sales"] *= 3.0
    changed.loc[future, ["temperature", "fuel_price", "cpi", "unemployment"]] += 50.0
    before = build_features(raw)
    after = build_features(changed)
    known = before["event_timestamp"] <= pd.Timestamp(cutoff, tz="UTC")
    pd.testing.assert_frame_equal(before[known], after[known])


def test_target_calendar_is_the_next_week(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    next_week = (features["event_timestamp"] + pd.Timedelta(days=7)).dt.tz_localize(None)
    expected = next_week.map(lambda day: holiday_of_week(day.date()) is not None)
    assert (features["target_is_holiday"].astype(bool) == expected).all()
    assert features["target_is_holiday"].sum() > 0


def test_feature_rows_are_keyed_by_store_dept_and_time(raw: pd.DataFrame) -> None:
    """The Feast entities are store and dept (two join keys); no combined key column is left."""
    features = build_features(raw)
    assert "store_dept" not in features.columns
    assert features[["store", "dept"]].dtypes.eq("int64").all()
    assert not features.duplicated(["store", "dept", "event_timestamp"]).any()
    assert len(features[["store", "dept"]].drop_duplicates()) == SHAPE.stores * SHAPE.depts
