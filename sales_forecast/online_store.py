"""Feast's PostgreSQL online store with a bulk write path.

feature_store.yaml: ``online_store: type: sales_forecast.online_store.BulkPostgreSQLOnlineStore`` with the keys of
``type: postgres``. Reads, the table layout (one row per entity key and feature, Feast's key serialization and
value protos) and ``teardown`` are Feast's PostgreSQLOnlineStore unchanged, so Feast's ``get_online_features`` and
the model server read what this writes. ``update`` is Feast's too, less one index: Feast's ``<table>_ek`` on
``entity_key`` duplicates the primary key's first column, which serves every lookup by key, and every write
maintained both (``primary_key_as_entity_key_index``). The writes differ. Feast
upserts row by row (``executemany``, 370K statements for step 1's 11,583 series x 32 features); this one COPYs the
batch into a temporary table, inserts the rows of keys the table does not hold with a plain ``INSERT`` and upserts
the others with one ``INSERT ... ON CONFLICT DO UPDATE``, skipping rows whose stored values are already the same.
Its connections are Feast's, kept better (``_get_conn``): a failed call rolls back and returns a pool's connection,
and a lost cached connection is replaced; the cached one serves one call at a time.

``online_write_arrow`` is the same write from an Arrow batch, what the project's Ray engine (ray_engine.py) hands
it: numeric features and integer keys are encoded column by column into the bytes Feast's protos and key
serialization make (``ArrowRows``), instead of one proto per value; any other batch goes through Feast's
conversion to protos and ``online_write_batch``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from feast import Entity, FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key, serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _to_naive_utc, extract_text_and_num
from feast.infra.online_stores.postgres_online_store.postgres import (
    PostgreSQLOnlineStore,
    PostgreSQLOnlineStoreConfig,
    _table_id,
)
from feast.infra.utils.postgres import connection_utils
from feast.infra.utils.postgres.postgres_config import ConnectionType
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.utils import _convert_arrow_to_proto
from feast.value_type import ValueType
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import errors, sql
from psycopg.pq import TransactionStatus
from pydantic import field_validator

logger = logging.getLogger(__name__)

STORE_TYPE = "sales_forecast.online_store.BulkPostgreSQLOnlineStore"  # what feature_store.yaml names
KEY_COLUMNS = ("entity_key", "feature_name")
STAGING_TABLE = "feast_online_write_staging"  # a temporary table, dropped at the end of each write's transaction
KEYS_TABLE = "feast_online_write_keys"  # the staged keys and whether the table held them: temporary too

WriteRows = list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]]

# The value types ArrowRows encodes: Feast's value type -> (the Arrow column type it takes, the proto field); join
# keys: the integer ones
ARROW_VALUES = {ValueType.DOUBLE: (pa.float64(), "double_val"), ValueType.FLOAT: (pa.float32(), "float_val"),
                ValueType.INT64: (pa.int64(), "int64_val"), ValueType.INT32: (pa.int32(), "int32_val")}
MICROSECONDS = {"s": 1_000_000, "ms": 1_000, "us": 1}  # per unit of the units whose values can leave datetime's range
# Python's datetimes, in microseconds since the epoch: Feast's conversion goes through them (and fails outside)
DATETIME_MICROSECONDS = tuple((moment - datetime(1970, 1, 1)) // timedelta(microseconds=1)
                              for moment in (datetime.min, datetime.max))
ARROW_WRITE_KEYS = 4_096  # entity keys per encoded part of an Arrow write (x features rows): bounded memory


def feast_type(plugin: str, feast: str) -> Any:
    """The ``type`` validator of a plugin's config class: Feast found the class through the yaml's type (the plugin's
    class path); from there on the config reads as Feast's own type to everything that checks it (Feast's
    PostgreSQLOnlineStore asserts type == "postgres", the model server's connection keeper checks it). Feast builds
    the plugin from the config's class, not from this value."""

    def validate(cls: type, value: Any) -> Any:
        return feast if value == plugin else value

    return field_validator("type", mode="before")(classmethod(validate))


