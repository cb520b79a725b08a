"""Leakage-free model features, derived from the raw weekly sales.

What a feature row means: the row of series (store, dept) stamped ``event_timestamp = t`` (the Friday that ends
week t) holds what is known when week t has ended: sales up to and including week t, week t's exogenous values,
and the holiday calendar of the coming week t+1 (a calendar is known in advance). It never uses week t+1's
sales or anything later.

The label of that row is the sales of the coming week t+1. Training asks Feast for the features "as of" the
prediction time t (the point-in-time join picks the row stamped t), with the label read from week t+1;
serving reads the latest online row, stamped with the last week that ended, and predicts the week after it.
Lags are named relative to the predicted week: ``sales_lag_1`` is the week just ended.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sales_forecast.features.generator import is_holiday_week

SALES_LAGS = 4
LOOKBACK_WEEKS = SALES_LAGS - 1  # weeks before t whose sales the feature row of week t reads
MODEL_FEATURES: list[str] = [
    "sales_lag_1",
    "sales_lag_2",
    "sales_lag_3",
    "sales_lag_4",
    "sales_mean_4",
    "sales_std_4",
    "lag_1_is_holiday",
    "target_is_holiday",
    "target_week_sin",
    "target_week_cos",
    "temperature",
    "fuel_price",
    "cpi",
    "unemployment",
]
FEATURE_COLUMNS = ["store", "dept", "event_timestamp", *MODEL_FEATURES]  # (store, dept) are the Feast entities


def build_features(raw: pd.DataFrame) -> pd.DataFrame:
    """One feature row per raw row (same order); incomplete history gives NULL lags, never zeros."""
    raw = raw.sort_values(["store", "dept", "date"], kind="stable").reset_index(drop=True)
    by_series = raw.groupby(["store", "dept"], sort=False)["weekly_sales"]
    lags = {f"sales_lag_{k}": by_series.shift(k - 1) for k in range(1, SALES_LAGS + 1)}
    window = pd.concat(lags.values(), axis=1)
    target_week = pd.to_datetime(raw["date"]) + pd.Timedelta(days=7)
    week_angle = 2 * np.pi * target_week.dt.isocalendar().week.astype(float) / 52.18

    features = pd.DataFrame({
        "store": raw["store"].astype("int64"),
        "dept": raw["dept"].astype("int64"),
        "event_timestamp": pd.to_datetime(raw["date"]).dt.tz_localize("UTC"),
        **lags,
        "sales_mean_4": window.mean(axis=1, skipna=False),
        "sales_std_4": window.std(axis=1, skipna=False),
        "lag_1_is_holiday": raw["is_holiday"].astype("float64"),
        "target_is_holiday": is_holiday_week(target_week).astype("float64"),
        "target_week_sin": np.sin(week_angle),
        "target_week_cos": np.cos(week_angle),
        "temperature": raw["temperature"],
        "fuel_price": raw["fuel_price"],
        "cpi": raw["cpi"],
        "unemployment": raw["unemployment"],
    })
    return features[FEATURE_COLUMNS]
