"""Bulk load into PostgreSQL (the offline store) with ADBC's COPY-based ingest.

A load writes a staging table, indexes it, then swaps it in, all in one transaction (several tables: all in one),
so a re-run replaces the data (never duplicates it) and readers never see a half-loaded table.
"""

from __future__ import annotations

import adbc_driver_postgresql.dbapi as adbc
import pandas as pd
import pyarrow as pa

from sales_forecast.config import PostgresSettings


def _connect(settings: PostgresSettings) -> adbc.Connection:
    return adbc.connect(settings.libpq_url())


class TableLoad:
    """Several tables replaced in one transaction: each ``stage`` fills and indexes a staging table, ``commit``
    swaps them all in; leaving the ``with`` block without ``commit`` (an error, a refusal) rolls everything back."""

    def __init__(self, settings: PostgresSettings):
        self.conn = _connect(settings)
        self.cur = self.conn.cursor()
        self.staged: list[str] = []
        self.committed = False

    def stage(self, table: str, frame: pd.DataFrame, index_columns: list[str]) -> int:
        """Fill ``table``'s staging table with ``frame`` (not visible to others until ``commit``); returns its rows."""
        staging = f"{table}__staging"
        cur = self.cur
        cur.execute(f'DROP TABLE IF EXISTS "{staging}"')
        cur.adbc_ingest(staging, pa.Table.from_pandas(frame, preserve_index=False), mode="create")
        columns = ", ".join(f'"{c}"' for c in index_columns)
        cur.execute(f'CREATE INDEX "{staging}_key_ts" ON "{staging}" ({columns})')
        cur.execute(f'ANALYZE "{staging}"')
        cur.execute(f'SELECT count(*) FROM "{staging}"')
        self.staged.append(table)
        return int(cur.fetchone()[0])

    def commit(self) -> None:
        for table in self.staged:
            staging = f"{table}__staging"
            self.cur.execute(f'DROP TABLE IF EXISTS "{table}"')
            self.cur.execute(f'ALTER TABLE "{staging}" RENAME TO "{table}"')
            self.cur.execute(f'ALTER INDEX "{staging}_key_ts" RENAME TO "{table}_key_ts"')
        self.conn.commit()
        self.committed = True

    def __enter__(self) -> TableLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.conn.rollback()
        self.cur.close()
        self.conn.close()


def load_table(settings: PostgresSettings, table: str, frame: pd.DataFrame, index_columns: list[str]) -> int:
    """Replace ``table`` with ``frame``; returns the row count now in the table."""
    with TableLoad(settings) as load:
        count = load.stage(table, frame, index_columns)
        load.commit()
    return count


def replace_week(settings: PostgresSettings, tables: dict[str, tuple[pd.DataFrame, str]]) -> dict[str, int]:
    """Replace one week's rows in several tables in one transaction: delete the rows of that week, append these.

    ``tables`` maps a table to (its new rows, the name of its week column); every frame holds a single week. A re-run
    with the same rows leaves the same tables (idempotent), and readers see all tables before or all after.
    """
    counts = {}
    with _connect(settings) as conn:
        with conn.cursor() as cur:
            for table, (frame, column) in tables.items():
                weeks = frame[column].unique()
                if len(weeks) != 1:
                    raise ValueError(f"{table}: expected the rows of one week, got {len(weeks)} weeks")
                week = pd.Timestamp(weeks[0])
                cur.execute(f'DELETE FROM "{table}" WHERE "{column}" = $1', parameters=(week.to_pydatetime(),))
                cur.adbc_ingest(table, pa.Table.from_pandas(frame, preserve_index=False), mode="append")
                counts[table] = len(frame)
        conn.commit()
    return counts