class BulkPostgreSQLOnlineStoreConfig(PostgreSQLOnlineStoreConfig):
    """The ``postgres`` online store keys, unchanged."""

    type: Literal["postgres"] = "postgres"  # type: ignore[assignment]
    _postgres = feast_type(STORE_TYPE, "postgres")


def online_columns(has_value_num: bool) -> list[tuple[str, str]]:
    """The columns Feast's PostgreSQLOnlineStore writes, in its order, with their staging types. Feast sends its
    naive UTC timestamps as ``timestamp``, which PostgreSQL casts to the table's ``timestamptz`` in the session's
    TimeZone; staging them as ``timestamp`` keeps that cast exactly."""
    return [("entity_key", "bytea"), ("feature_name", "text"), ("value", "bytea"), ("value_text", "text"),
            *([("value_num", "float8")] if has_value_num else []), ("vector_value", "bytea"),
            ("event_ts", "timestamp"), ("created_ts", "timestamp")]


def online_rows(config: RepoConfig, data: WriteRows, has_value_num: bool) -> list[tuple[Any, ...]]:
    """The table rows of ``data``, each valued as Feast's ``online_write_batch`` values it; for a key written twice
    only the last (an upsert per row keeps the last too, and one INSERT ... ON CONFLICT may not touch a row twice)."""
    version = config.entity_key_serialization_version
    keys = [serialize_entity_key(entity_key, entity_key_serialization_version=version) for entity_key, *_ in data]
    rows = []
    for key, (_, values, timestamp, created_ts) in zip(keys, data, strict=True):
        event_ts = _to_naive_utc(timestamp)
        created = _to_naive_utc(created_ts) if created_ts is not None else None
        for feature_name, value in values.items():
            text, number = extract_text_and_num(value, has_value_num)
            numeric = (number,) if has_value_num else ()
            rows.append((key, feature_name, value.SerializeToString(), text, *numeric, None, event_ts, created))
    if len(set(keys)) < len(keys):
        return list({(row[0], row[1]): row for row in rows}.values())
    return rows


def staging_statement(columns: list[tuple[str, str]]) -> sql.Composed:
    """The temporary table one write COPYs its rows into (``online_columns``), dropped at the end of the write."""
    return sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
        sql.Identifier(STAGING_TABLE),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in columns))


# Whether a staged row differs from its stored one (or has none): a scalar subquery, which PostgreSQL runs as a
# primary-key probe per staged row. NOT EXISTS of an equal row, the form before, it turns into a join, whose hash
# anti-join read the whole online table on every write (benchmarks/bench_online_write.py). Values are compared
# column by column, so each staged ``timestamp`` is cast to the table's ``timestamptz`` as the insert casts it.
DIFFERS_FROM_STORED = (
    "(SELECT ({stored}) IS NOT DISTINCT FROM ({new}) FROM {target} WHERE {target}.entity_key = {staged}.entity_key "
    "AND {target}.feature_name = {staged}.feature_name) IS NOT TRUE")


def staged_keys_statement(table_name: str) -> sql.Composed:
    """The write's distinct staged keys, each marked whether the online table holds it, into a temporary table: one
    probe of the primary key's first column per key, instead of one per staged row."""
    return sql.SQL(
        "CREATE TEMPORARY TABLE {keys} ON COMMIT DROP AS SELECT staged.entity_key, "
        "(SELECT true FROM {target} WHERE {target}.entity_key = staged.entity_key LIMIT 1) IS NOT NULL AS stored "
        "FROM (SELECT DISTINCT entity_key FROM {staging}) staged"
    ).format(keys=sql.Identifier(KEYS_TABLE), target=sql.Identifier(table_name), staging=sql.Identifier(STAGING_TABLE))


