#!/usr/bin/env python
"""One online write's upsert against a large online table: `python -m benchmarks.bench_online_write`
(make bench-online-write; `--series 115830` for the 10x shape, 1158300 for 100x, the default).

On the stack's PostgreSQL (`make stack-up`) it builds two tables in the layout of Feast's PostgreSQL online store
(`online_columns`, with Feast's `timestamptz` for the timestamps the writes stage as `timestamp`, the primary key),
each holding ``--series`` series x the model's 32 features, keys serialized as Feast's version 3 of (dept, store),
grown in writes of 60,000 series sorted by key, as step 1's materialization leaves it: one with the primary key
as its one index (what the bulk store's ``update`` leaves), one with Feast's second index on ``entity_key`` too.
Then it times one write of 60,000 series (1.92M rows, what one materialization write holds), its statements alone
(the COPY into the staging table is the same for all), in three cases: series the table does not hold (a first
load), the stored values (a run repeated), new values (a new week). Each case is timed three ways: the project's
write (`BulkPostgreSQLOnlineStore._merge`: the staged keys looked up once each, rows of new keys inserted plainly,
the others upserted) into the one-index table, the same write into the table with Feast's index (the store before
it dropped that index), and every row upserted with the primary-key probe into that table (the write before
that). The three take turns going first from one repetition to the next. Each write is rolled back and its table
vacuumed before the next; the tables are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql
from rich.console import Console
from rich.table import Table

from sales_forecast.config import load_settings
from sales_forecast.features.derive import MODEL_FEATURES
from sales_forecast.online_store import (
    DIFFERS_FROM_STORED,
    STAGING_TABLE,
    BulkPostgreSQLOnlineStore,
    _serialized_keys,
    online_columns,
    staging_statement,
    upsert_statement,
)

TABLE = "bench_online_write"
FEAST_TABLE = "bench_online_write_feast_index"  # the same rows, with Feast's index on entity_key too
TABLES = (TABLE, FEAST_TABLE)
KEYS = "bench_online_write_keys"
WRITE_SERIES = 60_000  # feature_repo's online_write_batch_size
DEPTS = 81
STORED = {"timestamp": "timestamptz"}  # Feast's table stores the timestamps that writes stage as timestamp
CASES = {"new series": (0, 0), "same values": (-WRITE_SERIES, 0), "new values": (-WRITE_SERIES, 7)}


# name -> (the condition of an upsert of every row, None: the project's write; the table written)
WRITES = {"now (primary key only)": (None, TABLE), "with Feast's entity-key index": (None, FEAST_TABLE),
          "all upserted, probe, Feast's index": (DIFFERS_FROM_STORED, FEAST_TABLE)}


def serialized_keys(count: int) -> np.ndarray:
    """Feast's version-3 serialization of the join keys (dept, store), series in store-major order, one row of bytes
    per series: the online store's own encoding, which checks itself against Feast's."""
    from feast import ValueType

    series = np.arange(count, dtype=np.int64)
    keys = pa.table({"dept": series % DEPTS + 1, "store": series // DEPTS + 1})
    return _serialized_keys(keys, {"dept": ValueType.INT64, "store": ValueType.INT64})


def rows_sql(target: str, low: int, high: int, shift: int) -> sql.Composed:
    """INSERT of series [low, high) x the features, each value derived from (series, feature, shift)."""
    names = sql.SQL(", ").join(map(sql.Literal, MODEL_FEATURES))
    return sql.SQL(
        "INSERT INTO {target} (entity_key, feature_name, value, value_text, event_ts) "
        "SELECT k.key, f.name, '\\x09'::bytea || float8send(k.series * 100 + f.n + {shift}), "
        "(k.series * 100 + f.n + {shift})::text, '2026-11-27'::timestamptz "
        "FROM {keys} k CROSS JOIN unnest(ARRAY[{names}]) WITH ORDINALITY AS f(name, n) "
        "WHERE k.series >= {low} AND k.series < {high} ORDER BY k.key, f.name"
    ).format(target=sql.Identifier(target), keys=sql.Identifier(KEYS), names=names, shift=sql.Literal(shift),
             low=sql.Literal(low), high=sql.Literal(high))


def build(conn: psycopg.Connection, series: int, console: Console) -> None:
    started = time.perf_counter()
    columns = online_columns(False)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}, {}").format(*map(sql.Identifier, (*TABLES, KEYS))))
    conn.execute(sql.SQL("CREATE TABLE {} (series integer, key bytea)").format(sql.Identifier(KEYS)))
    with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(KEYS))) as copy:
        for number, key in enumerate(serialized_keys(series + WRITE_SERIES)):
            copy.write_row((number, key.tobytes()))
    for table in TABLES:
        conn.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (entity_key, feature_name))").format(
            sql.Identifier(table), sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(STORED.get(t, t))) for n, t in columns)))
    conn.execute(sql.SQL("CREATE INDEX ON {} (entity_key)").format(sql.Identifier(FEAST_TABLE)))
    for low in range(0, series, WRITE_SERIES):
        for table in TABLES:
            conn.execute(rows_sql(table, low, min(series, low + WRITE_SERIES), 0))
        console.print(f"  {min(series, low + WRITE_SERIES):,} series stored, {time.perf_counter() - started:.0f} s")
    for table in TABLES:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))
    console.print(f"two tables of {series:,} series x {len(MODEL_FEATURES)} features built in "
                  f"{time.perf_counter() - started:.1f} s")


def timed_write(conn: psycopg.Connection, differs: str | None, table: str, low: int, shift: int) -> float:
    """Seconds of one write's statements into ``table`` (``differs`` None: the project's write; else one upsert of
    every row with that condition), rolled back; the table vacuumed after."""
    columns = online_columns(False)
    names = [name for name, _ in columns]
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        cur.execute(staging_statement(columns))
        cur.execute(rows_sql(STAGING_TABLE, low, low + WRITE_SERIES, shift))
        started = time.perf_counter()
        if differs is None:
            BulkPostgreSQLOnlineStore._merge(conn, cur, table, names)
        else:
            cur.execute(upsert_statement(table, names, differs))
        seconds = time.perf_counter() - started
    conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(table)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1_158_300, help="series in the online table")
    parser.add_argument("--repeat", type=int, default=1, help="writes per case and statement, alternating")
    parser.add_argument("--keep", action="store_true", help="keep the table (and reuse a kept one of that size)")
    args = parser.parse_args()
    if args.series < WRITE_SERIES:
        parser.error(f"--series must be at least {WRITE_SERIES:,}: the same and new values cases rewrite the last "
                     f"{WRITE_SERIES:,} stored series")
    console = Console()
    settings = load_settings()
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        kept = conn.execute("SELECT count(*) = 2 FROM pg_class WHERE relname IN (%s, %s)", (KEYS, FEAST_TABLE)
                            ).fetchone()[0] and \
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(KEYS))).fetchone()[0] \
            == args.series + WRITE_SERIES
        if not (args.keep and kept):
            build(conn, args.series, console)
        times: dict[tuple[str, str], list[float]] = {}
        for repetition in range(args.repeat):
            turn = list(WRITES)[repetition % len(WRITES):] + list(WRITES)[:repetition % len(WRITES)]
            for case, (offset, shift) in CASES.items():
                for name in turn:
                    differs, table = WRITES[name]
                    seconds = timed_write(conn, differs, table, args.series + offset, shift)
                    times.setdefault((case, name), []).append(seconds)
                    console.print(f"  {case}, {name}: {seconds:.2f} s")
        if not args.keep:
            conn.execute(sql.SQL("DROP TABLE {}, {}, {}").format(*map(sql.Identifier, (*TABLES, KEYS))))
    table = Table(title=f"one write of {WRITE_SERIES:,} series x {len(MODEL_FEATURES)} features "
                        f"({WRITE_SERIES * len(MODEL_FEATURES):,} rows) into {args.series:,} stored series, "
                        "the statements alone, seconds")
    table.add_column("case")
    for name in WRITES:
        table.add_column(name, justify="right")
    for case in CASES:
        table.add_row(case, *(", ".join(f"{s:.1f}" for s in times[(case, name)]) for name in WRITES))
    console.print(table)


if __name__ == "__main__":
    main()
