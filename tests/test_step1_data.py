"""The synthetic data and its features: a world that moves forward (counter-based draws: any window or shape of
the same seed agrees on what they share), determinism, Walmart-likeness, and no leakage."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pandas as pd
import pytest

from sales_forecast.features import generator as g
from sales_forecast.features.derive import (
    FEATURE_COLUMNS,
    MODEL_FEATURES,
    DeptMedians,
    build_features,
    pooled_values,
)
from sales_forecast.features.generator import (
    RAW_COLUMNS,
    Shape,
    generate,
    generate_stores,
    holiday_of_week,
    iter_store_blocks,
    latest_friday,
)

SHAPE = Shape(stores=6, depts=9, weeks=70, seed=3, end_date=dt.date(2026, 11, 27))


END = dt.date(2026, 11, 27)
WEEK = dt.timedelta(days=7)


def _by_key(raw: pd.DataFrame) -> pd.DataFrame:
    return raw.set_index(["store", "dept", "date"]).sort_index()


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


# ------------------------------------------------------------------------------------------- invariance
def test_two_windows_agree_exactly_on_their_overlap() -> None:
    a = _by_key(generate(Shape(7, 9, 70, seed=3, end_date=END)))
    b = _by_key(generate(Shape(7, 9, 40, seed=3, end_date=END + 25 * WEEK)))  # overlaps a's last 15 weeks
    overlap = a.index.intersection(b.index)
    assert len(overlap) == 7 * 9 * 15
    pd.testing.assert_frame_equal(a.loc[overlap], b.loc[overlap], check_exact=True)


def test_one_more_week_extends_the_same_history() -> None:
    now = generate(Shape(5, 6, 52, seed=11, end_date=END))
    later = generate(Shape(5, 6, 53, seed=11, end_date=END + WEEK))
    later_old_weeks = later[later["date"] <= pd.Timestamp(END)].reset_index(drop=True)
    pd.testing.assert_frame_equal(now, later_old_weeks, check_exact=True)


def test_a_window_far_in_the_past_is_a_prefix_of_the_long_history() -> None:
    long = _by_key(generate(Shape(3, 4, 400, seed=5, end_date=END)))
    old = _by_key(generate(Shape(3, 4, 10, seed=5, end_date=END - 300 * WEEK)))
    pd.testing.assert_frame_equal(long.loc[old.index], old, check_exact=True)


def test_a_larger_shape_contains_the_smaller_shapes_series_unchanged() -> None:
    small = _by_key(generate(Shape(6, 8, 30, seed=9, end_date=END)))
    large = _by_key(generate(Shape(25, 81, 30, seed=9, end_date=END)))
    pd.testing.assert_frame_equal(large.loc[small.index], small, check_exact=True)


def test_store_blocks_are_slices_of_the_whole() -> None:
    shape = Shape(23, 11, 20, seed=4, end_date=END)
    whole = generate(shape)
    part = generate_stores(shape, 8, 15)
    expected = whole[whole["store"].between(8, 15)].reset_index(drop=True)
    pd.testing.assert_frame_equal(part, expected, check_exact=True)
    streamed = pd.concat(list(iter_store_blocks(shape, stores_per_block=5)), ignore_index=True)
    pd.testing.assert_frame_equal(streamed, whole, check_exact=True)


def test_internal_blocks_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = Shape(9, 7, 15, seed=2, end_date=END)
    whole = generate(shape)
    monkeypatch.setattr(g, "BLOCK_CELLS", 1)  # one store per block
    pd.testing.assert_frame_equal(generate(shape), whole, check_exact=True)


def test_same_seed_same_data_other_seed_other_data() -> None:
    shape = Shape(6, 9, 70, seed=3, end_date=END)
    raw = generate(shape)
    pd.testing.assert_frame_equal(raw, generate(shape), check_exact=True)
    other = generate(Shape(6, 9, 70, seed=4, end_date=END))
    for column in ("weekly_sales", "temperature", "fuel_price", "cpi", "unemployment"):
        assert not np.allclose(raw[column], other[column]), column
    assert abs(np.corrcoef(np.log(np.clip(raw["weekly_sales"], 1, None)),
                           np.log(np.clip(other["weekly_sales"], 1, None)))[0, 1]) < 0.5


def test_absolute_week_key() -> None:
    assert g.absolute_weeks(pd.DatetimeIndex(["1970-01-02", "1970-01-09", "2026-11-27"])).tolist() == \
        [0, 1, (dt.date(2026, 11, 27) - dt.date(1970, 1, 2)).days // 7]


# ------------------------------------------------------------------------------------- Walmart-like structure
@pytest.fixture(scope="module")
def walmart() -> pd.DataFrame:
    return generate(Shape(stores=45, depts=81, weeks=143, seed=1, end_date=END))


def _matrix(raw: pd.DataFrame, column: str = "weekly_sales") -> np.ndarray:
    weeks = raw["date"].nunique()
    return raw[column].to_numpy().reshape(-1, weeks)


def test_last_week_predicts_this_week(walmart: pd.DataFrame) -> None:
    sales = _matrix(walmart)
    pooled = np.corrcoef(sales[:, 1:].ravel(), sales[:, :-1].ravel())[0, 1]
    assert 0.95 <= pooled <= 0.99
    year = np.corrcoef(sales[:, 52:].ravel(), sales[:, :-52].ravel())[0, 1]
    assert 0.95 <= year <= 0.99
    # Within one series the weekly noise is AR(1) (phi 0.75) plus white noise and seasonality: ~0.6.
    centred = sales - sales.mean(axis=1, keepdims=True)
    within = (centred[:, 1:] * centred[:, :-1]).sum(1) / np.sqrt(
        (centred[:, 1:] ** 2).sum(1) * (centred[:, :-1] ** 2).sum(1))
    assert 0.45 < np.median(within) < 0.8


def test_ar_noise_is_the_stationary_ar1() -> None:
    parts = g.sales_parts(3, np.arange(1, 41), np.arange(1, 41), g.week_dates(END, 200))
    ar = parts.ar
    assert ar.std() == pytest.approx(g.AR_SHOCK_SD / np.sqrt(1 - g.PHI ** 2), rel=0.03)
    assert np.corrcoef(ar[:, :, 1:].ravel(), ar[:, :, :-1].ravel())[0, 1] == pytest.approx(g.PHI, abs=0.02)
    assert np.abs(parts.drift).max() < 0.5 and np.abs(np.diff(parts.drift, axis=2)).max() < 0.02


def test_holiday_share_and_uplifts(walmart: pd.DataFrame) -> None:
    flags = walmart["is_holiday"].to_numpy()
    assert flags.mean() == pytest.approx(0.07, abs=0.01)
    sales = walmart.pivot_table(index=["store", "dept"], columns="date", values="weekly_sales")
    median = sales.median(axis=1)
    thanksgiving = pd.Timestamp("2026-11-27")
    ratio = (sales[thanksgiving] / median).groupby("dept").median()
    assert ratio.max() > 1.4 and ratio.min() < 1.2  # lifts some departments a lot, leaves others alone
    assert 0.15 < (ratio > 1.3).mean() < 0.6
    # Uplifts are the same every year: last year's Thanksgiving ratio predicts this year's.
    last_year = (sales[pd.Timestamp("2025-11-28")] / median).groupby("dept").median()
    assert np.corrcoef(ratio, last_year)[0, 1] > 0.9
    # The pre-Christmas weeks are not flagged but lift the gift departments.
    pre = [d for d in sales.columns if d.month == 12 and 11 <= d.day <= 24]
    assert not walmart.loc[walmart["date"].isin(pre), "is_holiday"].any()
    assert (sales[pre].mean(axis=1) / median).groupby("dept").median().max() > 1.25


def test_heavy_tailed_levels_and_a_few_returns(walmart: pd.DataFrame) -> None:
    levels = _matrix(walmart).mean(axis=1)
    assert levels.max() / np.median(levels) > 10
    assert 1.0 < np.std(np.log(levels)) < 1.7
    negative = (walmart["weekly_sales"] < 0).mean()
    assert 0.001 < negative < 0.006


def test_exogenous_columns_are_smooth_and_carry_nothing(walmart: pd.DataFrame) -> None:
    sales = _matrix(walmart)
    log_change = np.diff(np.log(np.clip(sales, 1, None)), axis=1).ravel()
    for column in ("temperature", "fuel_price", "cpi", "unemployment"):
        values = _matrix(walmart, column)
        assert abs(np.corrcoef(sales.ravel(), values.ravel())[0, 1]) < 0.1, column
        assert abs(np.corrcoef(log_change, np.diff(values, axis=1).ravel())[0, 1]) < 0.05, column
        steps = np.median(np.abs(np.diff(values, axis=1)))
        assert steps < walmart[column].std(), f"{column} should be smooth"
    assert walmart["fuel_price"].min() >= 1.5 and walmart["unemployment"].between(2, 20).all()


def test_latest_friday_and_holiday_calendar() -> None:
    assert latest_friday(dt.date(2026, 11, 28)) == dt.date(2026, 11, 27)
    assert latest_friday(dt.date(2026, 11, 27)) == dt.date(2026, 11, 27)
    # Walmart's flagged weeks of 2010, each ending on a Friday.
    assert holiday_of_week(dt.date(2010, 2, 12)) == "super_bowl"
    assert holiday_of_week(dt.date(2010, 9, 10)) == "labor_day"
    assert holiday_of_week(dt.date(2010, 11, 26)) == "thanksgiving"
    assert holiday_of_week(dt.date(2010, 12, 31)) == "christmas"
    assert holiday_of_week(dt.date(2010, 12, 24)) is None


def _features_from_history(history: pd.DataFrame, row: pd.Series) -> dict[str, float]:
    """Independent computation of one feature row's own-series features from the raw weeks up to and including its
    week, by date: NaN (never 0) where the history is too short."""
    dated = history.set_index("date")["weekly_sales"]
    week = pd.Timedelta(days=7)

    def sales(weeks_back: int) -> float:
        return float(dated.get(row["date"] - weeks_back * week, np.nan))

    def mean(weeks: int, first: int = 0) -> float:
        values = [sales(k) for k in range(first, first + weeks)]
        return float(np.mean(values)) if np.isfinite(values).all() else np.nan

    last4 = np.array([sales(k) for k in range(4)])
    return {**{f"sales_lag_{k}": sales(k - 1) for k in range(1, 5)}, "sales_mean_4": mean(4),
            "sales_std_4": np.std(last4, ddof=1) if np.isfinite(last4).all() else np.nan,
            **{f"sales_mean_{n}": mean(n) for n in (8, 13, 26)},
            "sales_ya_next": sales(51), "sales_ya_this": sales(52), "sales_ya_next2": sales(50),
            "sales_ya_mean_4": mean(4, first=52)}


def test_features_use_only_the_past(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    assert list(features.columns) == FEATURE_COLUMNS
    assert len(features) == len(raw)
    merged = raw.assign(**features[MODEL_FEATURES].to_dict("series"))
    for (store, dept), history in list(merged.groupby(["store", "dept"]))[:6]:
        for _, row in history.iloc[[0, 2, 3, 10, 40, 50, 51, 52, 55, 56, -1]].iterrows():
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
    changed.loc[future & (changed["store"] == 2), "weekly_sales"] *= -4.0  # other stores of each department too
    before = build_features(raw)
    after = build_features(changed)
    known = before["event_timestamp"] <= pd.Timestamp(cutoff, tz="UTC")
    pd.testing.assert_frame_equal(before[known], after[known])


def test_target_calendar_is_the_next_week(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    next_week = (features["event_timestamp"] + pd.Timedelta(days=7)).dt.tz_localize(None)
    holiday = next_week.map(lambda day: holiday_of_week(day.date()))
    for name in ("super_bowl", "labor_day", "thanksgiving", "christmas"):
        assert (features[f"target_is_{name}"].astype(bool) == (holiday == name)).all(), name
    assert sum(features[f"target_is_{name}"].sum() for name in ("thanksgiving", "christmas")) > 0
    thanksgiving = features.loc[features["target_is_thanksgiving"] == 1, "target_weeks_to_thanksgiving"]
    assert (thanksgiving == 0).all() and features["target_weeks_to_thanksgiving"].abs().max() == 1.0
    week_before = next_week == next_week[features["target_is_thanksgiving"] == 1].iloc[0] - pd.Timedelta(days=7)
    assert (features.loc[week_before, "target_weeks_to_thanksgiving"] == -1 / 8).all()


def test_year_ago_features_are_null_without_a_year_of_history(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    weeks = features.groupby(["store", "dept"]).cumcount()
    assert features.loc[weeks < 51, "sales_ya_next"].isna().all()
    assert features.loc[weeks >= 51, "sales_ya_next"].notna().all()
    assert features.loc[weeks < 55, ["sales_ya_mean_4", "dept_ya_step"]].isna().all(axis=None)
    assert features.loc[weeks < 3, ["sales_lag_4", "dept_rel_lag_1"]].isna().all(axis=None)
    assert not (features[["sales_ya_next", "sales_ya_this", "sales_ya_mean_4"]] == 0).any(axis=None)


def test_department_features_are_the_medians_over_its_stores_that_week(raw: pd.DataFrame) -> None:
    features = build_features(raw)
    level = np.maximum(features["sales_mean_4"].abs(), 10.0)
    own = (features["sales_lag_1"] / level - 1).clip(-3, 10)
    groups = list(features.groupby(["dept", "event_timestamp"]))
    assert len(groups) > 500
    for key, group in groups[::37]:
        expected = own[group.index].median()
        pooled = group["dept_rel_lag_1"]
        assert pooled.eq(expected).all() or (np.isnan(expected) and pooled.isna().all()), key


def test_a_derivation_by_store_ranges_equals_the_whole_one(raw: pd.DataFrame) -> None:
    """The department medians of every store, from a first pass over store ranges, make each range's features
    exactly the whole derivation's rows; rows of a department or week the medians do not cover are refused."""
    ranges = [(1, 2), (3, 3), (4, 6)]
    pooled = [pooled_values(generate_stores(SHAPE, first, last)) for first, last in ranges]
    medians = DeptMedians.of_ranges(pooled, SHAPE.dept_ids(), SHAPE.dates())
    by_range = pd.concat([build_features(generate_stores(SHAPE, first, last), medians) for first, last in ranges],
                         ignore_index=True)
    whole = build_features(raw)
    assert whole["dept_ya_step"].notna().any() and whole["dept_ya_step"].isna().any()
    pd.testing.assert_frame_equal(by_range, whole, check_exact=True)
    other = generate_stores(dataclasses.replace(SHAPE, depts=SHAPE.depts + 1), 1, 1)
    with pytest.raises(ValueError, match="outside the departments or weeks"):
        build_features(other, medians)
    with pytest.raises(ValueError, match="outside the departments or weeks"):
        build_features(generate_stores(dataclasses.replace(SHAPE, end_date=END + WEEK), 1, 1), medians)