def _staged_rows(stored: bool | None) -> sql.Composable:
    """The staged rows: all of them (None), or those of the keys the table held (True) or did not hold (False) when
    ``staged_keys_statement`` looked. OFFSET 0 keeps PostgreSQL from pushing a caller's per-row probe below this
    filter."""
    staging = sql.Identifier(STAGING_TABLE)
    if stored is None:
        return staging
    return sql.SQL(
        "(SELECT * FROM {staging} WHERE EXISTS (SELECT FROM {keys} WHERE {keys}.entity_key = {staging}.entity_key "
        "AND {keys}.stored = {stored}) OFFSET 0) AS {staging}"
    ).format(staging=staging, keys=sql.Identifier(KEYS_TABLE), stored=sql.Literal(stored))


# The table's primary key (its index, whether it starts with entity_key, whether that index is named ``%(name)s``),
# Feast's index named ``%(name)s`` (on entity_key alone, backing no constraint, on this table) and whether no
# relation holds the name.
_INDEXES_QUERY = (
    "SELECT c.conindid::regclass::text, c.conkey[1] = a.attnum, c.conindid = to_regclass(%(name)s), "
    "i.indexrelid::regclass::text, to_regclass(%(name)s) IS NULL FROM pg_constraint c "
    "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attname = 'entity_key' "
    "LEFT JOIN pg_index i ON i.indexrelid = to_regclass(%(name)s) AND i.indrelid = c.conrelid "
    "AND i.indnatts = 1 AND i.indkey[0] = a.attnum "
    "AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = i.indexrelid) "
    "WHERE c.conrelid = to_regclass(%(table)s) AND c.contype = 'p'")


def primary_key_as_entity_key_index(cur: Any, table_name: str) -> None:
    """Drop Feast's ``<table>_ek`` index on ``entity_key`` and give its name to the primary key's index on
    ``(entity_key, feature_name)``, whose first column serves the same lookups (Feast's reads, ``DELETE`` by key,
    the writes' probes). Feast's ``update`` creates that index ``IF NOT EXISTS``, which PostgreSQL decides by the
    name: on every later apply it finds the primary key and builds nothing, where a dropped index would be rebuilt
    over the whole table. ``teardown`` drops the table, and the index with it. A no-op once done, on a table whose
    primary key does not start with ``entity_key``, and where the name belongs to anything but Feast's index (the
    primary key keeps its own then). The change locks the table and looks again first: two applies at once."""
    name = f"{table_name}_ek"
    params = {"name": sql.Identifier(name).as_string(cur), "table": sql.Identifier(table_name).as_string(cur)}
    for locked in (False, True):
        cur.execute(_INDEXES_QUERY, params)
        found = cur.fetchone()
        if found is None or not found[1] or found[2]:
            return
        primary, _, _, entity_key, free = found
        if entity_key is None and not free:
            return
        if not locked:
            cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table_name)))
    if entity_key is not None:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(entity_key)))  # regclass's text: quoted by PostgreSQL
    cur.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.SQL(primary), sql.Identifier(name)))


