"""Leakage-free model features, derived from the raw weekly sales.

What a feature row means: the row of series (store, dept) stamped ``event_timestamp = t`` (the Friday that ends
week t) holds what is known when week t has ended: sales up to and including week t (of this series and of the
other stores' same department), week t's exogenous values, and the calendar of the coming week t+1 (a calendar
is known in advance). It never uses week t+1's sales or anything later.

The label of that row is the sales of the coming week t+1. Training asks Feast for the features "as of" the
prediction time t (the point-in-time join picks the row stamped t), with the label read from week t+1;
serving reads the latest online row, stamped with the last week that ended, and predicts the week after it.
Lags are named relative to the predicted week: ``sales_lag_1`` is the week just ended; the year-ago features
``sales_ya_*`` are the weeks 52 weeks before the predicted week and its neighbours.

A feature whose history is missing (a series' first weeks, year-ago sales in the first year) is NULL, never
zero. Rows without the four lags are not used; the other NULLs are the model's business (missing indicators).
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sales_forecast.features.generator import HOLIDAY_EFFECTS, holiday_of_week, holidays, is_pre_christmas_week

SALES_LAGS = 4
YEAR = 52
LONG_MEANS = (8, 13, 26)
POOLED_MEAN = 13  # dept_rel_mean_13 relates sales_mean_13 to the level
LOOKBACK_WEEKS = YEAR + SALES_LAGS - 1  # weeks before t whose sales a row stamped t reads (sales_ya_mean_4: t-55)
LEVEL_FLOOR = 10.0  # sales units; keeps relative quantities finite for tiny or negative levels
RELATIVE_RANGE = (-3.0, 10.0)  # ratios to a tiny level (or of a return) are clipped to this
HOLIDAYS = tuple(HOLIDAY_EFFECTS)  # super_bowl, labor_day, thanksgiving, christmas
DISTANCE_WEEKS = 8.0  # weeks_to_* saturates beyond this many weeks, and is scaled by it

LAG_FEATURES = [f"sales_lag_{k}" for k in range(1, SALES_LAGS + 1)]
CALENDAR_FEATURES = [
    *(f"target_is_{name}" for name in HOLIDAYS),  # which holiday the predicted week holds (Walmart's flag)
    "target_is_pre_christmas",  # the two unflagged shopping weeks before Christmas
    "target_weeks_to_thanksgiving",  # signed, from the nearest one, clipped to +-8 weeks and scaled to +-1
    "target_weeks_to_christmas",
    "target_week_sin",
    "target_week_cos",
    "lag_1_is_holiday",
    "year_ago_same_holiday",  # the predicted week and the week 364 days earlier hold the same holiday (or none)
]
EXOGENOUS_FEATURES = ["temperature", "fuel_price", "cpi", "unemployment"]
REQUIRED_FEATURES = [*LAG_FEATURES, "sales_mean_4", "sales_std_4", *CALENDAR_FEATURES, *EXOGENOUS_FEATURES]
YEAR_AGO_FEATURES = [
    "sales_ya_next",  # week t+1-52: the predicted week, a year earlier
    "sales_ya_this",  # week t-52
    "sales_ya_next2",  # week t+2-52
    "sales_ya_mean_4",  # weeks t-55..t-52: the level a year earlier
]
DEPT_FEATURES = [  # medians over the department's stores in week t, of relative (unit-free) quantities
    "dept_rel_lag_1",  # sales_lag_1 / level - 1
    "dept_rel_mean_13",  # sales_mean_13 / level - 1
    "dept_trend_4",  # level / level 4 weeks earlier - 1
    "dept_ya_step",  # last year's move from its level to the predicted week: sales_ya_next / sales_ya_mean_4 - 1
]
OPTIONAL_FEATURES = [*(f"sales_mean_{n}" for n in LONG_MEANS), *YEAR_AGO_FEATURES, *DEPT_FEATURES]
MODEL_FEATURES: list[str] = [*REQUIRED_FEATURES, *OPTIONAL_FEATURES]
FEATURE_COLUMNS = ["store", "dept", "event_timestamp", *MODEL_FEATURES]  # (store, dept) are the Feast entities


def safe_level(values: np.ndarray) -> np.ndarray:
    """A scale that is never tiny: |values| floored at LEVEL_FLOOR (NaN stays NaN)."""
    return np.maximum(np.abs(values), LEVEL_FLOOR)


def relative(values: np.ndarray, level: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.clip(values / level - 1.0, *RELATIVE_RANGE)


def _holiday_friday(day: dt.date) -> dt.date:
    """The Friday that ends the week holding ``day``."""
    return day + dt.timedelta(days=(4 - day.weekday()) % 7)


def _weeks_to(week_end: dt.date, holiday: str) -> float:
    distances = [(week_end - _holiday_friday(holidays(year)[holiday])).days / 7
                 for year in (week_end.year - 1, week_end.year, week_end.year + 1)]
    nearest = min(distances, key=abs)
    return float(np.clip(nearest, -DISTANCE_WEEKS, DISTANCE_WEEKS) / DISTANCE_WEEKS)


def target_calendar(week_ends: pd.DatetimeIndex) -> pd.DataFrame:
    """The calendar features of the rows stamped ``week_ends`` (they describe the week after), one row each."""
    targets = [(day + pd.Timedelta(days=7)).date() for day in week_ends]
    names = [holiday_of_week(day) for day in targets]
    year_ago = [holiday_of_week(day - dt.timedelta(days=364)) for day in targets]
    angle = 2 * np.pi * np.array([day.isocalendar().week for day in targets], dtype="float64") / 52.18
    return pd.DataFrame({
        **{f"target_is_{h}": np.array([name == h for name in names], dtype="float64") for h in HOLIDAYS},
        "target_is_pre_christmas": is_pre_christmas_week(pd.DatetimeIndex(targets)).astype("float64"),
        "target_weeks_to_thanksgiving": [_weeks_to(day, "thanksgiving") for day in targets],
        "target_weeks_to_christmas": [_weeks_to(day, "christmas") for day in targets],
        "target_week_sin": np.sin(angle),
        "target_week_cos": np.cos(angle),
        "year_ago_same_holiday": np.array([a == b for a, b in zip(names, year_ago, strict=True)], dtype="float64"),
    }, index=week_ends)


class _Series:
    """Positional lags within each series of a frame sorted by series, then week (each series contiguous)."""

    def __init__(self, sorted_raw: pd.DataFrame):
        store, dept = sorted_raw["store"].to_numpy(), sorted_raw["dept"].to_numpy()
        count = len(store)
        starts = np.flatnonzero(np.r_[count > 0, (store[1:] != store[:-1]) | (dept[1:] != dept[:-1])])
        self.position = np.arange(count) - np.repeat(starts, np.diff(np.r_[starts, count]))  # rows since the start

    def lag(self, values: np.ndarray, k: int) -> np.ndarray:
        """Row i gets the value k weeks before it in its series (NaN where the series is shorter)."""
        count = len(values)
        out = np.empty(count)
        out[:k] = np.nan
        if k < count:
            out[k:] = values[:count - k]
            out[self.position < k] = np.nan
        return out

    def mean(self, values: np.ndarray, weeks: int, first_lag: int = 0) -> np.ndarray:
        """Mean of lags first_lag .. first_lag + weeks - 1, NULL unless all exist. Summed lag by lag, so a row's
        value does not depend on how much history came before (append.py derives one week from a lookback). The
        lags are added in place, shifted slices of ``values``: a row i < k adds a value of another series, which is
        never used, since its position (at most i) is below the last lag and it ends NULL (a NaN whose sign bit may
        differ from the frame-by-frame sum's, which nothing reads)."""
        total, count, last = self.lag(values, first_lag), len(values), first_lag + weeks - 1
        with np.errstate(over="ignore", invalid="ignore"):  # the rows that end NULL may overflow: no warning
            for k in range(first_lag + 1, min(last, count - 1) + 1):
                total[k:] += values[:count - k]
        total[self.position < last] = np.nan
        total /= weeks
        return total


def _dept_medians(values: dict[str, np.ndarray], dept: pd.Series, stamps: pd.Series) -> dict[str, np.ndarray]:
    """Each row's values replaced by the medians over its department's rows of the same week (NULLs skipped); the
    groups are found once for all the columns."""
    medians = pd.DataFrame(values, copy=False).groupby([dept.to_numpy(), stamps.to_numpy()]).transform("median")
    return {name: medians[name].to_numpy() for name in values}


@dataclass(frozen=True)
class DeptMedians:
    """The DEPT_FEATURES of a data set derived store range by store range: each a (depts, weeks) table of medians
    over every store, from the ``pooled_values`` of all ranges."""
    depts: np.ndarray  # department ids, the tables' rows
    weeks: pd.DatetimeIndex  # week stamps, their columns
    values: dict[str, np.ndarray]

    @classmethod
    def of_ranges(cls, ranges: list[dict[str, np.ndarray]], depts: np.ndarray, weeks: pd.DatetimeIndex) -> DeptMedians:
        """``ranges``: each range's ``pooled_values`` of a full store x dept x week grid in (store, dept, week)
        order, as the generator makes it; the median over the stores axis equals ``_dept_medians``', bit for bit."""
        grid = (-1, len(depts), len(weeks))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NULL (dept, week): NULL, as pandas gives
            values = {name: np.nanmedian(np.concatenate([part[name].reshape(grid) for part in ranges]), axis=0)
                      for name in DEPT_FEATURES}
        return cls(np.asarray(depts), pd.DatetimeIndex(weeks), values)

    def of(self, dept: pd.Series, stamps: pd.Series) -> dict[str, np.ndarray]:
        """Each row's department medians of its week."""
        d, w = pd.Index(self.depts).get_indexer(dept), self.weeks.get_indexer(pd.DatetimeIndex(stamps))
        if (d < 0).any() or (w < 0).any():
            raise ValueError("rows outside the departments or weeks the medians were computed for")
        return {name: table[d, w] for name, table in self.values.items()}


def in_series_order(store: np.ndarray, dept: np.ndarray, stamps: np.ndarray) -> bool:
    """Whether the rows are in (store, dept, time) order already, as the generator makes them."""
    same_store, same_dept = store[1:] == store[:-1], dept[1:] == dept[:-1]
    return bool(np.all((store[1:] > store[:-1])
                       | (same_store & ((dept[1:] > dept[:-1]) | (same_dept & (stamps[1:] >= stamps[:-1]))))))


def _by_series(raw: pd.DataFrame) -> pd.DataFrame:
    if not in_series_order(*(raw[c].to_numpy() for c in ("store", "dept", "date"))):
        raw = raw.sort_values(["store", "dept", "date"], kind="stable")
    return raw.reset_index(drop=True)


def _window(series: _Series, sales: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The sales lags, as named features, and their mean (the series' level): NULL unless all four exist."""
    lags = {f"sales_lag_{k}": series.lag(sales, k - 1) for k in range(1, SALES_LAGS + 1)}
    return lags, _row_sum(list(lags.values())) / SALES_LAGS


def _row_sum(columns: list[np.ndarray]) -> np.ndarray:
    """Row by row, the columns added left to right (a NaN makes NaN): what pandas' ``mean`` and ``std`` of a frame's
    rows add, value for value."""
    total = np.zeros(len(columns[0]))  # pandas starts from +0.0: four -0.0 sum to +0.0
    for column in columns:
        total += column
    return total


def _row_std(columns: list[np.ndarray], mean: np.ndarray) -> np.ndarray:
    """Row by row, the sample standard deviation (ddof 1, a NaN makes NaN) around ``mean`` (the columns' ``_row_sum``
    over their count), computed as pandas' ``std(axis=1, skipna=False)`` computes it (squared deviations summed left
    to right), so the same bits, without a frame."""
    return np.sqrt(_row_sum([(mean - column) ** 2 for column in columns]) / (len(columns) - 1))


def _year_ago(series: _Series, sales: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "sales_ya_next": series.lag(sales, YEAR - 1),
        "sales_ya_this": series.lag(sales, YEAR),
        "sales_ya_next2": series.lag(sales, YEAR - 2),
        "sales_ya_mean_4": series.mean(sales, SALES_LAGS, first_lag=YEAR),
    }


def _pooled(series: _Series, sales: np.ndarray, mean_4: np.ndarray, mean_13: np.ndarray,
            year_ago: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row, the relative quantities whose department medians are the DEPT_FEATURES."""
    level = safe_level(mean_4)
    with np.errstate(invalid="ignore"):
        return {
            "dept_rel_lag_1": relative(sales, level),
            "dept_rel_mean_13": relative(mean_13, level),
            "dept_trend_4": relative(level, safe_level(series.lag(mean_4, SALES_LAGS))),
            "dept_ya_step": relative(year_ago["sales_ya_next"], safe_level(year_ago["sales_ya_mean_4"])),
        }


def pooled_values(raw: pd.DataFrame) -> dict[str, np.ndarray]:
    """``_pooled`` of every row of ``raw`` in (store, dept, week) order: the first pass of a derivation by store
    ranges (DeptMedians), without the features' other columns."""
    raw = _by_series(raw)
    series = _Series(raw)
    sales = raw["weekly_sales"].to_numpy(dtype="float64")
    _, mean_4 = _window(series, sales)
    return _pooled(series, sales, mean_4, series.mean(sales, POOLED_MEAN), _year_ago(series, sales))


def build_features(raw: pd.DataFrame, medians: DeptMedians | None = None) -> pd.DataFrame:
    """One feature row per raw row (sorted by store, dept, week); incomplete history gives NULLs, never zeros.
    The department medians are taken over ``raw``'s stores, or from ``medians`` (a store range's rows).

    The frame's columns stay separate arrays (not copied into one block per dtype), as the bulk load reads them:
    at 10x rows, copying 35 columns into blocks and back took a third of the derivation."""
    raw = _by_series(raw)
    series = _Series(raw)
    sales = raw["weekly_sales"].to_numpy(dtype="float64")
    lags, mean_4 = _window(series, sales)
    means = {f"sales_mean_{n}": series.mean(sales, n) for n in LONG_MEANS}
    year_ago = _year_ago(series, sales)
    stamps = pd.to_datetime(raw["date"])
    if medians is None:
        pooled = _pooled(series, sales, mean_4, means[f"sales_mean_{POOLED_MEAN}"], year_ago)
        dept = _dept_medians(pooled, raw["dept"], stamps)
    else:
        dept = medians.of(raw["dept"], stamps)
    week, weeks = pd.factorize(stamps)
    calendar = target_calendar(pd.DatetimeIndex(weeks))
    columns = {
        "store": raw["store"].to_numpy(dtype="int64", copy=True),
        "dept": raw["dept"].to_numpy(dtype="int64", copy=True),
        "event_timestamp": stamps.dt.tz_localize("UTC").array,
        **lags,
        "sales_mean_4": mean_4,
        "sales_std_4": _row_std(list(lags.values()), mean_4),
        **{name: np.append(values.to_numpy(), np.nan)[week] for name, values in calendar.items()},  # NaT: -1: NaN
        "lag_1_is_holiday": raw["is_holiday"].to_numpy(dtype="float64"),
        **{name: raw[name].to_numpy(copy=True) for name in EXOGENOUS_FEATURES},
        **means,
        **year_ago,
        **dept,
    }
    return pd.DataFrame({name: columns[name] for name in FEATURE_COLUMNS}, copy=False)