def test_the_level_and_its_spread_are_pandas_row_statistics_to_the_bit(raw: pd.DataFrame) -> None:
    """sales_mean_4 and sales_std_4 are computed without a frame, as pandas computes a frame's row mean and std
    (skipna=False), bit for bit, also on rows with gaps and out of order: the figures trained on stay the same."""
    gappy = raw.drop(index=raw.index[::5]).sample(frac=1.0, random_state=2)
    for frame in (raw, gappy):
        features = build_features(frame)
        window = pd.DataFrame({f"sales_lag_{k}": features[f"sales_lag_{k}"].to_numpy() for k in range(1, 5)})
        assert window.isna().any(axis=None) and window.notna().all(axis=1).any()
        for name, expected in (("sales_mean_4", window.mean(axis=1, skipna=False)),
                               ("sales_std_4", window.std(axis=1, skipna=False))):
            assert np.array_equal(features[name].to_numpy().view(np.int64), expected.to_numpy().view(np.int64)), name


def test_feature_rows_are_keyed_by_store_dept_and_time(raw: pd.DataFrame) -> None:
    """The Feast entities are store and dept (two join keys); no combined key column is left."""
    features = build_features(raw)
    assert "store_dept" not in features.columns
    assert features[["store", "dept"]].dtypes.eq("int64").all()
    assert not features.duplicated(["store", "dept", "event_timestamp"]).any()
    assert len(features[["store", "dept"]].drop_duplicates()) == SHAPE.stores * SHAPE.depts