def insert_statement(table_name: str, columns: list[str]) -> sql.Composed:
    """A plain INSERT of the staged rows of keys the table did not hold: no stored row to compare, no conflict to
    arbitrate (half the cost of the upsert for those rows). A key another write stored since fails it with a unique
    violation (``BulkPostgreSQLOnlineStore._merge`` then upserts instead)."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    return sql.SQL("INSERT INTO {target} ({names}) SELECT {names} FROM {rows} ORDER BY entity_key, feature_name"
                   ).format(target=sql.Identifier(table_name), names=names, rows=_staged_rows(False))


def upsert_statement(table_name: str, columns: list[str], differs: str = DIFFERS_FROM_STORED,
                     stored_keys: bool = False) -> sql.Composed:
    """Feast's upsert (ON CONFLICT DO UPDATE of every value column) of the staged rows that satisfy ``differs`` (a
    condition on ``{target}``, ``{staged}``, their value columns ``{stored}`` and ``{new}``), in key order, so
    concurrent writers of overlapping keys lock rows in one order. ``stored_keys``: only the rows of the keys
    ``staged_keys_statement`` found stored."""
    target, staged = sql.Identifier(table_name), sql.Identifier(STAGING_TABLE)
    values = [c for c in columns if c not in KEY_COLUMNS]

    def qualified(table: sql.Identifier, names: list[str]) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{}.{}").format(table, sql.Identifier(c)) for c in names)

    condition = sql.SQL(differs).format(target=target, staged=staged, stored=qualified(target, values),
                                        new=qualified(staged, values))
    return sql.SQL(
        "INSERT INTO {target} ({names}) SELECT {staged_columns} FROM {rows} WHERE {condition} "
        "ORDER BY {staged}.entity_key, {staged}.feature_name "
        "ON CONFLICT (entity_key, feature_name) DO UPDATE SET {assign}"
    ).format(
        target=target, staged=staged, names=sql.SQL(", ").join(map(sql.Identifier, columns)),
        rows=_staged_rows(True if stored_keys else None), staged_columns=qualified(staged, columns),
        condition=condition,
        assign=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values))


class ArrowRows:
    """The table rows of an Arrow batch, byte for byte what ``online_rows`` makes of Feast's conversion of the batch
    to protos (``_convert_arrow_to_proto``), encoded column by column instead of one proto per value: a value is its
    proto field's tag and the little-endian float or the integer's varint (the empty proto for a NULL or NaN, as
    Feast's ``pd.isnull``), its text ``str`` of the number; an entity key is Feast's serialization (version 3) of
    its integer join keys.

    ``of`` returns None for a batch it does not encode, which Feast's conversion then writes: a feature that is not
    a float64, float32, int64 or int32 column of the field's type (Double, Float, Int64, Int32), an integer feature
    with a NULL (Feast reads the column as floats), a join key that is not a NULL-free int64 or int32 column of an
    Int64 or Int32 entity, a view without entities or features or an on-demand one, a NULL timestamp or one outside
    Python's datetimes, a key twice (Feast's path keeps the later row), another key serialization version.
    """

    def __init__(self, keys: np.ndarray, order: np.ndarray, features: list[tuple[str, np.ndarray, bytes]],
                 event_ts: np.ndarray, created_ts: np.ndarray | None):
        self.keys, self.order, self.features = keys, order, features  # order: the rows in key byte order
        self.event_ts, self.created_ts = event_ts, created_ts

    @classmethod
    def of(cls, config: RepoConfig, view: FeatureView, batch: pa.Table) -> ArrowRows | None:
        source = getattr(view, "batch_source", None)
        if (batch.num_rows == 0 or source is None or not view.features or config.entity_key_serialization_version != 3
                or getattr(view, "source_request_sources", None) is not None
                or getattr(view, "source_feature_view_projections", None) is not None):
            return None
        keys = _serialized_keys(batch, {c.name: c.dtype.to_value_type() for c in view.entity_columns})
        event_ts = _microseconds(batch, source.timestamp_field)
        created_ts = _microseconds(batch, source.created_timestamp_column) if source.created_timestamp_column else None
        order = None if keys is None else _key_order(keys)
        if order is None or event_ts is None or (source.created_timestamp_column and created_ts is None):
            return None
        features = []
        for field in view.features:
            kind, proto_field = ARROW_VALUES.get(field.dtype.to_value_type(), (None, ""))
            column = batch.column(field.name) if field.name in batch.column_names else None
            if kind is None or column is None or column.type not in (kind, pa.null()):
                return None
            if column.type == pa.null():  # NULLs only (Ray's batches type a column so when no row has a value)
                values = np.full(batch.num_rows, np.nan)  # Feast: all empty protos
            elif pa.types.is_integer(kind) and column.null_count:
                return None
            else:
                values = column.to_numpy()  # a float NULL -> NaN, as Feast reads it
            zero = ValueProto(**{proto_field: 0}).SerializeToString()  # the tag, then 0's float bytes or varint
            features.append((field.name, values, zero[:-(kind.bit_width // 8 if pa.types.is_floating(kind) else 1)]))
        return cls(keys, order, features, event_ts, created_ts)

    def batches(self, has_value_num: bool, rows: int) -> Iterable[pa.RecordBatch]:
        """The table rows, ``rows`` entity keys at a time (one row per key and feature), the rows of a key together
        and the keys in byte order, as the table's primary key (entity_key, feature_name) orders them: the upsert
        probes that index for each row, and in its order a probe mostly finds the page the one before read (at 1x,
        one write's upsert of unchanged rows took 1.6-1.8 s so, 2.2-2.9 s feature by feature)."""
        names = pa.array([name for name, _, _ in self.features])
        for start in range(0, len(self.order), rows):
            yield self._rows(self.order[start:start + rows], names, has_value_num)

    def _rows(self, part: np.ndarray, names: pa.Array, has_value_num: bool) -> pa.RecordBatch:
        keys = np.ascontiguousarray(self.keys[part])
        count, features = len(keys), len(self.features)
        values, texts, numbers = [], [], []
        for _, column, tag in self.features:
            of_part = column[part]
            values.append(_proto_values(of_part, tag))
            texts.append(pa.array([str(n) if n == n else None for n in of_part.tolist()], pa.string()))
            as_float = of_part.astype(np.float64)
            numbers.append(pa.array(as_float, mask=np.isnan(as_float)))
        take = pa.array((np.arange(features)[None, :] * count + np.arange(count)[:, None]).ravel())  # key by key
        key_bytes = np.repeat(keys, features, axis=0)
        rows = len(key_bytes)
        columns = {
            "entity_key": pa.Array.from_buffers(pa.binary(keys.shape[1]), rows,
                                                [None, pa.py_buffer(key_bytes)]).cast(pa.binary()),
            "feature_name": pa.DictionaryArray.from_arrays(
                pa.array(np.tile(np.arange(features, dtype=np.int32), count)), names).cast(pa.string()),
            "value": pa.concat_arrays(values).take(take), "value_text": pa.concat_arrays(texts).take(take),
            **({"value_num": pa.concat_arrays(numbers).take(take)} if has_value_num else {}),
            "vector_value": pa.nulls(rows, pa.binary()),
            "event_ts": _timestamps(np.repeat(self.event_ts[part], features)),
            "created_ts": (_timestamps(np.repeat(self.created_ts[part], features)) if self.created_ts is not None
                           else pa.nulls(rows, pa.timestamp("us"))),
        }
        return pa.RecordBatch.from_pydict(columns)


def _proto_values(values: np.ndarray, tag: bytes) -> pa.Array:
    """Each value's serialized proto: the field's tag, then the little-endian float, or the varint of the integer's
    two's complement (protobuf's int32 and int64: a negative one takes 10 bytes); the empty proto for NaN."""
    count = len(values)
    if values.dtype.kind == "f":
        body = values.astype(values.dtype.newbyteorder("<")).view(np.uint8).reshape(count, -1)
        keep = np.broadcast_to(~np.isnan(values)[:, None], (count, len(tag) + body.shape[1]))
    else:
        bits = values.astype(np.int64).view(np.uint64)[:, None]
        shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
        body = ((bits >> shifts) & np.uint64(0x7F)).astype(np.uint8)
        size = 1 + (bits >= (np.uint64(1) << shifts[1:])).sum(axis=1)
        body[np.arange(10) < size[:, None] - 1] |= 0x80  # continuation bit on all but the last byte
        keep = np.hstack([np.ones((count, len(tag)), bool), np.arange(10) < size[:, None]])
    encoded = np.hstack([np.broadcast_to(np.frombuffer(tag, np.uint8), (count, len(tag))), body])
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(encoded[keep])])


