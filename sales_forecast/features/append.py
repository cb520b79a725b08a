"""Incremental step 1: the week that just ended arrives; only that week is added to the offline store, and the
online store moves to it.

The generator is counter-based, so the appended week is exactly the week a full load would have produced. Its
features need the last weeks of history (``derive.LOOKBACK_WEEKS``), which are read back from the offline store,
not regenerated. Both tables get the week in one transaction that first deletes it, so repeating an append
changes nothing.

Time and the ttl: Feast measures the feature view's ttl against the wall clock (online reads of older rows are
NULL, and the Ray engine drops them when materializing), so only a week that ended within the ttl of now is
materialized and checked online; an older week (the weekly cycle replaying past weeks) goes to the offline store
only, where the point-in-time join serves it, and the step says so. The ttl is never widened to make it fit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd
import psycopg

from sales_forecast import stack
from sales_forecast.config import Settings
from sales_forecast.contract import DATASET_TABLE, FEATURE_TABLE, RAW_TABLE
from sales_forecast.errors import PipelineError
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import LOOKBACK_WEEKS, build_features
from sales_forecast.features.generator import Shape, generate, latest_friday
from sales_forecast.features.load import replace_week
from sales_forecast.timing import PhaseTimer

WEEK = dt.timedelta(days=7)


@dataclass(frozen=True)
class Dataset:
    """What a full step-1 load generated (written next to the data, read by appends)."""

    seed: int
    stores: int
    depts: int
    first_week: dt.date
    last_week: dt.date  # the latest week in the offline store

    def shape_of_week(self, week: dt.date) -> Shape:
        return Shape(stores=self.stores, depts=self.depts, weeks=1, seed=self.seed, end_date=week)


def record_dataset(settings: Settings, shape: Shape) -> None:
    """Remember the generator's seed and shape for later appends (one row, replaced by every full load)."""
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{DATASET_TABLE}" (seed bigint NOT NULL, stores integer NOT NULL, '
                     'depts integer NOT NULL, first_week date NOT NULL)')
        conn.execute(f'DELETE FROM "{DATASET_TABLE}"')
        first = shape.resolved_end_date() - (shape.weeks - 1) * WEEK
        conn.execute(f'INSERT INTO "{DATASET_TABLE}" VALUES (%s, %s, %s, %s)',
                     (shape.seed, shape.stores, shape.depts, first))


def read_dataset(settings: Settings) -> Dataset:
    try:
        with psycopg.connect(settings.postgres.libpq_url()) as conn:
            row = conn.execute(f'SELECT seed, stores, depts, first_week FROM "{DATASET_TABLE}"').fetchone()
            last = conn.execute(f'SELECT max(date) FROM "{RAW_TABLE}"').fetchone()[0]
    except psycopg.errors.UndefinedTable as exc:
        raise PipelineError(f"no step-1 data in database {settings.postgres.database!r} to append to: run "
                            "01_feast_features.py (a full load) first") from exc
    if row is None or last is None:
        raise PipelineError(f"the offline store in {settings.postgres.database!r} holds no weeks: load it first")
    return Dataset(seed=row[0], stores=row[1], depts=row[2], first_week=row[3], last_week=last.date())


def week_to_append(dataset: Dataset, requested: dt.date | None, today: dt.date) -> dt.date:
    """The week after the latest loaded one (or, when that is already the latest Friday, the latest again: a
    repeat replaces it); ``requested`` must be one of those two."""
    latest = latest_friday(today)
    following = dataset.last_week + WEEK
    default = following if following <= latest else dataset.last_week
    if requested is None:
        return default
    if requested not in (dataset.last_week, following):
        raise PipelineError(f"can append only the week after the latest loaded one ({following}) or replace the "
                            f"latest ({dataset.last_week}), not {requested}")
    if requested > latest:
        raise PipelineError(f"the week ending {requested} has not ended yet (the latest Friday is {latest})")
    return requested


def week_rows(settings: Settings, dataset: Dataset, week: dt.date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(raw rows, feature rows) of ``week``: its sales from the generator, its features from the stored history."""
    raw_week = generate(dataset.shape_of_week(week))
    start = week - LOOKBACK_WEEKS * WEEK
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{RAW_TABLE}" WHERE date >= %s AND date < %s', (start, week))
        history = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
    history = history.astype({name: raw_week[name].dtype for name in raw_week.columns})
    features = build_features(pd.concat([history, raw_week], ignore_index=True))
    return raw_week, features[features["event_timestamp"] == pd.Timestamp(week, tz="UTC")].reset_index(drop=True)


@dataclass(frozen=True)
class AppendResult:
    week: dt.date
    rows: int
    materialized: bool  # False: the week is older than the ttl, so only the offline store has it
    timer: PhaseTimer


def append_week(settings: Settings, week: dt.date | None = None, now: dt.datetime | None = None) -> AppendResult:
    """Add the week that just ended (or ``week``) to the offline store and, when it is current, to the online one."""
    now = now or dt.datetime.now(dt.UTC)
    timer = PhaseTimer("step 1, one more week")
    with timer.phase("connect PostgreSQL and Ray"):
        settings = stack.ensure_services(settings, ray=True)
    dataset = read_dataset(settings)
    week = week_to_append(dataset, week, now.date())
    ttl = fs_ops.repo_feature_ttl(settings.feast_repo_path)
    week_end = dt.datetime.combine(week, dt.time(), dt.UTC)
    current = week_end >= now - ttl  # an older week goes to the offline store only
    workers = fs_ops.WarmWorkers(settings, dataset.stores * dataset.depts) if current else None
    with timer.phase("generate and derive the week"):
        raw, features = week_rows(settings, dataset, week)
        timer.note("generate and derive the week", f"{len(raw):,} series, week ending {week}")
    with timer.phase("append to the offline store"):
        replace_week(settings.postgres, {RAW_TABLE: (raw, "date"), FEATURE_TABLE: (features, "event_timestamp")})
    if not current:
        timer.note("append to the offline store", f"online store not updated: the week is older than the feature "
                                                  f"ttl ({ttl.days} days); the point-in-time join serves it")
        return AppendResult(week, len(raw), materialized=False, timer=timer)
    with timer.phase("materialize the week (Ray engine)"):
        workers.wait()
        store = fs_ops.open_store(settings)
        fs_ops.materialize_latest(store, week_end)
    with timer.phase("verify online store"):
        stats = fs_ops.verify_online(settings, store, features)
        timer.note("verify online store", f"{stats.entities:,} series stamped {week}")
    return AppendResult(week, len(raw), materialized=True, timer=timer)
