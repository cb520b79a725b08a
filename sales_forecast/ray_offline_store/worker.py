"""What a Ray worker runs: read one key range of one feature view from PostgreSQL, join its entity rows backward
as of their timestamps.

Ray workers import this module, so it imports no Feast (seconds per worker process) and no pandas; the driver
(driver.py) builds the work, the store (store.py) speaks Feast.

The join rule: a feature row qualifies for an entity row when the keys are equal (no NULL key matches anything),
its timestamp is <= the entity timestamp and, with a ttl, >= entity timestamp - ttl. Among qualifying rows the
latest timestamp wins, then the latest created timestamp, as in Feast's SQL join. Timestamps are int64
nanoseconds since the epoch (UTC); ``NULL_TIME`` marks a missing one.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import adbc_driver_manager
import adbc_driver_postgresql
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NO_MATCH = -1
NULL_TIME = np.iinfo(np.int64).min  # what NaT is in int64 nanoseconds

# Internal column names of a partition's read and of the entity rows shipped to a task (positional, so a
# feature that shares a name with a key or a timestamp column cannot collide).
POSITION = "__pos"  # the entity row's position in the entity set
TS = "__ts"
CREATED = "__created"


def key_column(index: int) -> str:
    return f"__k{index}"


def feature_column(index: int) -> str:
    return f"__f{index}"


# --- reading and types ------------------------------------------------------------------------------------------

_PG_TYPE = b"POSTGRESQL:type"


def read_arrow(connection: str, query: str) -> pa.Table:
    """Run ``query`` with ADBC (binary COPY, no Python object per value), through the driver manager's low-level
    API: its DB-API module imports pyarrow.dataset and pandas, half a second more for every fresh worker."""
    with adbc_driver_postgresql.connect(connection) as database, \
            adbc_driver_manager.AdbcConnection(database) as conn:
        return _run(conn, query)


def _run(conn: adbc_driver_manager.AdbcConnection, query: str) -> pa.Table:
    with adbc_driver_manager.AdbcStatement(conn) as stmt:
        stmt.set_sql_query(query)
        stream, _ = stmt.execute_query()
        return pa.RecordBatchReader._import_from_c(stream.address).read_all()


_OPEN: dict[str, tuple[adbc_driver_manager.AdbcDatabase, adbc_driver_manager.AdbcConnection]] = {}


def read_reusing(connection: str, query: str) -> pa.Table:
    """read_arrow on a connection this worker process keeps open between partitions and requests: a new one costs
    a backend start and ADBC's type catalogue query (about 0.1 s). A failed read is retried once on a new one."""
    for attempt in (1, 2):
        if connection not in _OPEN:
            database = adbc_driver_postgresql.connect(connection)
            _OPEN[connection] = (database, adbc_driver_manager.AdbcConnection(database))
        try:
            return _run(_OPEN[connection][1], query)
        except adbc_driver_manager.Error:
            for handle in reversed(_OPEN.pop(connection)):
                with contextlib.suppress(adbc_driver_manager.Error):
                    handle.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def feast_types(table: pa.Table) -> pa.Table:
    """Feast's PostgreSQL output types: naive UTC microsecond timestamps, numeric (also in arrays) as double, json
    and uuid as text, no field metadata. Other types ADBC hands over as opaque wire bytes (inet, point, ...) are
    refused with the column's name: they would reach a DataFrame or a saved dataset as bytes."""
    columns, fields = [], []
    for field, column in zip(table.schema, table.columns, strict=True):
        pg_type = (field.metadata or {}).get(_PG_TYPE, b"").decode()
        if pg_type in ("numeric", "_numeric"):
            column = pa.chunked_array([_numeric_as_double(chunk) for chunk in column.chunks],
                                      pa.float64() if pg_type == "numeric" else pa.list_(pa.float64()))
        elif isinstance(field.type, pa.UuidType):
            column = pa.array([None if value is None else str(value) for value in column.to_pylist()], pa.string())
        elif isinstance(field.type, pa.JsonType):
            column = pa.chunked_array([chunk.storage for chunk in column.chunks], field.type.storage_type)
        elif isinstance(field.type, pa.BaseExtensionType) or (
                pa.types.is_list(field.type) and isinstance(field.type.value_type, pa.BaseExtensionType)):
            shown = f"{pg_type[1:]}[]" if pg_type.startswith("_") else pg_type or str(field.type)
            raise ValueError(f"column {field.name!r} is of PostgreSQL type {shown}, which the Ray "
                             f"offline store does not read: cast it in the query (for example {field.name}::text)")
        elif pa.types.is_timestamp(field.type) and field.type != pa.timestamp("us"):
            column = column.cast(pa.timestamp("us"), safe=False)
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _numeric_as_double(chunk: pa.Array) -> pa.Array:
    """numeric's text (ADBC's opaque string) as double, also as the items of a numeric[]."""
    if isinstance(chunk, pa.ExtensionArray):
        return chunk.storage.cast(pa.float64())
    if pa.types.is_list(chunk.type) and isinstance(chunk.values, pa.ExtensionArray):
        return pa.ListArray.from_arrays(chunk.offsets, chunk.values.storage.cast(pa.float64()), mask=chunk.is_null())
    return chunk.cast(pa.float64())


