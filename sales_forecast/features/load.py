"""Bulk load into PostgreSQL (the offline store) with ADBC's COPY-based ingest.

A load writes a staging table, indexes it, then swaps it in with one transaction, so a re-run replaces the
data (never duplicates it) and readers never see a half-loaded table.
"""

from __future__ import annotations

import adbc_driver_postgresql.dbapi as adbc
import pandas as pd
import pyarrow as pa

from sales_forecast.config import PostgresSettings


def _connect(settings: PostgresSettings) -> adbc.Connection:
    return adbc.connect(settings.libpq_url())


def load_table(settings: PostgresSettings, table: str, frame: pd.DataFrame, index_columns: list[str]) -> int:
    """Replace ``table`` with ``frame``; returns the row count now in the table."""
    staging = f"{table}__staging"
    data = pa.Table.from_pandas(frame, preserve_index=False)
    with _connect(settings) as conn:
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{staging}"')
            cur.adbc_ingest(staging, data, mode="create")
            columns = ", ".join(f'"{c}"' for c in index_columns)
            cur.execute(f'CREATE INDEX "{staging}_key_ts" ON "{staging}" ({columns})')
            cur.execute(f'DROP TABLE IF EXISTS "{table}"')
            cur.execute(f'ALTER TABLE "{staging}" RENAME TO "{table}"')
            cur.execute(f'ALTER INDEX "{staging}_key_ts" RENAME TO "{table}_key_ts"')
            cur.execute(f'ANALYZE "{table}"')
            cur.execute(f'SELECT count(*) FROM "{table}"')
            count = cur.fetchone()[0]
        conn.commit()
    return int(count)


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
