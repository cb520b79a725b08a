"""Baselines from a forecasting library (statsforecast), one week ahead from every origin the model is scored at.

``sf_ses``: simple exponential smoothing, refitted at every origin. ``sf_stl_ets``: MSTL with a 52-week season and
an AutoETS trend (R's stlf), when every series has two years of history before the first origin; fitted once on
the weeks up to the first origin and rolled forward with each new actual (statsforecast's ``refit=False``),
because refitting it costs about 15 ms per series and origin.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd

from sales_forecast.training.dataset import TIMESTAMP

SEASON = 52
WEEK = pd.Timedelta(days=7)


def _models(history_weeks: int) -> list:
    from statsforecast.models import MSTL, AutoETS, SimpleExponentialSmoothingOptimized

    models = [SimpleExponentialSmoothingOptimized(alias="sf_ses")]
    if history_weeks >= 2 * SEASON:
        models.append(MSTL(season_length=SEASON, trend_forecaster=AutoETS(model="ZZN"), alias="sf_stl_ets"))
    return models


def statsforecast_baselines(history: pd.DataFrame, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """{baseline: forecast of each of ``rows``} (rows: store, dept, event_timestamp t; the forecast is of week t+1
    from the sales of weeks <= t); ``history`` holds store, dept, date, weekly_sales. The origins must be
    consecutive weeks, as a holdout's are."""
    os.environ.setdefault("NIXTLA_ID_AS_COL", "1")
    from statsforecast import StatsForecast

    stamps = pd.to_datetime(rows[TIMESTAMP]).dt.tz_localize(None)
    first, last = stamps.min(), stamps.max()
    dates = pd.to_datetime(history["date"])
    data = history.loc[dates <= last + WEEK, ["store", "dept", "weekly_sales"]].assign(ds=dates)
    keys = pd.MultiIndex.from_frame(data[["store", "dept"]])
    codes, uniques = pd.factorize(keys)
    frame = pd.DataFrame({"unique_id": codes, "ds": data["ds"].to_numpy(), "y": data["weekly_sales"].to_numpy(
        dtype="float64")}).sort_values(["unique_id", "ds"], kind="stable")
    history_weeks = int(frame[frame["ds"] <= first].groupby("unique_id").size().min())
    windows = int((last - first) / WEEK) + 1
    wanted = pd.MultiIndex.from_arrays([uniques.get_indexer(pd.MultiIndex.from_frame(rows[["store", "dept"]])),
                                        stamps.to_numpy()])
    out: dict[str, np.ndarray] = {}
    for model in _models(history_weeks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cv = StatsForecast(models=[model], freq="7D", n_jobs=1).cross_validation(
                df=frame, h=1, n_windows=windows, step_size=1, refit=not hasattr(model, "forward"))
        forecast = pd.Series(cv[model.alias].to_numpy(dtype="float64"),
                             index=pd.MultiIndex.from_arrays([cv["unique_id"].to_numpy(), cv["cutoff"].to_numpy()]))
        out[model.alias] = forecast.reindex(wanted).to_numpy()
    return out
