"""The offline bulk load on a real PostgreSQL: several tables in one transaction (all or none), a re-run with the
same data keeps the tables, and every way a table can change after its load makes the next load write it again.
Also the child process that makes and stages step 1's data (staging.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os

import numpy as np
import pandas as pd
import psycopg
import pytest
from conftest import database_settings

from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError
from sales_forecast.features.generator import Shape
from sales_forecast.features.load import TableLoad, load_table, replace_week
from sales_forecast.features.staging import OfflineLoad

WEEK0 = pd.Timestamp("2026-11-06", tz="UTC")


def _frame(weeks: int = 3, stores: int = 4) -> pd.DataFrame:
    grid = pd.MultiIndex.from_product([range(1, stores + 1), range(weeks)], names=["store", "week"]).to_frame(
        index=False)
    return pd.DataFrame({"store": grid["store"], "event_timestamp": WEEK0 + pd.to_timedelta(7 * grid["week"], "D"),
                         "value": np.arange(len(grid), dtype="float64") * 1.5,
                         "label": [f"s{s}" for s in grid["store"]]})


@pytest.fixture()
def db(stack_settings: Settings) -> Settings:
    return database_settings(stack_settings, "bulk_load")


def _query(settings: Settings, sql: str) -> list[tuple]:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute(sql).fetchall()


def _execute(settings: Settings, *statements: str) -> None:
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _oid(settings: Settings, table: str) -> int | None:
    return _query(settings, f"SELECT to_regclass('{table}')::oid")[0][0]


def _load(settings: Settings, frame: pd.DataFrame, table: str = "rows") -> int:
    return load_table(settings.postgres, table, frame, ["store", "event_timestamp"])


def _content(settings: Settings, table: str = "rows") -> pd.DataFrame:
    rows = _query(settings, f'SELECT store, event_timestamp, value, label FROM "{table}" ORDER BY store, '
                            'event_timestamp')
    frame = pd.DataFrame(rows, columns=["store", "event_timestamp", "value", "label"])
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame


def _assert_holds(settings: Settings, frame: pd.DataFrame, table: str = "rows") -> None:
    got = _content(settings, table)
    want = frame.sort_values(["store", "event_timestamp"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_tables_are_committed_together_or_not_at_all(db: Settings) -> None:
    with TableLoad(db.postgres) as load:
        load.stage("first", _frame(), ["store", "event_timestamp"])
        load.stage("second", _frame(weeks=2), ["store", "event_timestamp"])
    assert _oid(db, "first") is None and _oid(db, "second") is None
    assert not _query(db, "SELECT relname FROM pg_class WHERE relname LIKE '%staging%'")
    with TableLoad(db.postgres) as load:
        assert load.stage("first", _frame(), ["store", "event_timestamp"]) == 12
        assert load.stage("second", _frame(weeks=2), ["store", "event_timestamp"]) == 8
        load.commit()
    _assert_holds(db, _frame(), "first")
    _assert_holds(db, _frame(weeks=2), "second")
    assert {"first_key_ts", "second_key_ts"} <= {n for (n,) in _query(db, "SELECT indexname FROM pg_indexes")}


def test_the_same_data_keeps_the_table_other_data_replaces_it(db: Settings) -> None:
    frame = _frame()
    assert _load(db, frame) == 12
    loaded = _oid(db, "rows")
    assert _load(db, frame) == 12
    assert _oid(db, "rows") == loaded  # kept: the same table, not a new copy
    changed = frame.copy()
    changed.loc[5, "value"] += 1e-9
    _load(db, changed)
    assert _oid(db, "rows") != loaded
    _assert_holds(db, changed)
    fewer = frame.iloc[:-1]
    _load(db, fewer)
    _assert_holds(db, fewer)
    typed = frame.astype({"value": "float32"})  # same values, another column type: written again
    reloaded = _oid(db, "rows")
    _load(db, typed)
    assert _oid(db, "rows") != reloaded


CHANGES = {
    "update": ["UPDATE rows SET value = value + 1 WHERE store = 1"],
    "delete": ["DELETE FROM rows WHERE store = 2"],
    "insert": ["INSERT INTO rows SELECT store + 10, event_timestamp, value, label FROM rows"],
    "truncate": ["TRUNCATE rows"],
    "rewrite without DML": ["ALTER TABLE rows ALTER COLUMN value TYPE float8 USING value * 2"],
    "added column": ["ALTER TABLE rows ADD COLUMN extra integer DEFAULT 7"],
    "dropped column": ["ALTER TABLE rows DROP COLUMN label", "ALTER TABLE rows ADD COLUMN label text"],
    "update without triggers": ["SET session_replication_role = replica", "UPDATE rows SET value = 0 WHERE store = 4"],
    "delete and insert as many": ["DELETE FROM rows WHERE store = 1 AND value = 0",
                                  "INSERT INTO rows VALUES (1, '2026-11-06', 0.5, 's1')"],
    "another table by that name": ["ALTER TABLE rows RENAME TO rows_old", "ALTER INDEX rows_key_ts RENAME TO old_ts",
                                   "CREATE TABLE rows AS SELECT store, event_timestamp, value + 1 AS value, label "
                                   "FROM rows_old", "CREATE INDEX rows_key_ts ON rows (store, event_timestamp)"],
    "index dropped": ["DROP INDEX rows_key_ts"],
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_change_since_the_load_makes_the_next_load_write_again(db: Settings, change: str) -> None:
    frame = _frame()
    _load(db, frame)
    loaded = _oid(db, "rows")
    _execute(db, *CHANGES[change])
    _load(db, frame)
    assert _oid(db, "rows") != loaded
    _assert_holds(db, frame)
    assert {n for (n,) in _query(db, "SELECT indexname FROM pg_indexes")} >= {"rows_key_ts"}


def test_an_appended_week_makes_the_next_full_load_write_again(db: Settings) -> None:
    frame = _frame()
    _load(db, frame)
    week = frame[frame["event_timestamp"] == frame["event_timestamp"].max()].assign(value=-1.0)
    replace_week(db.postgres, {"rows": (week, "event_timestamp")})  # what --append-week does
    _load(db, frame)
    _assert_holds(db, frame)


def test_the_child_process_stages_and_commits_or_rolls_back(db: Settings) -> None:
    shape = Shape(stores=2, depts=3, weeks=8, seed=1, end_date=dt.date(2026, 11, 27))
    with OfflineLoad(shape, db.postgres) as offline:
        staged = offline.staged()
        assert staged.rows == shape.rows
        assert len(staged.latest) == 6 and staged.kept == []
        assert _oid(db, "weekly_sales") is None  # staged, not committed: invisible
    assert _oid(db, "weekly_sales") is None and _oid(db, "sales_features") is None  # left without commit
    with OfflineLoad(shape, db.postgres) as offline:
        offline.staged()
        offline.commit()
    assert _query(db, "SELECT count(*) FROM weekly_sales")[0][0] == shape.rows
    with OfflineLoad(shape, db.postgres) as offline:
        assert sorted(offline.staged().kept) == ["sales_features", "weekly_sales"]
        offline.commit()


def _table(settings: Settings, table: str, order: str) -> pd.DataFrame:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        cur = conn.execute(f'SELECT * FROM "{table}" ORDER BY {order}')
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


def test_a_load_by_store_ranges_writes_what_a_whole_load_writes(db: Settings) -> None:
    """Above RANGE_ROWS the child generates, derives and loads a store range at a time, the department medians from
    a first pass over every range: both tables equal a whole load's, value for value, NULLs included; a second
    load of the same data keeps both tables and leaves no staged copy behind."""
    from sales_forecast.features.staging import store_ranges

    shape = Shape(stores=7, depts=3, weeks=60, seed=5, end_date=dt.date(2026, 11, 27))
    range_rows = 2 * shape.depts * shape.weeks
    assert store_ranges(shape, range_rows) == [(1, 2), (3, 4), (5, 6), (7, 7)]
    contents = []
    for rows in (shape.rows, range_rows):
        with OfflineLoad(shape, db.postgres, range_rows=rows) as offline:
            staged = offline.staged()
            assert staged.kept == [] and staged.rows == shape.rows
            offline.commit()
        contents.append((_table(db, "weekly_sales", "store, dept, date"),
                         _table(db, "sales_features", "store, dept, event_timestamp"),
                         staged.latest.sort_values(["store", "dept"]).reset_index(drop=True)))
    (raw, features, latest), (raw_by_range, features_by_range, latest_by_range) = contents
    assert len(features) == shape.rows and features["dept_ya_step"].notna().any() and features.isna().any().any()
    pd.testing.assert_frame_equal(raw_by_range, raw, check_exact=True)
    pd.testing.assert_frame_equal(features_by_range, features, check_exact=True)
    pd.testing.assert_frame_equal(latest_by_range, latest, check_exact=True)
    oids = (_oid(db, "weekly_sales"), _oid(db, "sales_features"))
    with OfflineLoad(shape, db.postgres, range_rows=range_rows) as offline:
        assert sorted(offline.staged().kept) == ["sales_features", "weekly_sales"]
        offline.commit()
    assert (_oid(db, "weekly_sales"), _oid(db, "sales_features")) == oids
    assert _query(db, "SELECT count(*) FROM pg_class WHERE relname LIKE '%staging%'")[0][0] == 0


def test_the_child_process_reports_its_failure(db: Settings) -> None:
    nowhere = dataclasses.replace(db.postgres, port=1)
    with OfflineLoad(Shape(stores=1, depts=1, weeks=6, end_date=dt.date(2026, 11, 27)), nowhere) as offline, \
            pytest.raises(PipelineError, match="making the offline data failed: .*(?i:connect|refused)"):
        offline.staged()


def test_a_killed_child_process_is_one_clear_error(db: Settings) -> None:
    """The data's process dies (as under the kernel's OOM killer): the step says which work died, and nothing is
    loaded."""
    import multiprocessing
    import signal

    from sales_forecast.stack.processes import wait_until

    with OfflineLoad(Shape(end_date=dt.date(2026, 11, 27)), db.postgres) as offline:
        assert wait_until(lambda: bool(multiprocessing.active_children()), 30)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(PipelineError, match="child process making the offline data .* died"):
            offline.staged()
    assert _oid(db, "weekly_sales") is None


def test_the_copy_creates_adbcs_column_types_and_round_trips_every_value(db: Settings) -> None:
    """The bulk load's binary COPY (pgpq) against ADBC's ingest, which loaded these tables before it: the same
    PostgreSQL column types and the same values read back (NULLs of every type, naive and aware timestamps in
    nanoseconds, extreme integers and floats, text that SQL or a shell would interpret), on a server whose TimeZone
    is not UTC. A type neither can load is refused with its column's name, and nothing is written."""
    import adbc_driver_postgresql.dbapi as adbc
    import pyarrow as pa

    _execute(db, f'ALTER DATABASE "{db.postgres.database}" SET timezone TO \'Asia/Kolkata\'')
    aware = pd.Series([pd.Timestamp("2026-11-27 23:30:00.123456", tz="America/New_York"), pd.NaT,
                       pd.Timestamp("1999-12-31 23:59:59", tz="UTC")], dtype="datetime64[ns, UTC]")
    frame = pd.DataFrame({
        "store": pd.array([1, None, 2**63 - 1], dtype="Int64"),
        "small": pd.array([-(2**15), None, 2**15 - 1], dtype="Int16"),
        "tiny": pd.array([-128, None, 127], dtype="Int8"),
        "mid": pd.array([-(2**31), 0, None], dtype="Int32"),
        "event_timestamp": aware,
        "naive": pd.Series([pd.Timestamp("2026-03-08 02:30"), pd.Timestamp("1970-01-01"), pd.NaT]),
        "value": [np.nan, -1.5e308, 5e-324],
        "single": pd.array([1.25, None, -3.5], dtype="Float32"),
        "flag": pd.array([True, None, False], dtype="boolean"),
        "label": ["'; DROP TABLE rows; --", None, "$(rm -rf /) \\N \t\n é 😀"],
        "blob": [b"\x00\xff", None, b""],
        "day": [dt.date(2026, 11, 27), None, dt.date(1, 1, 1)],
    })
    load_table(db.postgres, "copied", frame, ["store"])
    with adbc.connect(db.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.adbc_ingest("ingested", pa.Table.from_pandas(frame, preserve_index=False), mode="create")
        conn.commit()

    def types(table: str) -> list[tuple]:
        return _query(db, "SELECT column_name, data_type FROM information_schema.columns "
                          f"WHERE table_name = '{table}' ORDER BY ordinal_position")

    assert types("copied") == types("ingested")
    assert _query(db, "SELECT * FROM copied ORDER BY mid NULLS LAST") == \
        _query(db, "SELECT * FROM ingested ORDER BY mid NULLS LAST")
    assert _query(db, "SELECT value IS NULL, store IS NULL FROM copied ORDER BY mid NULLS LAST") == \
        [(True, False), (False, True), (False, False)]  # pandas' NaN is NULL, as in every load before
    back = _query(db, "SELECT event_timestamp, naive, label FROM copied ORDER BY mid NULLS LAST")
    assert back[0][0] == aware[0].to_pydatetime() and back[0][1] == dt.datetime(2026, 3, 8, 2, 30)
    assert back[2][2] == frame["label"][2]

    with pytest.raises(TypeError, match="column 'counts'.*list<item: int64>"):
        load_table(db.postgres, "refused", frame.assign(counts=[[1], [2], []]), ["store"])
    assert _oid(db, "refused") is None