def _serialized_keys(batch: pa.Table, join_keys: dict[str, ValueType]) -> np.ndarray | None:
    """Feast's serialization of each row's entity key (``serialize_entity_key``, version 3: the sorted key names,
    then each value's type, length and little-endian bytes), one row of bytes per row; None when a key is not an
    integer column it encodes. The first row is checked against Feast's own function."""
    if not join_keys:
        return None
    names, rows = sorted(join_keys), batch.num_rows
    prefix = np.frombuffer(serialize_entity_key_prefix(names, 3), np.uint8)
    blocks, first = [np.broadcast_to(prefix, (rows, len(prefix)))], []
    for name in names:
        kind, proto_field = ARROW_VALUES.get(join_keys[name], (None, ""))
        column = batch.column(name) if name in batch.column_names else None
        if kind is None or not pa.types.is_integer(kind) or column is None or column.type != kind or column.null_count:
            return None
        values = column.to_numpy()
        values = values.astype(values.dtype.newbyteorder("<"))
        header = np.array([join_keys[name].value, values.dtype.itemsize], "<u4").view(np.uint8)
        blocks += [np.broadcast_to(header, (rows, len(header))), values.view(np.uint8).reshape(rows, -1)]
        first.append(ValueProto(**{proto_field: int(values[0])}))
    keys = np.hstack(blocks)
    if serialize_entity_key(EntityKeyProto(join_keys=names, entity_values=first),
                            entity_key_serialization_version=3) != keys[0].tobytes():
        return None
    return keys


