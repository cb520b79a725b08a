"""The driver side of a retrieval, without Feast: what to read per view (ViewPlan), key-range partitions of the
entity rows, the pushed-down SQL of each partition, connecting to Ray, and putting the partitions' features back in
the entity set's row order; also how many blocks the materialization's latest rows are cut into (step 1 starts one
Ray worker per block before it imports Feast).

Each partition is a contiguous range of key tuples (in key order), so its feature rows are one key-range predicate
in PostgreSQL (served by a (keys, timestamp) index) and no shuffle is needed: every feature row of a key is read by
the one task that holds that key's entity rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from sales_forecast.config import load_ray_variables
from sales_forecast.errors import PipelineError
from sales_forecast.ray_offline_store import worker
from sales_forecast.ray_offline_store.worker import (
    CREATED,
    NULL_TIME,
    POSITION,
    TS,
    PartitionTask,
    feature_column,
    join_partition,
    key_column,
    split_positions,
)


@dataclass(frozen=True)
class ViewPlan:
    """One feature view of a request: its source columns and the output column of each feature."""

    name: str  # projection name, the prefix of full feature names
    source_sql: str  # the FROM expression: a quoted table or a parenthesized query
    join_keys: tuple[str, ...]  # columns of the entity set
    source_keys: tuple[str, ...]  # the matching source columns
    timestamp_field: str
    created_timestamp_column: str | None
    features: tuple[str, ...]  # source columns
    output_names: tuple[str, ...]
    ttl_seconds: int  # whole seconds, as Feast's SQL uses it; 0: no lower bound
    tie_order: tuple[int, ...] = ()  # the features (positions) in the view's schema order, for exact ties
    created_at_most_entity: bool = False  # filter_by_created_timestamp: rows created after the entity time do not count
    created_output: str | None = None  # also output the picked row's created timestamp (a date-range retrieval)

    @property
    def ttl_ns(self) -> int | None:
        return self.ttl_seconds * 1_000_000_000 if self.ttl_seconds > 0 else None

    @property
    def has_created(self) -> bool:
        return self.created_timestamp_column is not None


@dataclass(frozen=True)
class EntityRows:
    """What the join needs of the entity set: the join key columns as given, and UTC nanosecond timestamps."""

    keys: pa.Table
    timestamps_ns: np.ndarray  # NULL_TIME where missing

    @property
    def num_rows(self) -> int:
        return len(self.timestamps_ns)


# --- partitioning -----------------------------------------------------------------------------------------------

# Types whose Python order is PostgreSQL's order (text compared with COLLATE "C": code point order).
_RANGE_SAFE = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
               pa.types.is_large_string)


@dataclass(frozen=True)
class KeyRange:
    low: tuple[Any, ...]  # inclusive
    high: tuple[Any, ...]  # inclusive


@dataclass(frozen=True)
class Partitioning:
    assignment: np.ndarray  # partition of each entity row; -1: the row can match nothing (NULL key or time)
    ranges: list[KeyRange | None]  # None: no key predicate (a single partition)

    @property
    def count(self) -> int:
        return len(self.ranges)


def range_safe(keys: pa.Table) -> bool:
    return keys.num_columns > 0 and all(any(check(field.type) for check in _RANGE_SAFE) for field in keys.schema)


def partition_by_key(keys: pa.Table, usable: np.ndarray, count: int) -> Partitioning:
    """Split the usable rows into at most ``count`` key ranges of about equal row counts (hashing and small sorts:
    no sort of the rows themselves); one range is still bounded by the lowest and highest key."""
    usable = usable & _non_null(keys)
    assignment = np.full(keys.num_rows, -1, dtype=np.int64)
    count = max(count, 1)
    if not range_safe(keys) or not usable.any():
        assignment[usable] = 0
        return Partitioning(assignment, [None])

    rows = np.flatnonzero(usable)
    columns = [(column if len(rows) == keys.num_rows else column.take(pa.array(rows))).combine_chunks()
               for column in keys.columns]
    group = None  # each row's key tuple as a dense code, in key order
    for column in columns:
        codes, cardinality = _ordered_codes(column)
        group = codes if group is None else _ordered_codes(pa.array(group * cardinality + codes))[0]
    assert group is not None
    sizes = np.bincount(group)
    rows_before = np.cumsum(sizes) - sizes
    part_of_group = rows_before * count // len(rows)
    # a huge group can leave a partition empty: renumber the non-empty ones 0..n-1
    used, part_of_group = np.unique(part_of_group, return_inverse=True)
    assignment[rows] = part_of_group[group]

    first = np.searchsorted(part_of_group, np.arange(len(used)), side="left")
    last = np.searchsorted(part_of_group, np.arange(len(used)), side="right") - 1

    def key_of(group_code: int) -> tuple[Any, ...]:
        row = int(np.argmax(group == group_code))
        return tuple(column[row].as_py() for column in columns)

    ranges: list[KeyRange | None] = [KeyRange(key_of(lo), key_of(hi)) for lo, hi in zip(first, last, strict=True)]
    return Partitioning(assignment, ranges)


def _ordered_codes(column: pa.Array) -> tuple[np.ndarray, int]:
    """Dense codes of the values in their sort order (Python's, and PostgreSQL's for range-safe types)."""
    encoded = column.dictionary_encode()
    rank = np.empty(len(encoded.dictionary), dtype=np.int64)
    rank[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(encoded.dictionary))
    return rank[encoded.indices.to_numpy()], len(encoded.dictionary)


def _non_null(keys: pa.Table) -> np.ndarray:
    mask = np.ones(keys.num_rows, dtype=bool)
    for column in keys.columns:
        if column.null_count:
            mask &= column.is_valid().to_numpy(zero_copy_only=False)
    return mask


@dataclass(frozen=True)
class Parallelism:
    partitions: int | None  # key ranges per view; None: from the row count and the cluster's CPUs
    rows_per_partition: int  # with partitions None: at most this many entity rows per task
    min_rows_per_partition: int  # with partitions None: fewer rows than this are not split further

    def partitions_for(self, rows: int, cpus: int) -> int:
        if self.partitions is not None:
            return self.partitions
        by_size = math.ceil(rows / self.rows_per_partition)
        return max(1, min(max(cpus, by_size), math.ceil(rows / self.min_rows_per_partition)))


# --- the materialization's online writes: how many blocks of latest rows ----------------------------------------

def write_concurrency(engine: Any) -> int:
    """How many online writes Feast's Ray engine runs at once (its RayWriteNode's rule): ``write_concurrency``, else
    ``max_workers``, else 1. ``engine`` is the repo's batch_engine, its parsed config or its yaml mapping."""
    for key in ("write_concurrency", "max_workers"):
        value = engine.get(key) if isinstance(engine, dict) else getattr(engine, key, None)
        if value is not None:
            return value
    return 1


