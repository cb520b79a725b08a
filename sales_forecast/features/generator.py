"""Walmart-like synthetic weekly sales.

Shaped after the Kaggle "Store Sales Forecasting" data (see README): log-normal series levels by store size
and department, yearly seasonality, holiday spikes in some departments only, autocorrelated noise (last week
predicts this week well), a few returns (negative sales), and exogenous columns (temperature, fuel price, CPI,
unemployment) as smooth per-store walks that barely move sales.

Weeks end on Fridays, as in the real data; a week is flagged ``is_holiday`` when one of the four holidays
falls in the seven days ending on that Friday.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

RAW_COLUMNS = ["store", "dept", "date", "weekly_sales", "is_holiday",
               "temperature", "fuel_price", "cpi", "unemployment"]


@dataclass(frozen=True)
class Shape:
    stores: int = 143
    depts: int = 81
    weeks: int = 52
    seed: int = 42
    end_date: dt.date | None = None  # a Friday; None = the most recent Friday

    @property
    def rows(self) -> int:
        return self.stores * self.depts * self.weeks

    def resolved_end_date(self) -> dt.date:
        return self.end_date or latest_friday(dt.datetime.now(dt.UTC).date())


def latest_friday(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=(day.weekday() - 4) % 7)


def week_dates(end_date: dt.date, weeks: int) -> pd.DatetimeIndex:
    return pd.date_range(end=pd.Timestamp(end_date), periods=weeks, freq="7D")


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    first = dt.date(year, month, 1)
    return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))


def holidays(year: int) -> dict[str, dt.date]:
    return {
        # The first Sunday of February until the NFL's 17-game seasons (2022), the second since.
        "super_bowl": _nth_weekday(year, 2, 6, 2 if year >= 2022 else 1),
        "labor_day": _nth_weekday(year, 9, 0, 1),  # first Monday of September
        "thanksgiving": _nth_weekday(year, 11, 3, 4),  # fourth Thursday of November
        "christmas": dt.date(year, 12, 25),
    }


def holiday_of_week(week_end: dt.date) -> str | None:
    """The holiday that falls in the seven days ending on ``week_end``, if any."""
    start = week_end - dt.timedelta(days=6)
    for year in {start.year, week_end.year}:
        for name, day in holidays(year).items():
            if start <= day <= week_end:
                return name
    return None


def is_holiday_week(dates: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    index = pd.DatetimeIndex(dates)
    flagged = [day for day in index.unique() if holiday_of_week(day.date()) is not None]
    return np.asarray(index.isin(flagged), dtype=bool)


def _smooth_walk(rng: np.random.Generator, n: int, weeks: int, step: float, start: np.ndarray) -> np.ndarray:
    return start[:, None] + np.cumsum(rng.normal(0.0, step, (n, weeks)), axis=1)


def _holiday_multipliers(rng: np.random.Generator, depts: int, dates: pd.DatetimeIndex) -> np.ndarray:
    """(depts, weeks) multiplicative uplift: each holiday lifts only some departments."""
    uplift = np.ones((depts, len(dates)))
    names = [holiday_of_week(d.date()) for d in dates]
    before_christmas = np.array([d.month == 12 and 11 <= d.day <= 24 for d in dates])
    effects = {  # holiday: (share of departments affected, uplift range)
        "super_bowl": (0.15, (0.10, 0.30)),
        "labor_day": (0.15, (0.05, 0.20)),
        "thanksgiving": (0.35, (0.50, 1.00)),
        "christmas": (0.25, (0.10, 0.30)),
    }
    for name, (share, (low, high)) in effects.items():
        affected = rng.random(depts) < share
        size = np.where(affected, rng.uniform(low, high, depts), 0.0)
        week_mask = np.array([n == name for n in names])
        uplift[:, week_mask] *= 1.0 + size[:, None]
    # The Christmas shopping weeks (not flagged, as in the real data) peak in the gift departments.
    gifts = rng.random(depts) < 0.3
    uplift[:, before_christmas] *= 1.0 + np.where(gifts, rng.uniform(0.3, 0.8, depts), 0.0)[:, None]
    return uplift


def generate(shape: Shape) -> pd.DataFrame:
    """Raw weekly sales, one row per (store, dept, week), sorted by store, dept, date."""
    rng = np.random.default_rng(shape.seed)
    n_stores, n_depts, n_weeks = shape.stores, shape.depts, shape.weeks
    dates = week_dates(shape.resolved_end_date(), n_weeks)
    week_of_year = dates.isocalendar().week.to_numpy(dtype=float)

    store_size = rng.lognormal(np.log(130_000), 0.45, n_stores)  # square feet
    dept_share = rng.lognormal(0.0, 1.2, n_depts)
    level = (0.06 * store_size[:, None] * dept_share[None, :]
             * rng.lognormal(0.0, 0.35, (n_stores, n_depts)))  # (stores, depts)

    season_amp = rng.uniform(0.0, 0.2, n_depts)
    season_phase = rng.uniform(0, 2 * np.pi, n_depts)
    season = 1.0 + season_amp[:, None] * np.sin(2 * np.pi * week_of_year[None, :] / 52.18 + season_phase[:, None])
    holiday_uplift = _holiday_multipliers(rng, n_depts, dates)

    n_series = n_stores * n_depts
    ar = np.empty((n_series, n_weeks))  # AR(1) log-noise: persistence makes last week a strong predictor
    ar[:, 0] = rng.normal(0.0, 0.1, n_series)
    shocks = rng.normal(0.0, 0.07, (n_series, n_weeks))
    for week in range(1, n_weeks):
        ar[:, week] = 0.75 * ar[:, week - 1] + shocks[:, week]
    drift = np.cumsum(rng.normal(0.0, 0.01, (n_series, n_weeks)), axis=1)
    noise = np.exp(ar + drift + rng.normal(0.0, 0.04, (n_series, n_weeks)))

    expected = (level[:, :, None] * season[None, :, :] * holiday_uplift[None, :, :]).reshape(n_series, n_weeks)
    sales = expected * noise
    returns = rng.random((n_series, n_weeks)) < 0.003  # occasional net returns, mostly in small series
    sales = np.where(returns, -rng.uniform(0.0, 0.3, (n_series, n_weeks)) * np.minimum(sales, 2_000.0), sales)

    temperature = (rng.uniform(45, 75, n_stores)[:, None]
                   - rng.uniform(10, 25, n_stores)[:, None] * np.cos(2 * np.pi * (week_of_year[None, :] - 3) / 52.18)
                   + _smooth_walk(rng, n_stores, n_weeks, 1.5, np.zeros(n_stores)))
    fuel_price = np.clip(_smooth_walk(rng, n_stores, n_weeks, 0.03, rng.uniform(2.6, 3.2, n_stores))
                         + np.cumsum(rng.normal(0.0, 0.02, n_weeks))[None, :], 1.5, None)
    cpi = rng.uniform(126, 225, n_stores)[:, None] * (1 + 0.0005 * np.arange(n_weeks))[None, :] \
        + _smooth_walk(rng, n_stores, n_weeks, 0.05, np.zeros(n_stores))
    unemployment = np.clip(_smooth_walk(rng, n_stores, n_weeks, 0.05, rng.uniform(4.0, 12.0, n_stores)), 2.0, 20.0)

    store_idx = np.repeat(np.arange(n_stores), n_depts * n_weeks)
    return pd.DataFrame({
        "store": (store_idx + 1).astype("int64"),
        "dept": np.tile(np.repeat(np.arange(1, n_depts + 1), n_weeks), n_stores).astype("int64"),
        "date": np.tile(dates.values, n_series),
        "weekly_sales": np.round(sales.ravel(), 2),
        "is_holiday": np.tile(is_holiday_week(dates), n_series),
        "temperature": np.round(temperature[store_idx, np.tile(np.arange(n_weeks), n_series)], 2),
        "fuel_price": np.round(fuel_price[store_idx, np.tile(np.arange(n_weeks), n_series)], 3),
        "cpi": np.round(cpi[store_idx, np.tile(np.arange(n_weeks), n_series)], 3),
        "unemployment": np.round(unemployment[store_idx, np.tile(np.arange(n_weeks), n_series)], 3),
    })