def _key_order(keys: np.ndarray) -> np.ndarray | None:
    """The rows' positions in the byte order of their keys; None when a key is there twice."""
    as_bytes = keys.view(np.dtype((np.void, keys.shape[1]))).ravel()
    order = np.argsort(as_bytes, kind="stable")
    ordered = as_bytes[order]
    return None if (ordered[1:] == ordered[:-1]).any() else order


def _microseconds(batch: pa.Table, name: str) -> np.ndarray | None:
    """A timestamp column as naive UTC microseconds, nanoseconds floored as Feast's ``to_pydatetime`` drops them;
    None for a NULL, a value outside Python's datetimes, or a column that is not a timestamp."""
    if name not in batch.column_names:
        return None
    column = batch.column(name)
    if not pa.types.is_timestamp(column.type) or column.null_count:
        return None
    raw = column.cast(pa.int64()).to_numpy()
    if column.type.unit == "ns":  # int64 nanoseconds span 1677-2262, inside datetime's range
        return raw // 1000
    factor = MICROSECONDS[column.type.unit]
    low, high = DATETIME_MICROSECONDS
    if raw.min() < -(-low // factor) or raw.max() > high // factor:  # checked before the product can overflow
        return None
    return raw * factor


def _timestamps(microseconds: np.ndarray) -> pa.Array:
    return pa.array(microseconds, pa.int64()).cast(pa.timestamp("us"))


def write_as_protos(store: Any, config: RepoConfig, view: FeatureView, batch: pa.Table) -> None:
    """Feast's online write of an Arrow batch: one proto per value (``_convert_arrow_to_proto``, which reads only
    a table's first chunk), then the store's ``online_write_batch``."""
    join_keys = {column.name: column.dtype.to_value_type() for column in view.entity_columns}
    data = _convert_arrow_to_proto(batch.combine_chunks(), view, join_keys)
    if data:
        store.online_write_batch(config, view, data, None)


@contextlib.contextmanager
def _rolled_back_on_error(conn: Any) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(errors.Error):
                conn.rollback()
        raise


@contextlib.asynccontextmanager
async def _rolled_back_on_error_async(conn: Any) -> AsyncIterator[None]:
    try:
        yield
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(errors.Error):
                await conn.rollback()
        raise


class BulkPostgreSQLOnlineStore(PostgreSQLOnlineStore):
    def __init__(self) -> None:
        super().__init__()
        # One call at a time on the cached connection: threads share the store (Feast's feature server reads and
        # writes from a thread pool), and a transaction must not take another thread's statements in, nor another
        # thread's error roll it back.
        self._conn_lock = threading.RLock()

    def update(self, config: RepoConfig, tables_to_delete: Sequence[FeatureView],
               tables_to_keep: Sequence[FeatureView], entities_to_delete: Sequence[Entity],
               entities_to_keep: Sequence[Entity], partial: bool) -> None:
        super().update(config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep, partial)
        versioning = config.registry.enable_online_feature_view_versioning
        with self._transaction(config) as (_, cur):
            for table in tables_to_keep:
                primary_key_as_entity_key_index(cur, _table_id(config.project, table, versioning))

    def online_write_batch(self, config: RepoConfig, table: FeatureView, data: WriteRows,
                           progress: Callable[[int], Any] | None) -> None:
        if config.online_store.vector_enabled:  # pgvector columns: Feast's own write
            super().online_write_batch(config, table, data, progress)
            return

        def fill(copy: Any, columns: list[tuple[str, str]], has_value_num: bool) -> None:
            copy.set_types([t for _, t in columns])
            for row in online_rows(config, data, has_value_num):
                copy.write_row(row)

        self._upsert(config, table, fill)
        if progress:
            progress(len(data))

    def online_write_arrow(self, config: RepoConfig, table: FeatureView, batch: pa.Table) -> None:
        """``online_write_batch`` of an Arrow batch of the view's rows (what Feast's Ray engine writes), without a
        proto per value when ``ArrowRows`` encodes it; through Feast's conversion otherwise."""
        rows = None if config.online_store.vector_enabled else ArrowRows.of(config, table, batch)
        if rows is None:
            logger.info("%s: a batch of %d rows ArrowRows does not encode (see its docstring) goes through Feast's "
                        "conversion, one proto per value", table.name, batch.num_rows)
            write_as_protos(self, config, table, batch)
            return

        def fill(copy: Any, columns: list[tuple[str, str]], has_value_num: bool) -> None:
            encoder = None
            for part in rows.batches(has_value_num, ARROW_WRITE_KEYS):
                if encoder is None:
                    encoder = ArrowToPostgresBinaryEncoder(part.schema)
                    copy.write(encoder.write_header())
                copy.write(encoder.write_batch(part))
            copy.write(encoder.finish())

        self._upsert(config, table, fill)

    def _upsert(self, config: RepoConfig, table: FeatureView,
                fill: Callable[[Any, list[tuple[str, str]], bool], None]) -> None:
        """One write: ``fill`` COPYs the rows into a temporary table, which ``_merge`` writes into the table; all of it
        in one transaction, rolled back on any error."""
        table_name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        with self._transaction(config) as (conn, cur):
            has_value_num = self._check_table_has_value_num(cur, table_name, config)
            if getattr(config.online_store, "enable_openai_compatible_store", False) and not has_value_num:
                logger.warning("enable_openai_compatible_store is True but value_num column not found in table "
                               "'%s'. Run `feast apply` to add it. Writing without value_num.", table_name)
            columns = online_columns(has_value_num)
            names = [name for name, _ in columns]
            staging = sql.Identifier(STAGING_TABLE)
            cur.execute(staging_statement(columns))
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                staging, sql.SQL(", ").join(map(sql.Identifier, names)))
            with cur.copy(copy_sql) as copy:
                fill(copy, columns, has_value_num)
            self._merge(conn, cur, table_name, names)

    @contextlib.contextmanager
    def _get_conn(self, config: RepoConfig, autocommit: bool = False) -> Iterator[Any]:
        """Feast's connection, the pool's or the one it caches, with what Feast's ``_get_conn`` leaves out, for every
        caller (Feast's reads, ``update`` and ``teardown`` too): a caller's error rolls its transaction back, so a
        cached connection is not left in a failed one; a pool's connection goes back to the pool also then (Feast's
        is lost, and ``max_conn`` failures leave every later call waiting for the pool); a cached connection found
        closed or broken is replaced (Feast's fails every call after a PostgreSQL restart), and is used by one call
        at a time (threads sharing Feast's could commit, or roll back, each other's statements)."""
        store = config.online_store
        if store.conn_type == ConnectionType.pool:
            if not self._conn_pool:
                self._conn_pool = connection_utils._get_connection_pool(store)
                self._conn_pool.open()
            conn = self._conn_pool.getconn()
            try:  # the pool discards a broken connection it gets back
                conn.set_autocommit(autocommit)
                with _rolled_back_on_error(conn):
                    yield conn
            finally:
                self._conn_pool.putconn(conn)
            return
        with self._conn_lock:
            if self._conn is None or self._conn.closed:  # psycopg closes a connection once it finds it broken
                self._conn = connection_utils._get_conn(store)
            conn = self._conn
            if conn.info.transaction_status != TransactionStatus.IDLE:  # left open by a caller that did not end it
                logger.warning("the online store's connection was left in a transaction; rolling it back")
                conn.rollback()
            conn.set_autocommit(autocommit)
            with _rolled_back_on_error(conn):
                yield conn

    @contextlib.asynccontextmanager
    async def _get_conn_async(self, config: RepoConfig, autocommit: bool = False) -> AsyncIterator[Any]:
        """``_get_conn`` for Feast's async reads."""
        store = config.online_store
        if store.conn_type == ConnectionType.pool:
            if not self._conn_pool_async:
                self._conn_pool_async = await connection_utils._get_connection_pool_async(store)
                await self._conn_pool_async.open()
            conn = await self._conn_pool_async.getconn()
            try:
                await conn.set_autocommit(autocommit)
                async with _rolled_back_on_error_async(conn):
                    yield conn
            finally:
                await self._conn_pool_async.putconn(conn)
            return
        if self._conn_async is None or self._conn_async.closed:
            self._conn_async = await connection_utils._get_conn_async(store)
        conn = self._conn_async
        await conn.set_autocommit(autocommit)  # Feast's async calls are autocommit reads: no transaction to share
        async with _rolled_back_on_error_async(conn):
            yield conn

    @contextlib.contextmanager
    def _transaction(self, config: RepoConfig) -> Iterator[tuple[Any, Any]]:
        """(connection, cursor) of one transaction, committed at the end (``_get_conn`` rolls it back on any error)."""
        with self._get_conn(config) as conn, conn.cursor() as cur:
            yield conn, cur
            conn.commit()

    @staticmethod
    def _merge(conn: Any, cur: Any, table_name: str, names: list[str]) -> None:
        """The staged rows into the table: keys it did not hold by a plain INSERT, the others by the upsert of the
        rows that differ. If another write stores one of the new keys meanwhile, the INSERT fails (a unique
        violation), or the two passes (new keys, then stored ones) deadlock with a write locking in key order: both
        are rolled back to their savepoint and every staged row upserted, in key order."""
        cur.execute(staged_keys_statement(table_name))
        keys = sql.Identifier(KEYS_TABLE)
        cur.execute(sql.SQL("ANALYZE {}").format(keys))  # the semi-joins' estimates: stored keys may be few or all
        cur.execute(sql.SQL("SELECT count(*) FILTER (WHERE stored), count(*) FILTER (WHERE NOT stored) FROM {}"
                            ).format(keys))
        stored, new = cur.fetchone()
        if not new:
            cur.execute(upsert_statement(table_name, names))
            return
        try:
            with conn.transaction():
                cur.execute(insert_statement(table_name, names))
                if stored:
                    cur.execute(upsert_statement(table_name, names, stored_keys=True))
        except (errors.UniqueViolation, errors.DeadlockDetected) as error:
            logger.info("%s: another write stored keys of this one meanwhile (%s); upserting every row instead",
                        table_name, type(error).__name__)
            cur.execute(upsert_statement(table_name, names))
