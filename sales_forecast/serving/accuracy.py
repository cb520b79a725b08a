"""Realized accuracy as Prometheus gauges: the latest scored week's ``overall`` rows of ``forecast_accuracy``.

The table (``contract.ACCURACY_TABLE``, in the feature store's database) holds, per scored week, rows with: week
(the week whose actuals were scored), as_of, scope ('overall' or 'dept'), dept (NULL for overall),
model_version, rows, wmae, wape, naive_wmae, naive_wape, coverage (NULL without an interval) and scored_at. The
server reads it in the background (never per request) and publishes, for the latest week, one label set per
model_version (its latest scoring): ``sales_forecast_realized_wmae``, ``_realized_wape``, ``_naive_wmae``,
``_naive_wape``, ``_interval_coverage`` (absent when coverage is NULL), ``_scored_rows`` and
``_scored_week_timestamp_seconds``. No table yet, or no overall row: no gauges, and no error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg
from psycopg import sql

from sales_forecast.config import Settings
from sales_forecast.contract import ACCURACY_TABLE
from sales_forecast.serving.metrics import ACCURACY

_LATEST = sql.SQL("""
    SELECT DISTINCT ON (model_version) week, model_version, rows, wmae, wape, naive_wmae, naive_wape, coverage
    FROM {table}
    WHERE scope = 'overall' AND week = (SELECT max(week) FROM {table} WHERE scope = 'overall')
    ORDER BY model_version, scored_at DESC
""").format(table=sql.Identifier(ACCURACY_TABLE))


@dataclass(frozen=True)
class AccuracyRow:
    week: dt.date
    model_version: str
    rows: int | None
    wmae: float | None
    wape: float | None
    naive_wmae: float | None
    naive_wape: float | None
    coverage: float | None

    @property
    def week_timestamp(self) -> float:
        return dt.datetime.combine(self.week, dt.time(), tzinfo=dt.UTC).timestamp()


def read_latest(conn: psycopg.Connection) -> list[AccuracyRow]:
    """The latest scored week's overall rows, one per model version; none when the table does not exist."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(ACCURACY_TABLE).as_string(conn),))
        if not cur.fetchone()[0]:
            return []
        cur.execute(_LATEST)
        return [AccuracyRow(row[0], str(row[1]), *(None if v is None else float(v) for v in row[2:]))
                for row in cur.fetchall()]


def refresh(settings: Settings) -> int:
    """Read the table and publish its latest week into the server's accuracy metrics (``metrics.ACCURACY``),
    replacing the previous refresh's rows; returns the number of model versions published. Raises psycopg.Error."""
    with psycopg.connect(settings.postgres.libpq_url(), connect_timeout=3, autocommit=True,
                         application_name="sales-model-server-accuracy") as conn:
        rows = read_latest(conn)
    ACCURACY.publish(rows)
    return len(rows)
