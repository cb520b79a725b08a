"""Monitoring: when a week's actuals arrive, score the forecasts made for it (overall and per department, against
last week's sales as the naive forecast), measure how far the week's features drifted from the champion's
training window (PSI), and keep both in PostgreSQL tables that the model server turns into Prometheus gauges.

Tables (contract.ACCURACY_TABLE, contract.DRIFT_TABLE), one set of rows per week, replaced when re-scored:
- forecast_accuracy: week, as_of, scope ('overall' | 'dept'), dept, model_version, rows, wmae, wape, naive_wmae,
  naive_wape, coverage (share of actuals inside P10-P90; NULL without an interval), scored_at;
- feature_drift: week, feature, psi, reference_start, reference_end.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg
from matplotlib.figure import Figure

from sales_forecast.config import Settings
from sales_forecast.contract import ACCURACY_TABLE, DRIFT_TABLE, FEATURE_TABLE
from sales_forecast.features.derive import CALENDAR_FEATURES, MODEL_FEATURES
from sales_forecast.features.load import replace_week
from sales_forecast.operations.forecasts import read_forecasts
from sales_forecast.training.metrics import wape, wmae

WEEK = dt.timedelta(days=7)
PSI_BINS = 10
PSI_FLOOR = 1e-4  # share given to an empty bin, so the log stays finite


@dataclass(frozen=True)
class WeekAccuracy:
    week: dt.date
    rows: int
    wmae: float
    wape: float
    naive_wmae: float
    naive_wape: float
    coverage: float | None
    model_version: str

    @property
    def ratio(self) -> float:
        """WMAE relative to the naive forecast's: above 1 means worse than last week's sales."""
        return self.wmae / self.naive_wmae if self.naive_wmae else float("inf")


def _scores(part: pd.DataFrame) -> dict[str, float]:
    actual, holiday = part["actual"].to_numpy("float64"), part["is_holiday"].to_numpy(bool)
    forecast, naive = part["p50"].to_numpy("float64"), part["naive"].to_numpy("float64")
    has_interval = part["p10"].notna().all() and part["p90"].notna().all()
    inside = (part["p10"].to_numpy("float64") <= actual) & (actual <= part["p90"].to_numpy("float64"))
    return {"rows": len(part), "wmae": wmae(actual, forecast, holiday), "wape": wape(actual, forecast),
            "naive_wmae": wmae(actual, naive, holiday), "naive_wape": wape(actual, naive),
            "coverage": float(inside.mean()) if has_interval else None}


def score_week(settings: Settings, week: dt.date) -> WeekAccuracy | None:
    """Score the forecasts made for ``week`` against its actuals; None when no forecasts were made for it."""
    scored = read_forecasts(settings, week).dropna(subset=["actual", "naive"])
    if scored.empty:
        return None
    versions = sorted(scored["model_version"].unique())
    rows = [{"scope": "overall", "dept": None, **_scores(scored)}]
    rows += [{"scope": "dept", "dept": int(dept), **_scores(part)} for dept, part in scored.groupby("dept")]
    frame = pd.DataFrame(rows).assign(week=week, as_of=week - WEEK, model_version=",".join(versions),
                                      scored_at=pd.Timestamp.now(tz="UTC"))
    frame["dept"] = frame["dept"].astype("Int64")
    _ensure_tables(settings)
    replace_week(settings.postgres, {ACCURACY_TABLE: (frame, "week")})
    overall = rows[0]
    return WeekAccuracy(week, overall["rows"], overall["wmae"], overall["wape"], overall["naive_wmae"],
                        overall["naive_wape"], overall["coverage"], ",".join(versions))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``reference``, on the reference's quantile bins."""
    reference, current = reference[np.isfinite(reference)], current[np.isfinite(current)]
    if reference.size == 0 or current.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    p = np.clip(expected / expected.sum(), PSI_FLOOR, None)
    q = np.clip(actual / actual.sum(), PSI_FLOOR, None)
    return float(np.sum((q - p) * np.log(q / p)))


