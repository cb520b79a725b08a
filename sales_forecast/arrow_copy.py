"""Arrow data into a new PostgreSQL table with binary COPY, encoded by pgpq: step 1's bulk loads and the Ray offline
store's saved datasets. ADBC's bulk ingest, which both used before, creates the same column types but encodes about
3x slower on the client (10x features, 6M rows x 35 columns: 14 s of CPU against 4.4 s)."""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

# COPY data is encoded and sent in batches of this many rows, so PostgreSQL parses one while the next is encoded (ADBC's
# ingest of the 10x features as one batch, 6M rows x 35 columns: 27.9 s, encoding and parsing one after the other)
COPY_BATCH_ROWS = 16_384


def column_type(field: pa.Field) -> tuple[str, pa.DataType]:
    """The PostgreSQL type of a copied column (ADBC's ingest creates the same, except for an unsigned integer, which
    gets the smallest signed type that holds it) and the Arrow type it is sent as. Other types (dictionary,
    decimal, time, duration, list) are refused."""
    kind = field.type
    if pa.types.is_timestamp(kind):  # PostgreSQL keeps microseconds; the binary value is UTC for timestamptz
        return ("timestamptz" if kind.tz else "timestamp"), pa.timestamp("us", kind.tz)
    for test, name, sent in ((pa.types.is_uint8, "smallint", pa.int16()), (pa.types.is_uint16, "integer", pa.int32()),
                             (pa.types.is_uint32, "bigint", pa.int64()), (pa.types.is_uint64, "bigint", pa.int64())):
        if test(kind):  # uint64: the values up to 2**63 - 1 (for_copy refuses the others)
            return name, sent
    for test, name in ((pa.types.is_boolean, "boolean"), (pa.types.is_int8, "smallint"),
                       (pa.types.is_int16, "smallint"), (pa.types.is_int32, "integer"), (pa.types.is_int64, "bigint"),
                       (pa.types.is_float32, "real"), (pa.types.is_float64, "double precision"),
                       (pa.types.is_string, "text"), (pa.types.is_large_string, "text"),
                       (pa.types.is_binary, "bytea"), (pa.types.is_large_binary, "bytea"),
                       (pa.types.is_date32, "date")):
        if test(kind):
            return name, kind
    raise TypeError(f"column {field.name!r}: cannot bulk-load Arrow type {kind} (booleans, integers, floats, "
                    "strings, binary, dates and timestamps can)")


def copyable(schema: pa.Schema) -> bool:
    try:
        for field in schema:
            column_type(field)
    except TypeError:
        return False
    return True


def for_copy(data: pa.Table) -> tuple[list[str], pa.Table]:
    """The PostgreSQL column types of ``data`` and the data as COPY sends it: nanoseconds truncated to
    microseconds, as ADBC's ingest does; every other check kept (an unsigned value above bigint's range is refused,
    where ADBC's ingest wrapped it around)."""
    types = [column_type(field) for field in data.schema]
    sent = pa.schema([pa.field(f.name, kind) for f, (_, kind) in zip(data.schema, types, strict=True)])
    columns = []
    for field, column, kind in zip(data.schema, data.columns, sent.types, strict=True):
        try:
            columns.append(pc.cast(column, options=pc.CastOptions(kind, allow_time_truncate=True)))
        except pa.ArrowInvalid as exc:
            raise ValueError(f"column {field.name!r}: {exc}") from exc
    return [name for name, _ in types], pa.table(columns, schema=sent)


def _relation(table: str | sql.Composable) -> sql.Composable:
    return sql.Identifier(table) if isinstance(table, str) else table


def create_table(cur: psycopg.Cursor, table: str | sql.Composable, schema: pa.Schema, types: list[str]) -> None:
    """``table``: a name, or an ``sql.Identifier`` (a schema-qualified one)."""
    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(_relation(table), sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(name)) for f, name in zip(schema, types,
                                                                                        strict=True))))


def copy_rows(cur: psycopg.Cursor, table: str | sql.Composable, data: pa.Table) -> None:
    """One binary COPY of ``data`` (as ``for_copy`` made it) into ``table``, which this transaction created."""
    encoder = ArrowToPostgresBinaryEncoder(data.schema)
    # FREEZE (the table is this transaction's own): rows written frozen and all-visible, so autovacuum does not
    # rewrite the whole table right after the load
    with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY, FREEZE)").format(_relation(table))) as copy:
        copy.write(encoder.write_header())
        for batch in data.to_batches(max_chunksize=COPY_BATCH_ROWS):
            copy.write(encoder.write_batch(batch))
        copy.write(encoder.finish())


def copy_into(cur: psycopg.Cursor, table: str, data: pa.Table) -> int:
    """Create ``table`` with ``data``'s columns and fill it with one binary COPY, encoded by pgpq in batches
    while PostgreSQL parses the previous one; returns the rows."""
    types, data = for_copy(data)
    create_table(cur, table, data.schema, types)
    copy_rows(cur, table, data)
    return data.num_rows
