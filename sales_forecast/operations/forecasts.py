"""Batch forecasts: every series' next week, as of a week that ended, through the same Forecaster as serving.

The feature rows come from Feast's point-in-time join (the Ray offline store) at the as-of week, i.e. the values
the online store holds for that week when it is current (step 1 checks that they are equal), so for the current
week a batch forecast is exactly what the model server answers for that series; past weeks, which the online
store cannot serve (the ttl), are forecast the same way. Rows go to the table ``sales_forecasts`` with the model
version and the as-of week; a re-run for the same week replaces its rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg

from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_TABLE, FORECASTS_TABLE
from sales_forecast.errors import PipelineError
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import REQUIRED_FEATURES
from sales_forecast.features.load import replace_week
from sales_forecast.model_dir import Bundle
from sales_forecast.training.dataset import TIMESTAMP, historical_features

QUANTILE_COLUMNS = {0.1: "p10", 0.5: "p50", 0.9: "p90"}
WEEK = dt.timedelta(days=7)


def ensure_table(settings: Settings) -> None:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute(f'''CREATE TABLE IF NOT EXISTS "{FORECASTS_TABLE}" (
            as_of date NOT NULL, week date NOT NULL, store bigint NOT NULL, dept bigint NOT NULL,
            p10 double precision, p50 double precision NOT NULL, p90 double precision,
            registered_model text NOT NULL, model_version text NOT NULL, created_at timestamptz NOT NULL,
            PRIMARY KEY (as_of, store, dept))''')


def entity_sql(as_of: dt.date) -> str:
    """Every series with a feature row stamped ``as_of`` (its prediction time)."""
    stamp = pd.Timestamp(as_of, tz="UTC").isoformat()
    return (f'SELECT DISTINCT store, dept, TIMESTAMPTZ \'{stamp}\' AS {TIMESTAMP} FROM "{FEATURE_TABLE}" '
            f"WHERE {TIMESTAMP} = TIMESTAMPTZ '{stamp}'")


@dataclass(frozen=True)
class BatchResult:
    as_of: dt.date
    forecasts: pd.DataFrame  # store, dept, p10/p50/p90 (NaN where the model has no such quantile)
    skipped: int  # series without complete features at that week (too little history): no forecast, never a guess


def forecast_frame(bundle: Bundle, rows: pd.DataFrame, as_of: dt.date) -> pd.DataFrame:
    quantiles = bundle.forecaster.predict_quantiles(rows)
    frame = pd.DataFrame({"as_of": as_of, "week": as_of + WEEK, "store": rows["store"].astype("int64"),
                          "dept": rows["dept"].astype("int64")})
    for level, column in QUANTILE_COLUMNS.items():
        index = bundle.forecaster.quantiles.index(level) if level in bundle.forecaster.quantiles else None
        frame[column] = quantiles[:, index] if index is not None else np.nan
    frame["registered_model"] = bundle.info.get("registered_model", "")
    frame["model_version"] = bundle.info.get("version", bundle.folder.name)
    frame["created_at"] = pd.Timestamp.now(tz="UTC")
    return frame


def batch_forecast(settings: Settings, bundle: Bundle, as_of: dt.date) -> BatchResult:
    """Forecast the week after ``as_of`` for every series and store the rows (settings: resolved services)."""
    store = fs_ops.open_store(settings)
    rows = historical_features(store, entity_sql(as_of))
    if rows.empty:
        raise PipelineError(f"no feature rows stamped {as_of} in {FEATURE_TABLE!r}: load that week first")
    complete = rows[rows[REQUIRED_FEATURES].notna().all(axis=1)].sort_values(["store", "dept"]).reset_index(drop=True)
    forecasts = forecast_frame(bundle, complete, as_of)
    ensure_table(settings)
    replace_week(settings.postgres, {FORECASTS_TABLE: (forecasts, "as_of")})
    return BatchResult(as_of, forecasts, skipped=len(rows) - len(complete))


def made_as_of(settings: Settings, as_of: dt.date) -> bool:
    """Whether forecasts were stored as of ``as_of`` (a cycle that failed after appending the week has none)."""
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        try:
            return conn.execute(f'SELECT EXISTS (SELECT 1 FROM "{FORECASTS_TABLE}" WHERE as_of = %s)',
                                (as_of,)).fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return False


def read_forecasts(settings: Settings, week: dt.date) -> pd.DataFrame:
    """The forecasts made for ``week`` (as of the week before), with the actual and the naive forecast."""
    from sales_forecast.contract import RAW_TABLE

    query = f'''
        SELECT f.store, f.dept, f.p10, f.p50, f.p90, f.model_version, a.weekly_sales AS actual,
               a.is_holiday, n.weekly_sales AS naive
        FROM "{FORECASTS_TABLE}" f
        JOIN "{RAW_TABLE}" a ON a.store = f.store AND a.dept = f.dept AND a.date = f.week
        LEFT JOIN "{RAW_TABLE}" n ON n.store = f.store AND n.dept = f.dept AND n.date = f.as_of
        WHERE f.week = %s ORDER BY f.store, f.dept'''
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        try:
            cur.execute(query, (week,))
        except psycopg.errors.UndefinedTable:
            return pd.DataFrame(columns=["store", "dept", "p10", "p50", "p90", "model_version", "actual",
                                         "is_holiday", "naive"])
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