def _feature_rows(settings: Settings, start: dt.date, end: dt.date) -> pd.DataFrame:
    columns = ", ".join(f'"{name}"' for name in MODEL_FEATURES)
    query = (f'SELECT {columns} FROM "{FEATURE_TABLE}" WHERE event_timestamp >= %s AND event_timestamp <= %s')
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(query, (pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")))
        return pd.DataFrame(cur.fetchall(), columns=list(MODEL_FEATURES)).astype("float64")


# Calendar features are the same for every row of a week, so one week against a training window always "drifts"
# (PSI 8-10 measured): they say which week it is, not how the data changed.
DRIFT_FEATURES = [name for name in MODEL_FEATURES if name not in CALENDAR_FEATURES]


def feature_drift(settings: Settings, week: dt.date, reference: tuple[dt.date, dt.date]) -> pd.Series:
    """PSI of every model feature that describes the data (DRIFT_FEATURES): the week's rows against the rows of
    ``reference`` (the champion's training window); stored in the drift table and returned by feature."""
    base, new = _feature_rows(settings, *reference), _feature_rows(settings, week, week)
    values = pd.Series({name: psi(base[name].to_numpy(), new[name].to_numpy()) for name in DRIFT_FEATURES})
    frame = pd.DataFrame({"week": week, "feature": values.index, "psi": values.to_numpy(),
                          "reference_start": reference[0], "reference_end": reference[1]})
    _ensure_tables(settings)
    replace_week(settings.postgres, {DRIFT_TABLE: (frame, "week")})
    return values


def accuracy_history(settings: Settings) -> pd.DataFrame:
    """Every scored week's overall row, oldest first."""
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        try:
            cur.execute(f'SELECT week, model_version, wmae, naive_wmae, wape, coverage FROM "{ACCURACY_TABLE}" '
                        "WHERE scope = 'overall' ORDER BY week")
        except psycopg.errors.UndefinedTable:
            return pd.DataFrame(columns=["week", "model_version", "wmae", "naive_wmae", "wape", "coverage"])
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


def accuracy_figure(history: pd.DataFrame) -> Figure:
    """Realized WMAE per week, the served model against the naive forecast, with the champion changes marked."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    axis = figure.subplots()
    weeks = pd.to_datetime(history["week"])
    axis.plot(weeks, history["wmae"], marker="o", label="served model")
    axis.plot(weeks, history["naive_wmae"], marker="s", linestyle="--", label="naive (last week's sales)")
    changes = history["model_version"].ne(history["model_version"].shift())
    for week, version in zip(weeks[changes], history["model_version"][changes], strict=True):
        axis.axvline(week, color="grey", linewidth=0.8, linestyle=":")
        axis.annotate(f"v{version}", (week, axis.get_ylim()[1]), fontsize=8, va="top", ha="left")
    axis.set_ylabel("WMAE of the week's forecasts")
    axis.set_title("Realized accuracy per week (dotted: the champion changed)")
    axis.legend(fontsize=8)
    return figure


def _ensure_tables(settings: Settings) -> None:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute(f'''CREATE TABLE IF NOT EXISTS "{ACCURACY_TABLE}" (
            week date NOT NULL, as_of date NOT NULL, scope text NOT NULL, dept bigint, model_version text NOT NULL,
            rows bigint NOT NULL, wmae double precision NOT NULL, wape double precision NOT NULL,
            naive_wmae double precision NOT NULL, naive_wape double precision NOT NULL,
            coverage double precision, scored_at timestamptz NOT NULL)''')
        conn.execute(f'''CREATE TABLE IF NOT EXISTS "{DRIFT_TABLE}" (
            week date NOT NULL, feature text NOT NULL, psi double precision, reference_start date NOT NULL,
            reference_end date NOT NULL)''')