def arrow_nanoseconds(values: pa.ChunkedArray) -> np.ndarray:
    """int64 UTC nanoseconds of an Arrow timestamp column (NULL_TIME for NULL); naive values are taken as UTC."""
    as_ns = values.cast(pa.timestamp("ns", tz=values.type.tz))  # raises outside 1677..2262
    return as_ns.cast(pa.int64()).fill_null(NULL_TIME).to_numpy()


# --- the as-of kernel -------------------------------------------------------------------------------------------

def _dense_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    encoded = column.dictionary_encode()
    cardinality = len(encoded.chunk(0).dictionary) if encoded.num_chunks else 0
    indices = pa.chunked_array([chunk.indices for chunk in encoded.chunks], pa.int32())
    return indices.fill_null(-1).to_numpy().astype(np.int64), cardinality


_INT64_MAX = np.iinfo(np.int64).max


def _numeric(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_)


def comparable(entity: pa.ChunkedArray, feature: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """An entity key column and a source key column in one type, equal where PostgreSQL finds them equal.

    Integers compare as int64 (an entity id outside the source column's type, 2^40 against int4, equals nothing,
    as in PostgreSQL; an unsigned value above int64 becomes NULL, which matches nothing); an integer against a
    float compares as float64, as PostgreSQL compares int8 with float8; anything else is cast to the source
    column's type.
    """
    entity_type, feature_type = entity.type, feature.type
    if entity_type == feature_type:
        return entity, feature
    if pa.types.is_integer(entity_type) and pa.types.is_integer(feature_type):
        return _int64(entity), _int64(feature)
    if _numeric(entity_type) and _numeric(feature_type):
        return entity.cast(pa.float64()), feature.cast(pa.float64())
    try:
        return entity.cast(feature_type), feature
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeError(f"an entity key of type {entity_type} cannot be compared with the source's key column of "
                        f"type {feature_type}: {exc}") from exc


def _int64(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if column.type == pa.uint64():
        column = pc.if_else(pc.greater(column, pa.scalar(_INT64_MAX, pa.uint64())), None, column)
    return column.cast(pa.int64())


def key_codes(entity_keys: Sequence[pa.ChunkedArray], feature_keys: Sequence[pa.ChunkedArray],
              n_entities: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense int64 codes for key tuples, equal exactly when every key value is equal; -1 where a key is NULL.

    Each column is encoded on its own (both sides in one type, see ``comparable``) and the codes are combined
    pairwise, re-encoding after each step so the code never overflows: (1, 12) and (11, 2) stay distinct, unlike
    a glued string. Without key columns (a view without entities) every row has code 0: the join is on time alone.
    """
    if not entity_keys:
        return np.zeros(n_entities, np.int64), np.zeros(n_features, np.int64)
    combined: np.ndarray | None = None
    for entity_column, feature_column_ in zip(entity_keys, feature_keys, strict=True):
        entity_column, feature_column_ = comparable(entity_column, feature_column_)
        both = pa.chunked_array(entity_column.chunks + feature_column_.chunks, feature_column_.type)
        codes, cardinality = _dense_codes(both)
        if combined is None:
            combined = codes
            continue
        null = (combined < 0) | (codes < 0)
        combined, _ = _dense_codes(pa.chunked_array([np.where(null, 0, combined * cardinality + codes)]))
        combined[null] = -1
    assert combined is not None
    return combined[:n_entities], combined[n_entities:]


TieBreak = Callable[[np.ndarray], np.ndarray]


def value_ranks(values: pa.Table) -> TieBreak:
    """The tie-break of rows equal in key, event and created timestamp: a rank per row, higher for greater feature
    values compared column by column (NULL and NaN lowest); columns Arrow cannot sort (lists, structs) compare
    by their text."""
    def ranks(rows: np.ndarray) -> np.ndarray:
        picked = feast_types(values.take(pa.array(rows)))
        columns = {f"c{i}": column if _sortable(column.type) else pa.array([str(v) for v in column.to_pylist()])
                   for i, column in enumerate(picked.columns)}
        if not columns:
            return np.zeros(len(rows), np.int64)
        order = pc.sort_indices(pa.table(columns), sort_keys=[(name, "ascending", "at_start") for name in columns])
        rank = np.empty(len(rows), np.int64)
        rank[order.to_numpy()] = np.arange(len(rows))
        return rank
    return ranks


def _sortable(type_: pa.DataType) -> bool:
    return not (pa.types.is_nested(type_) or pa.types.is_dictionary(type_) or isinstance(type_, pa.ExtensionType))


def _ranks(values: np.ndarray) -> tuple[np.ndarray, np.int64]:
    """Each value's rank among the distinct values, and their count: np.unique's inverse, by hashing and sorting
    only the distinct values (a few hundred weekly timestamps for millions of rows)."""
    encoded = pa.array(values).dictionary_encode()
    distinct = encoded.dictionary.to_numpy()
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(distinct, kind="stable")] = np.arange(len(distinct))
    return rank[encoded.indices.to_numpy()], np.int64(len(distinct))


def asof_match(
    entity_codes: np.ndarray,
    entity_ts: np.ndarray,
    feature_codes: np.ndarray,
    feature_ts: np.ndarray,
    feature_created: np.ndarray | None,
    ttl_ns: int | None,
    tie_break: TieBreak | None = None,
    created_at_most_entity: bool = False,
) -> np.ndarray:
    """For each entity row, the index of the feature row it joins to, or NO_MATCH.

    Feature rows are ordered by (key, timestamp, created, tie-break rank); (key, timestamp) is packed into one
    int64 (the key code times the number of distinct timestamps plus the timestamp's rank), so one searchsorted
    finds, for every entity row, the last feature row at or before it with the same key. ``tie_break`` ranks rows
    equal in (key, timestamp, created) so the pick never depends on the order PostgreSQL returned them in; it is
    called only when there are such rows. ``created_at_most_entity`` (filter_by_created_timestamp) also requires
    created <= the entity timestamp: a candidate created later steps back to the previous row of its key.
    """
    result = np.full(len(entity_codes), NO_MATCH, dtype=np.int64)
    usable = (feature_codes >= 0) & (feature_ts != NULL_TIME)
    if not usable.all():
        kept = np.flatnonzero(usable)
        if kept.size == 0:
            return result
        inner = asof_match(entity_codes, entity_ts, feature_codes[kept], feature_ts[kept],
                           None if feature_created is None else feature_created[kept], ttl_ns,
                           None if tie_break is None else lambda rows: tie_break(kept[rows]), created_at_most_entity)
        return np.where(inner >= 0, kept[np.maximum(inner, 0)], NO_MATCH)
    if len(feature_codes) == 0 or len(entity_codes) == 0:
        return result

    time_rank, span = _ranks(np.concatenate([feature_ts, entity_ts]))
    feature_packed = feature_codes * span + time_rank[: len(feature_ts)]
    entity_packed = entity_codes * span + time_rank[len(feature_ts):]

    sort_keys = [feature_packed] if feature_created is None else [feature_created, feature_packed]
    order = np.lexsort(sort_keys)
    if tie_break is not None:
        same = np.ones(len(order) - 1, dtype=bool)
        for key in sort_keys:
            ordered = key[order]
            same &= ordered[1:] == ordered[:-1]
        if same.any():
            tied = order[np.flatnonzero(np.r_[same, False] | np.r_[False, same])]
            rank = np.zeros(len(order), np.int64)
            rank[tied] = tie_break(tied)
            order = np.lexsort([rank, *sort_keys])
    sorted_packed = feature_packed[order]

    candidate = np.searchsorted(sorted_packed, entity_packed, side="right") - 1
    usable_entity = (entity_codes >= 0) & (entity_ts != NULL_TIME)
    while True:
        found = (candidate >= 0) & usable_entity
        picked = order[np.maximum(candidate, 0)]
        found &= feature_codes[picked] == entity_codes
        if ttl_ns:
            found &= feature_ts[picked] >= entity_ts - ttl_ns
        if not created_at_most_entity or feature_created is None:
            break
        created_late = found & (feature_created[picked] > entity_ts)
        if not created_late.any():
            break
        candidate[created_late] -= 1  # rows of the same key, older or created earlier, one step at a time
    result[found] = picked[found]
    return result


# --- one task ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionTask:
    connection: str  # libpq connection string
    query: str  # from driver.feature_query
    key_count: int
    has_created: bool
    output_names: tuple[str, ...]
    ttl_ns: int | None
    tie_order: tuple[int, ...]  # the features (by position) in the view's schema order: the tie-break's order
    created_at_most_entity: bool = False  # filter_by_created_timestamp
    created_output: str | None = None  # also return the picked row's created timestamp, as this column


def join_partition(task: PartitionTask, entities: pa.Table, reuse_connection: bool = False) -> pa.Table:
    """The features of each entity row of the partition (NULL where no row qualifies), with its position.
    ``reuse_connection``: in a Ray worker, keep the PostgreSQL connection for the next partition."""
    features = (read_reusing if reuse_connection else read_arrow)(task.connection, task.query)
    entity_keys = [entities.column(key_column(i)) for i in range(task.key_count)]
    feature_keys = feast_types(features.select([key_column(i) for i in range(task.key_count)])).columns
    entity_codes, feature_codes = key_codes(entity_keys, feature_keys, entities.num_rows, features.num_rows)
    created = arrow_nanoseconds(features.column(CREATED)) if task.has_created else None
    values = features.select([feature_column(i) for i in range(len(task.output_names))])
    picked = asof_match(entity_codes, entities.column(TS).to_numpy(), feature_codes,
                        arrow_nanoseconds(features.column(TS)), created, task.ttl_ns,
                        tie_break=value_ranks(values.select([values.column_names[i] for i in task.tie_order])),
                        created_at_most_entity=task.created_at_most_entity)
    names = list(task.output_names)
    if task.created_output:
        values, names = values.append_column(CREATED, features.column(CREATED)), [*names, task.created_output]
    joined = feast_types(values.take(pa.array(picked, mask=picked < 0)))
    position = POSITION
    while position in names:  # a feature with the internal name: Arrow tables with one name twice do not pickle
        position += "_"
    return joined.rename_columns(names).append_column(position, entities.column(POSITION))


def split_positions(part: pa.Table) -> tuple[np.ndarray, pa.Table]:
    """A join_partition result's entity positions and its features. The positions are its last column, taken by
    index: a feature may have the internal column's name (the positions' column is then renamed)."""
    last = part.num_columns - 1
    return part.column(last).to_numpy(), part.remove_column(last)


class PartitionReadError(RuntimeError):
    """A partition's read failed in a Ray worker. ADBC's errors cannot cross to the caller (their unpickling fails, and
    the caller got Ray's "Failed to deserialize exception"), so their message comes in this one."""


@contextlib.contextmanager
def _crossing_ray() -> Iterator[None]:
    try:
        yield
    except adbc_driver_manager.Error as exc:
        raise PartitionReadError(f"{type(exc).__name__}: {exc}") from None


def join_in_worker(task: PartitionTask, entities: pa.Table) -> pa.Table:
    """join_partition as a plain Ray task (a worker process of this job, kept for its other partitions)."""
    with _crossing_ray():
        return join_partition(task, entities, reuse_connection=True)


class JoinWorker:
    """A Ray actor running join_partition, kept alive on the cluster between requests (driver.join_workers), so
    a request does not wait for worker processes to start and import this module."""

    def join(self, task: PartitionTask, entities: pa.Table) -> pa.Table:
        try:
            with _crossing_ray():
                return join_partition(task, entities, reuse_connection=True)
        finally:  # an idle worker keeps no partition's memory: Arrow's pool and the C heap (NumPy's arrays)
            pa.default_memory_pool().release_unused()
            _malloc_trim()


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
