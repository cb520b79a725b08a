"""Reading PostgreSQL into Arrow with ADBC (binary COPY, no Python objects per value), and column types.

Output columns get the types Feast's PostgreSQL store returns, so the two stores are interchangeable:
timestamps as naive UTC microseconds, numeric as double.
"""

from __future__ import annotations

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import pyarrow as pa

from sales_forecast.ray_offline_store.asof import NULL_TIME

_PG_TYPE = b"POSTGRESQL:type"


def read_arrow(connection: str, query: str) -> pa.Table:
    with adbc.connect(connection) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetch_arrow_table()


def feast_types(table: pa.Table) -> pa.Table:
    """Feast's PostgreSQL column types: naive UTC microsecond timestamps, numeric as double, no field metadata."""
    columns, fields = [], []
    for field, column in zip(table.schema, table.columns, strict=True):
        if field.metadata and field.metadata.get(_PG_TYPE) == b"numeric":
            column = pa.chunked_array([_storage(chunk) for chunk in column.chunks], pa.string()).cast(pa.float64())
        elif pa.types.is_timestamp(field.type) and field.type != pa.timestamp("us"):
            column = column.cast(pa.timestamp("us"), safe=False)
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _storage(chunk: pa.Array) -> pa.Array:
    return chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk


def utc_nanoseconds(values: pa.ChunkedArray | pd.Series) -> np.ndarray:
    """int64 UTC nanoseconds (NULL_TIME for NULL); naive timestamps are taken as UTC, strings are parsed."""
    if isinstance(values, pa.ChunkedArray) and pa.types.is_timestamp(values.type):
        as_ns = values.cast(pa.timestamp("ns", tz=values.type.tz))  # raises outside 1677..2262
        return as_ns.cast(pa.int64()).fill_null(NULL_TIME).to_numpy()
    series = values.to_pandas() if isinstance(values, pa.ChunkedArray) else values
    stamps = pd.to_datetime(series, utc=True)
    return stamps.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