def block_rows(rows: int, batch_rows: int | None, concurrency: int) -> int:
    """Rows per block of ``LatestRowsJob``: a whole number of write batches, so that ``rows`` make one block per
    write that can run at once; all of them without a batch size."""
    if not batch_rows:
        return max(rows, 1)
    batches = -(-rows // batch_rows)
    return batch_rows * max(1, -(-batches // concurrency))


def write_blocks(rows: int, batch_rows: int | None, concurrency: int) -> int:
    """How many blocks ``LatestRowsJob`` cuts ``rows`` latest rows into (writes that run at once)."""
    return max(1, -(-rows // block_rows(rows, batch_rows, concurrency)))


# --- the pushed-down read of one partition ----------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class TimeWindow:
    """Feature rows a partition can use: timestamp in [low, high] (UTC ns); low None: unbounded."""

    low_ns: int | None
    high_ns: int


def _timestamp(ns: int, round_up: bool) -> sql.Composable:
    # PostgreSQL keeps microseconds: the whole-microsecond bound that keeps exactly the same rows
    micros = -(-ns // 1000) if round_up else ns // 1000
    return sql.Literal(_EPOCH + dt.timedelta(microseconds=micros))


def _row(items: list[sql.Composable]) -> sql.Composable:
    return items[0] if len(items) == 1 else sql.SQL("ROW({})").format(sql.SQL(", ").join(items))


def _key_predicate(plan: ViewPlan, key_range: KeyRange, text_keys: tuple[bool, ...]) -> sql.Composable:
    """``keys >= low AND keys <= high``: a plain comparison for one key (served by the (key, timestamp) index),
    a row comparison for several; text compares in code point order, the order of Python's sort.

    For several keys the first key's range is repeated on its own: it selects nothing more, but PostgreSQL does not
    estimate a row comparison from the column statistics (tenfold too many rows for a 2% range), so without it every
    partition of a large view was a full scan (10x: 1.1 s each against 0.05 s through the index)."""
    columns = [sql.SQL('({} COLLATE "C")').format(sql.Identifier(name)) if text else sql.Identifier(name)
               for name, text in zip(plan.source_keys, text_keys, strict=True)]
    low, high = [sql.Literal(v) for v in key_range.low], [sql.Literal(v) for v in key_range.high]
    predicate = _between(_row(columns), _row(low), _row(high))
    if len(columns) == 1:
        return predicate
    return sql.SQL("{} AND {}").format(predicate, _between(columns[0], low[0], high[0]))


def _between(value: sql.Composable, low: sql.Composable, high: sql.Composable) -> sql.Composable:
    return sql.SQL("{0} >= {1} AND {0} <= {2}").format(value, low, high)


def feature_query(plan: ViewPlan, window: TimeWindow | None, key_range: KeyRange | None,
                  text_keys: tuple[bool, ...]) -> str:
    """SELECT the view's keys, timestamps and requested features; ``window`` None selects no rows.

    Output columns are renamed positionally (__k0.., __ts, __created, __f0..).
    """
    ts = sql.Identifier(plan.timestamp_field)
    selected = [sql.SQL("{} AS {}").format(sql.Identifier(name), sql.Identifier(key_column(i)))
                for i, name in enumerate(plan.source_keys)]
    # a naive column is read in the session's TimeZone, as PostgreSQL compares it with the timestamptz bounds
    selected.append(sql.SQL("{}::timestamptz AS {}").format(ts, sql.Identifier(TS)))
    if plan.created_timestamp_column:
        selected.append(sql.SQL("{}::timestamptz AS {}").format(sql.Identifier(plan.created_timestamp_column),
                                                                sql.Identifier(CREATED)))
    selected += [sql.SQL("{} AS {}").format(sql.Identifier(name), sql.Identifier(feature_column(i)))
                 for i, name in enumerate(plan.features)]

    conditions: list[sql.Composable] = []
    if window is None:
        conditions.append(sql.SQL("FALSE"))
    else:
        conditions.append(sql.SQL("{} <= {}").format(ts, _timestamp(window.high_ns, round_up=False)))
        if window.low_ns is not None:
            conditions.append(sql.SQL("{} >= {}").format(ts, _timestamp(window.low_ns, round_up=True)))
    if key_range is not None:
        conditions.append(_key_predicate(plan, key_range, text_keys))
    query = sql.SQL("SELECT {columns} FROM {source} AS source WHERE {conditions}").format(
        columns=sql.SQL(", ").join(selected),
        source=sql.SQL(plan.source_sql),
        conditions=sql.SQL(" AND ").join(conditions),
    )
    return query.as_string()


def date_range_query(plans: list[ViewPlan], start_ns: int, end_ns: int) -> str:
    """The entity set of a date-range retrieval: every distinct (event timestamp, join keys) of the views' rows
    with start <= timestamp <= end, ordered. Views without entities add rows only when no view has keys; views
    with keys must share them (a row of one view is then an entity row of the others)."""
    keyed = [plan for plan in plans if plan.join_keys]
    if len({frozenset(plan.join_keys) for plan in keyed}) > 1:
        raise ValueError("a date-range retrieval (no entity set) needs feature views with the same join keys, since "
                         "each view's rows are the entity rows of the others; got "
                         + "; ".join(f"{plan.name}: {', '.join(plan.join_keys)}" for plan in keyed)
                         + ". Pass an entity set instead.")
    join_keys = keyed[0].join_keys if keyed else ()
    selects = []
    for plan in keyed or plans:
        source_key = dict(zip(plan.join_keys, plan.source_keys, strict=True))
        ts = sql.Identifier(plan.timestamp_field)
        columns = [sql.SQL("{}::timestamptz AS event_timestamp").format(ts)]
        columns += [sql.SQL("{} AS {}").format(sql.Identifier(source_key[key]), sql.Identifier(key))
                    for key in join_keys]
        selects.append(sql.SQL("SELECT DISTINCT {columns} FROM {source} AS source WHERE {ts} >= {low} AND "
                               "{ts} <= {high}").format(
            columns=sql.SQL(", ").join(columns), source=sql.SQL(plan.source_sql), ts=ts,
            low=_timestamp(start_ns, round_up=True), high=_timestamp(end_ns, round_up=False)))
    order = sql.SQL(", ").join(sql.SQL(str(position)) for position in range(1, len(join_keys) + 2))
    return sql.SQL("{} ORDER BY {}").format(sql.SQL(" UNION ").join(selects), order).as_string()


# --- Ray --------------------------------------------------------------------------------------------------------

class RayConnectionError(PipelineError):
    pass


def ray_target(ray_address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``local``, or the address of the cluster to join: FEAST_RAY_EXECUTION_MODE decides (local / remote), then
    ``ray_address`` or RAY_ADDRESS means remote (never Ray Client), else local. The two variables are read through
    sales_forecast.config (``environ``, default os.environ), which refuses kuberay and ray:// itself; no other
    variable of this project is read or checked, so the store works in any Feast repo."""
    env_address, mode = load_ray_variables(environ)
    address = ray_address or env_address
    if mode == "local" or (mode != "remote" and not address):
        return "local"
    if not address:
        raise RayConnectionError("FEAST_RAY_EXECUTION_MODE=remote needs ray_address or RAY_ADDRESS")
    if address.startswith("ray://"):
        raise RayConnectionError(f"Ray Client ({address}) is not supported (every result would cross the client "
                                 "proxy, and Feast's Ray engine fails through it on Ray 2.58): run the step as a "
                                 "Ray job, where RAY_ADDRESS is the cluster's GCS address")
    return address


def ensure_ray(ray_address: str | None, ray_conf: dict[str, Any] | None) -> bool:
    """An already-initialized Ray is used as is (a Ray job's driver, or Feast's engine in the same process);
    otherwise attach to the cluster, or start a local Ray. True when the cluster outlives this process (it was
    not started by it), so join workers can stay warm on it between requests."""
    import ray
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        raise RayConnectionError("this process is connected through Ray Client (ray://), which the Ray offline "
                                 "store does not support: run the step as a Ray job on the cluster")
    if not ray.is_initialized():
        target = ray_target(ray_address)
        options: dict[str, Any] = {"address": target, "include_dashboard": False,
                                   "logging_level": logging.WARNING, "ignore_reinit_error": True}
        if target != "local":  # a local Ray counts the CPUs itself, within a container's CPU quota
            options.pop("include_dashboard")
        options.update(ray_conf or {})
        ray.init(**options)
    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


POOL_NAMESPACE = "sales_forecast_ray_offline_store"
POOL_PREFIX = "pit-join-"


@cache
def code_version() -> str:
    """The join workers' code: a pool started by other code is replaced, never used."""
    return hashlib.sha1(Path(worker.__file__).read_bytes()).hexdigest()[:12]


def join_workers(count: int) -> list[Any]:
    """``count`` named, detached join workers on the cluster (worker.JoinWorker), created on first use and then
    reused by every later request, from any process: a request pays no worker start-up (a Python process
    importing Ray, NumPy, Arrow and ADBC, seconds on a busy machine). They reserve no CPU (num_cpus=0), are
    restarted if they die, and a pool of another code version is removed."""
    import ray

    version = code_version()
    actor = _actor_class()
    workers = [actor.options(name=f"{POOL_PREFIX}{version}-{index}", namespace=POOL_NAMESPACE, lifetime="detached",
                             get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=2,
                             scheduling_strategy="SPREAD").remote() for index in range(count)]
    for named in ray.util.list_named_actors(all_namespaces=True):
        name = named.get("name", "") if isinstance(named, dict) else str(named)
        if (isinstance(named, dict) and named.get("namespace") == POOL_NAMESPACE and name.startswith(POOL_PREFIX)
                and not name.startswith(f"{POOL_PREFIX}{version}-")):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=POOL_NAMESPACE))
    return workers


@cache
def _actor_class() -> Any:
    import ray

    return ray.remote(worker.JoinWorker)


@cache
def _remote_join() -> Any:
    import ray

    return ray.remote(worker.join_in_worker)


# --- running a request ------------------------------------------------------------------------------------------

def _window(plan: ViewPlan, timestamps_ns: np.ndarray) -> TimeWindow | None:
    """The feature rows the partition's entity rows can reach (Feast's pushdown, per partition)."""
    valid = timestamps_ns[timestamps_ns != NULL_TIME]
    if valid.size == 0:
        return None
    low, high = int(valid.min()), int(valid.max())
    return TimeWindow(low_ns=None if plan.ttl_ns is None else low - plan.ttl_ns, high_ns=high)


@dataclass(frozen=True)
class Partition:
    """Entity rows of one view that one Ray call joins: their positions in the entity set, the view's key columns
    and UTC nanoseconds for those rows, and the key range whose feature rows the call reads (None: all keys)."""

    positions: np.ndarray
    keys: list[pa.Array | pa.ChunkedArray]
    timestamps_ns: np.ndarray
    key_range: KeyRange | None


def partition_task(plan: ViewPlan, connection: str, part: Partition) -> tuple[PartitionTask, pa.Table]:
    text_keys = tuple(pa.types.is_string(k.type) or pa.types.is_large_string(k.type) for k in part.keys)
    window = _window(plan, part.timestamps_ns)
    task = PartitionTask(connection=connection, query=feature_query(plan, window, part.key_range, text_keys),
                         key_count=len(plan.join_keys), has_created=plan.has_created,
                         output_names=plan.output_names, ttl_ns=plan.ttl_ns,
                         tie_order=plan.tie_order or tuple(range(len(plan.features))),
                         created_at_most_entity=plan.created_at_most_entity and plan.has_created,
                         created_output=plan.created_output if plan.has_created else None)
    columns = {POSITION: pa.array(part.positions, pa.int64()), TS: pa.array(part.timestamps_ns, pa.int64())}
    columns.update({key_column(i): key for i, key in enumerate(part.keys)})
    return task, pa.table(columns)


def key_partitions(keys: pa.Table, timestamps_ns: np.ndarray, count: int) -> list[Partition]:
    """The rows in at most ``count`` key ranges (positions: row numbers in ``keys``); rows that can match
    nothing (a NULL key or time) are in none."""
    partitioning = partition_by_key(keys, timestamps_ns != NULL_TIME, count)
    order = np.argsort(partitioning.assignment, kind="stable")
    bounds = np.searchsorted(partitioning.assignment[order], np.arange(partitioning.count + 1))
    result = []
    for index, key_range in enumerate(partitioning.ranges):
        rows = order[bounds[index]:bounds[index + 1]]
        result.append(Partition(positions=rows, keys=[key.take(pa.array(rows)) for key in keys.columns],
                                timestamps_ns=timestamps_ns[rows], key_range=key_range))
    return result


def view_tasks(plan: ViewPlan, entities: EntityRows, connection: str, partitions: int,
               ) -> list[tuple[PartitionTask, pa.Table]]:
    keys = entities.keys.select(list(plan.join_keys))
    return [partition_task(plan, connection, part) for part in key_partitions(keys, entities.timestamps_ns, partitions)]


class StreamCutter:
    """Cuts one view's partitions from an entity set that arrives in batches, so joins start while the rest is
    still being read (a SQL entity set's query can take seconds in PostgreSQL).

    While the arriving keys are in key order (a query ordered by the view's keys, or reading a table stored in
    that order), a key-range partition is cut whenever ``target`` rows are pending, at a key boundary, so the
    partitions' ranges are disjoint; the target grows with the rows seen (a few partitions per CPU), from
    ``min_rows`` up to ``max_rows``. Where the keys start again lower, the run ends: a long run's last rows become a
    partition, a run shorter than ``min_rows`` is left for the end (a sequential scan that PostgreSQL started
    near the table's end to share it with another scan, then wrapped around). At the second short run (an order by
    time, or none) the streaming stops. Rows left for the end are partitioned like an entity set read at once.
    Order only decides how narrow the key ranges are: every partition reads its own range, so the result never
    depends on it. Views whose keys have no PostgreSQL-compatible order, or no keys, are partitioned at the end.
    """

    def __init__(self, plan: ViewPlan, cpus: int, min_rows: int, max_rows: int):
        self.plan, self.cpus, self.min_rows, self.max_rows = plan, cpus, min_rows, max_rows
        self.ordered: bool | None = None
        self.run: list[tuple[np.ndarray, pa.Table, np.ndarray]] = []  # the current run's rows not yet cut
        self.left: list[tuple[np.ndarray, pa.Table, np.ndarray]] = []  # rows for the end
        self.run_pending = self.run_rows = self.seen = self.short_runs = 0
        self.emitted = False
        self.last: pa.Table | None = None  # the last key of the current run

    def add(self, positions: np.ndarray, keys: pa.Table, timestamps_ns: np.ndarray) -> list[Partition]:
        if not self.plan.join_keys:  # joined on time alone: one partition at the end
            usable = timestamps_ns != NULL_TIME
            self.left.append((positions[usable], keys.select([]), timestamps_ns[usable]))
            return []
        keys = keys.select(list(self.plan.join_keys))
        usable = (timestamps_ns != NULL_TIME) & _non_null(keys)
        if not usable.all():
            rows = np.flatnonzero(usable)
            positions, keys, timestamps_ns = positions[rows], keys.take(pa.array(rows)), timestamps_ns[rows]
        if self.ordered is None:
            self.ordered = range_safe(keys)
        parts: list[Partition] = []
        while self.ordered and len(positions):
            lower = _first_lower(keys, self.last)  # where the keys start again lower, if they do
            end = len(positions) if lower is None else lower
            if end:
                self.run.append((positions[:end], keys.slice(0, end), timestamps_ns[:end]))
                self.run_pending, self.run_rows, self.seen = self.run_pending + end, self.run_rows + end, \
                    self.seen + end
                self.last = keys.slice(end - 1, 1)
            if lower is None:
                return parts + self._cut()
            parts += self._end_run()
            positions, keys, timestamps_ns = positions[lower:], keys.slice(lower), timestamps_ns[lower:]
        if len(positions):
            self.left.append((positions, keys, timestamps_ns))
        return parts

    def _cut(self) -> list[Partition]:
        """A partition of the current run's pending rows, up to the last complete key, once enough are pending."""
        target = min(self.max_rows, max(self.min_rows, self.seen // (2 * self.cpus)))
        if self.run_pending < target:
            return []
        positions, keys, stamps = _joined(self.run)
        last_key = _equal_to_last(keys)
        cut = int(np.argmax(last_key)) if not last_key.all() else len(positions)
        self.run = [(positions[cut:], keys.slice(cut), stamps[cut:])] if cut < len(positions) else []
        self.run_pending = len(positions) - cut
        self.emitted = True
        return [_ordered_partition(positions[:cut], keys.slice(0, cut), stamps[:cut])]

    def _end_run(self) -> list[Partition]:
        parts: list[Partition] = []
        if self.run_rows >= self.min_rows:
            if self.run:
                parts, self.emitted = [_ordered_partition(*_joined(self.run))], True
        else:
            self.left += self.run
            self.short_runs += 1
            self.ordered = self.short_runs < 2
        self.run, self.run_pending, self.run_rows, self.last = [], 0, 0, None
        return parts

    def finish(self) -> list[Partition]:
        """The partitions of the rows still pending, the current run's and those left for the end (each cut in up
        to one per CPU, by key); one empty partition when there were no rows at all (it gives the features'
        columns their types)."""
        if not self.plan.join_keys:
            positions, _, stamps = _joined(self.left, keyless=True)
            return [Partition(positions=positions, keys=[], timestamps_ns=stamps, key_range=None)]
        parts = []
        for rows in (self.run, self.left):
            if rows:
                positions, keys, stamps = _joined(rows)
                count = max(1, min(self.cpus, len(positions) // self.min_rows))
                parts += [Partition(positions=positions[part.positions], keys=part.keys,
                                    timestamps_ns=part.timestamps_ns, key_range=part.key_range)
                          for part in key_partitions(keys, stamps, count) if len(part.positions)]
        if not parts and not self.emitted:
            empty = [pa.array([], pa.null()) for _ in self.plan.join_keys]
            parts.append(Partition(np.zeros(0, np.int64), empty, np.zeros(0, np.int64), None))
        self.run, self.left = [], []
        return parts


def _joined(rows: list[tuple[np.ndarray, pa.Table, np.ndarray]], keyless: bool = False,
            ) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    positions = np.concatenate([p for p, _, _ in rows] or [np.zeros(0, np.int64)])
    stamps = np.concatenate([t for _, _, t in rows] or [np.zeros(0, np.int64)])
    keys = pa.table({}) if keyless or not rows else pa.concat_tables([k for _, k, _ in rows])
    return positions, keys, stamps


def _first_lower(keys: pa.Table, last: pa.Table | None) -> int | None:
    """The first row whose key tuple is lower than the one before it (``last`` before the first row), if any."""
    rows = keys if last is None else pa.concat_tables([last, keys])
    if rows.num_rows < 2:
        return None
    before, after = rows.slice(0, rows.num_rows - 1), rows.slice(1)
    less = np.zeros(rows.num_rows - 1, dtype=bool)
    equal = np.ones(rows.num_rows - 1, dtype=bool)
    for a, b in zip(before.columns, after.columns, strict=True):
        less |= equal & pc.less(a, b).to_numpy(zero_copy_only=False)
        equal &= pc.equal(a, b).to_numpy(zero_copy_only=False)
    lower = np.flatnonzero(~(less | equal))
    if not lower.size:
        return None
    return int(lower[0]) + (0 if last is not None else 1)


def _equal_to_last(keys: pa.Table) -> np.ndarray:
    equal = np.ones(keys.num_rows, dtype=bool)
    for column in keys.columns:
        equal &= pc.equal(column, column[keys.num_rows - 1]).to_numpy(zero_copy_only=False)
    return equal


def _ordered_partition(positions: np.ndarray, keys: pa.Table, stamps: np.ndarray) -> Partition:
    last = keys.num_rows - 1
    key_range = KeyRange(tuple(c[0].as_py() for c in keys.columns), tuple(c[last].as_py() for c in keys.columns))
    return Partition(positions=positions, keys=list(keys.columns), timestamps_ns=stamps, key_range=key_range)


def _fixed_width(type_: pa.DataType) -> bool:
    return (pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)
            or pa.types.is_timestamp(type_))


def position_order(positions: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts a partition result's entity positions; None when they already ascend."""
    return None if len(positions) < 2 or (np.diff(positions) > 0).all() else np.argsort(positions)


BLOCK_ROWS = 1 << 20  # the output buffers' block size: they grow by blocks while the entity set arrives


class InEntityOrder:
    """One view's features put back in the entity set's row order as its partitions arrive, so no partition's
    result is kept once copied: fixed-width columns go straight into buffers of BLOCK_ROWS rows per column (with
    a validity mask; blocks are added while the entity set is still arriving, never copied); other columns (text,
    lists...) are gathered at the end. Rows no partition holds stay NULL."""

    def __init__(self) -> None:
        self.types: dict[str, pa.DataType] = {}
        self.values: dict[str, list[np.ndarray]] = {}
        self.valid: dict[str, list[np.ndarray]] = {}
        self.pieces: dict[str, list[tuple[np.ndarray, pa.ChunkedArray]]] = {}

    def add(self, part: pa.Table) -> None:
        positions, part = split_positions(part)
        order = position_order(positions)
        if order is not None:
            positions = positions[order]
        blocks = np.searchsorted(positions, np.arange(0, (int(positions[-1]) if len(positions) else 0) + 2
                                                      * BLOCK_ROWS, BLOCK_ROWS))
        for name in part.column_names:
            column = part.column(name)
            type_ = self.types.setdefault(name, column.type)
            if column.type != type_:
                column = column.cast(type_)
            if order is not None:
                column = column.take(pa.array(order))
            if not _fixed_width(type_):
                self.pieces.setdefault(name, []).append((positions, column))
                continue
            storage = pa.int64() if pa.types.is_timestamp(type_) else type_
            values = column.cast(storage).fill_null(False if pa.types.is_boolean(type_) else 0).to_numpy()
            valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
            value_blocks = self.values.setdefault(name, [])
            valid_blocks = self.valid.setdefault(name, [])
            for block in range(len(blocks) - 1):
                low, high = blocks[block], blocks[block + 1]
                if low == high:
                    continue
                while len(value_blocks) <= block:
                    value_blocks.append(np.zeros(BLOCK_ROWS, dtype=values.dtype))
                    valid_blocks.append(np.zeros(BLOCK_ROWS, dtype=bool))
                offsets = positions[low:high] - block * BLOCK_ROWS
                value_blocks[block][offsets] = values[low:high]
                valid_blocks[block][offsets] = True if valid is None else valid[low:high]

    def finish(self, rows: int) -> pa.Table:
        arrays = {}
        for name, type_ in self.types.items():
            if name in self.values:
                chunks = []
                value_blocks, valid_blocks = self.values.pop(name), self.valid.pop(name)
                storage = pa.int64() if pa.types.is_timestamp(type_) else type_
                for block in range(-(-rows // BLOCK_ROWS)):
                    size = min(BLOCK_ROWS, rows - block * BLOCK_ROWS)
                    if block < len(value_blocks):
                        values, valid = value_blocks[block][:size], valid_blocks[block][:size]
                        array = pa.array(values, mask=None if valid.all() else ~valid)
                    else:
                        array = pa.nulls(size, storage)
                    chunks.append(array.view(type_) if pa.types.is_timestamp(type_) else array)
                arrays[name] = pa.chunked_array(chunks, type_)
            else:
                pieces = self.pieces.pop(name)
                slot = np.full(rows, -1, dtype=np.int64)
                offset = 0
                for positions, _ in pieces:
                    slot[positions] = np.arange(offset, offset + len(positions))
                    offset += len(positions)
                gathered = pa.chunked_array([c for _, piece in pieces for c in piece.chunks], type_)
                arrays[name] = gathered.take(pa.array(slot, mask=slot < 0))
        return pa.table(arrays)


class Sink(Protocol):
    """Where one view's partition results go as they arrive (InEntityOrder; a persist's writer)."""

    def add(self, part: pa.Table) -> None: ...


class Calls:
    """The Ray calls of one request: submitted on the warm ``workers`` (round robin) or as plain tasks, each
    result handed to its view's sink as soon as it arrives and then released. At most ``in_flight`` calls are
    pending: a sink slower than the join (a persist writing to PostgreSQL) holds the next submission back instead
    of letting finished results pile up in Ray's object store (and spill to disk)."""

    def __init__(self, sinks: list[Sink], workers: list[Any] | None, in_flight: int):
        self.sinks = sinks
        self.workers = workers
        self.in_flight = max(in_flight, 1)
        self.pending: dict[Any, int] = {}
        self.count = itertools.count()

    def submit(self, view: int, task: PartitionTask, part: pa.Table) -> None:
        self.collect(wait=False)
        if len(self.pending) >= self.in_flight:
            self.collect(wait=True, until=self.in_flight - 1)
        if self.workers:
            ref = self.workers[next(self.count) % len(self.workers)].join.remote(task, part)
        else:
            ref = _remote_join().remote(task, part)
        self.pending[ref] = view

    def collect(self, wait: bool, until: int = 0) -> None:
        """Hand over the results that are ready; with ``wait``, wait until at most ``until`` calls are pending."""
        import ray

        while len(self.pending) > until:
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if wait else 0)
            if not done:
                return
            for ref in done:
                self.sinks[self.pending.pop(ref)].add(ray.get(ref))


def in_flight(cpus: int, workers: list[Any] | None) -> int:
    """Calls pending at once: two per worker (one running, one queued behind it), so no worker waits."""
    return 2 * (len(workers) if workers else cpus)


def run_on_ray(plans: list[ViewPlan], entities: EntityRows, connection: str, partitions: int, sinks: list[Sink],
               cpus: int, workers: list[Any] | None = None) -> None:
    """Each view's features for every entity row, into the view's sink: one Ray call per (view, key range)."""
    calls = Calls(sinks, workers, in_flight(cpus, workers))
    for view, plan in enumerate(plans):
        for task, part in view_tasks(plan, entities, connection, partitions):
            calls.submit(view, task, part)
    calls.collect(wait=True)


def run_streaming(plans: list[ViewPlan], batches: Iterator[tuple[pa.Table, np.ndarray]], connection: str,
                  cpus: int, parallelism: Parallelism, sinks: list[Sink], workers: list[Any] | None = None,
                  on_read: Callable[[], None] = lambda: None) -> int:
    """run_on_ray for an entity set that arrives in batches (each: the join key columns and UTC nanoseconds):
    partitions are cut and joined while later batches are still being read (StreamCutter); returns the rows read."""
    calls = Calls(sinks, workers, in_flight(cpus, workers))
    cutters = [StreamCutter(plan, cpus, parallelism.min_rows_per_partition, parallelism.rows_per_partition)
               for plan in plans]
    rows = 0
    for keys, stamps in batches:
        positions = np.arange(rows, rows + len(stamps))
        rows += len(stamps)
        for view, cutter in enumerate(cutters):
            for part in cutter.add(positions, keys, stamps):
                calls.submit(view, *partition_task(plans[view], connection, part))
        calls.collect(wait=False)
    on_read()
    for view, cutter in enumerate(cutters):
        for part in cutter.finish():
            calls.submit(view, *partition_task(plans[view], connection, part))
    calls.collect(wait=True)
    return rows


def run_in_process(plans: list[ViewPlan], entities: EntityRows, connection: str, sinks: list[Sink]) -> None:
    """The same join in this process, one partition per view: for entity sets too small to pay Ray's start-up."""
    for plan, sink in zip(plans, sinks, strict=True):
        for task, part in view_tasks(plan, entities, connection, 1):
            sink.add(join_partition(task, part))
