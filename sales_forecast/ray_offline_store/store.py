"""The offline store: Feast's PostgreSQL store with the point-in-time join of get_historical_features on Ray.

Selected in feature_store.yaml with ``offline_store: type: sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore``
and the PostgreSQL keys of ``type: postgres``. Feast finds the config class by appending ``Config`` to the type
and the store class by dropping it from the config's class name in the config's module, so both live here, with
everything else that speaks Feast: the retrieval job, the plan of each requested view and the entity set.

Every get_historical_features request runs the Ray join: an entity set (DataFrame or SQL), a date range without
one (start_date/end_date: the views' own rows are the entity rows), filter_by_created_timestamp, several join
keys. Feast's PostgreSQL join is never used: it glues several join keys together without a separator, so
(store 1, dept 12) and (store 11, dept 2) share feature rows. Everything else is inherited from
PostgreSQLOfflineStore (materialization reads, pull_latest/pull_all, monitoring), except offline writes and the
blocks pull_latest hands Feast's Ray engine (``LatestRowsJob``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from queue import Queue
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
from feast.data_source import DataSource
from feast.errors import (
    EntityTimestampInferenceException,
    FeastEntityDFMissingColumnsError,
    FeastOfflineStoreUnsupportedDataSource,
    InvalidEntityType,
)
from feast.feature_view import FeatureView
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres import (
    PostgreSQLOfflineStore,
    PostgreSQLOfflineStoreConfig,
    PostgreSQLRetrievalJob,
)
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
    PostgreSQLSource,
    SavedDatasetPostgreSQLStorage,
)
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
from feast.infra.registry.base_registry import BaseRegistry
from feast.infra.utils.postgres.connection_utils import (
    _get_conn,
    _get_conn_kwargs,
    _get_conninfo,
)
from feast.infra.utils.postgres.postgres_config import PostgreSQLConfig
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage, ValidationReference
from feast.utils import (
    _get_requested_feature_views_to_features_dict,
    _get_requested_on_demand_feature_views,
    compute_non_entity_date_range,
)
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import NonNegativeInt, PositiveInt, StrictStr

from sales_forecast.arrow_copy import copy_rows, copyable, create_table, for_copy
from sales_forecast.errors import first_line
from sales_forecast.ray_offline_store.driver import (
    EntityRows,
    InEntityOrder,
    Parallelism,
    Sink,
    ViewPlan,
    block_rows,
    cluster_cpus,
    date_range_query,
    ensure_ray,
    join_workers,
    position_order,
    run_in_process,
    run_on_ray,
    run_streaming,
    write_concurrency,
)
from sales_forecast.ray_offline_store.worker import (
    NULL_TIME,
    arrow_nanoseconds,
    feast_types,
    read_arrow,
    split_positions,
)

logger = logging.getLogger(__name__)

STORE_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"
DATE_RANGE_CREATED = "created_timestamp"  # the created timestamp column of a one-view date-range retrieval
STREAM_BATCH_OPTION = "adbc.postgresql.batch_size_hint_bytes"
STREAM_BATCH_BYTES = 2 << 20  # a SQL entity set arrives in batches of about this size (ADBC's default: 16 MB)


class RayPostgreSQLOfflineStoreConfig(PostgreSQLOfflineStoreConfig):
    """The ``postgres`` offline store keys, plus how the join runs on Ray."""

    type: Literal[  # type: ignore[assignment]
        "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore",
        "sales_forecast.ray_offline_store.store.RayPostgreSQLOfflineStore",
    ] = STORE_TYPE
    ray_address: StrictStr | None = None
    """Cluster to join when Ray is not yet initialized; default RAY_ADDRESS, else a local Ray. Never ray://."""
    ray_conf: dict[str, Any] | None = None
    """Extra ``ray.init`` arguments (e.g. num_cpus, object_store_memory)."""
    partitions: PositiveInt | None = None
    """Key-range partitions (Ray tasks) per feature view; default from the rows and the cluster's CPUs."""
    rows_per_partition: PositiveInt = 1_000_000
    """Without ``partitions``: split so no task joins more entity rows than this (bounds worker memory)."""
    min_rows_per_partition: PositiveInt = 50_000
    """Without ``partitions``: do not split below this many entity rows per task (Ray's per-task overhead)."""
    ray_min_entity_rows: NonNegativeInt = 0
    """Smaller entity sets are joined in this process, without starting or using Ray (same join code)."""
    warm_workers: NonNegativeInt | None = None
    """Join workers kept alive on the Ray cluster between requests (named detached actors, created on first use):
    default one per CPU of a cluster this process attaches to, none with a Ray this process starts itself; 0 runs
    plain Ray tasks, whose worker processes start with every job."""


class RayPostgreSQLOfflineStore(PostgreSQLOfflineStore):
    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str | None,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
        **kwargs: Any,
    ) -> RetrievalJob:
        assert isinstance(config.offline_store, RayPostgreSQLOfflineStoreConfig)
        for view in feature_views:
            if not isinstance(view.batch_source, PostgreSQLSource):  # Feast's PostgreSQL store asserts
                raise FeastOfflineStoreUnsupportedDataSource(RayPostgreSQLOfflineStore.__name__,
                                                             f"{view.batch_source.name} (feature view {view.name}, "
                                                             f"a {type(view.batch_source).__name__})")
        plans = plan_views(feature_refs, feature_views, registry, project, full_feature_names)
        if filter_by_created_timestamp:
            plans = [replace(plan, created_at_most_entity=True) for plan in plans]
        date_range = None
        if entity_df is None:  # a date range: the views' own rows are the entity set
            date_range = compute_non_entity_date_range(feature_views, start_date=kwargs.get("start_date"),
                                                       end_date=kwargs.get("end_date"))
            if len(plans) == 1 and plans[0].has_created:  # Feast's single-view columns
                plans = [replace(plans[0], created_output=DATE_RANGE_CREATED)]
        return RayPostgreSQLRetrievalJob(
            config=config,
            plans=plans,
            entity_df=entity_df,
            feature_refs=feature_refs,
            full_feature_names=full_feature_names,
            on_demand_feature_views=OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry),
            date_range=date_range,
        )

    @staticmethod
    def pull_latest_from_table_or_query(config: RepoConfig, data_source: DataSource, join_key_columns: list[str],
                                        feature_name_columns: list[str], timestamp_field: str,
                                        created_timestamp_column: str | None, start_date: datetime,
                                        end_date: datetime) -> RetrievalJob:
        job = PostgreSQLOfflineStore.pull_latest_from_table_or_query(
            config, data_source, join_key_columns, feature_name_columns, timestamp_field, created_timestamp_column,
            start_date, end_date)
        assert isinstance(job, PostgreSQLRetrievalJob)
        if not join_key_columns:  # one dummy key for every row: the engine's dedup does nothing, so one block
            return job
        return LatestRowsJob(job, config.materialization_config.online_write_batch_size,
                             write_concurrency(config.batch_engine))

    @staticmethod
    def offline_write_batch(config: RepoConfig, feature_view: FeatureView, table: pa.Table,
                            progress: Callable[[int], Any] | None) -> None:
        """Append ``table`` to the view's PostgreSQL table (write_to_offline_store, push with PushMode.OFFLINE).

        Columns are matched by name, in any order (a field-mapped feature name is mapped back to its source
        column); a missing or extra column is refused. The rows go to a temporary table with ADBC's bulk ingest
        and then ``INSERT ... SELECT`` into the source in one transaction, so PostgreSQL applies its assignment
        casts (int8 into int4, timestamptz into timestamp in the session's TimeZone) and refuses what does not fit,
        and a refused batch writes nothing.
        """
        source = feature_view.batch_source
        if not isinstance(source, PostgreSQLSource) or not source._postgres_options._table:
            raise OfflineWriteError(f"feature view {feature_view.name!r} reads a query, not a table: offline writes "
                                    "need a PostgreSQLSource with table=")
        target = source._postgres_options._table
        store = config.offline_store
        zone = session_time_zone(store)
        with _get_conn(store) as conn:
            columns = [column.name for column in conn.execute(f"SELECT * FROM {target} LIMIT 0").description]
        reverse = {mapped: original for original, mapped in source.field_mapping.items()}
        names = [name if name in columns else reverse.get(name, name) for name in table.column_names]
        missing, extra = [c for c in columns if c not in names], [n for n in names if n not in columns]
        if missing or extra or len(set(names)) != len(names):
            raise OfflineWriteError(f"cannot write to {target}: the table's columns are {', '.join(columns)}; "
                                    f"missing: {', '.join(missing) or 'none'}; not in {target}: "
                                    f"{', '.join(extra) or 'none'}")
        data = table.rename_columns(names).select(columns)
        staging = f"feast_offline_write_{uuid.uuid4().hex}"
        listed = sql.SQL(", ").join(map(sql.Identifier, columns)).as_string(None)
        with adbc.connect(conninfo(store, zone)) as conn:
            try:
                with conn.cursor() as cur:
                    cur.adbc_ingest(staging, data, mode="create", temporary=True)
                    cur.execute(f"INSERT INTO {target} ({listed}) SELECT {listed} FROM {staging}")
                conn.commit()
            except adbc.Error as exc:
                conn.rollback()
                raise OfflineWriteError(f"cannot write to {target}: {first_line(exc)}") from exc
        if progress:
            progress(data.num_rows)


class LatestRowsJob(PostgreSQLRetrievalJob):
    """Feast's pull_latest job (one row per entity key, read by Feast's PostgreSQL code) whose ``to_ray_dataset``,
    what Feast's Ray engine reads, cuts the rows into ``write_blocks`` blocks of ``block_rows`` instead of Feast's one.

    From one block the engine's filter, dedup and online write run as one task, one write batch
    (``online_write_batch_size``) after another, whatever the engine's ``write_concurrency``; from several, that
    many tasks write at once. The engine dedups per block, which is exact here: the query keeps one row per entity
    key, so no key is in two blocks. Views without entities are not cut (``pull_latest_from_table_or_query``).
    """

    def __init__(self, job: PostgreSQLRetrievalJob, batch_rows: int | None, concurrency: int):
        super().__init__(query=job._query_generator, config=job.config, full_feature_names=job.full_feature_names,
                         on_demand_feature_views=job.on_demand_feature_views, metadata=job.metadata)
        self.batch_rows = batch_rows
        self.concurrency = concurrency

    def to_ray_dataset(self) -> Any:
        import ray.data

        table = self.to_arrow()
        rows = block_rows(table.num_rows, self.batch_rows, self.concurrency)
        return ray.data.from_arrow([table.slice(start, rows) for start in range(0, max(table.num_rows, 1), rows)])


class OfflineWriteError(ValueError):
    """A batch that does not fit the feature view's source table; nothing was written."""


# --- the plan of each requested view ----------------------------------------------------------------------------

def plan_views(feature_refs: list[str], feature_views: list[FeatureView], registry: BaseRegistry, project: str,
               full_feature_names: bool) -> list[ViewPlan]:
    """One plan per requested feature view, in request order (Feast's output column order), resolved from Feast's
    objects the way its SQL join does."""
    requested, _ = _get_requested_feature_views_to_features_dict(
        feature_refs, feature_views, _get_requested_on_demand_feature_views(feature_refs, project, registry))
    return [_plan_view(view, features, full_feature_names) for view, features in requested.items()]


def _plan_view(view: FeatureView, features: list[str], full_feature_names: bool) -> ViewPlan:
    source = view.batch_source
    if source is None:
        raise ValueError(f"Feature view '{view.name}' has no batch_source and cannot be queried.")
    reverse = {mapped: original for original, mapped in source.field_mapping.items()}
    name = view.projection.name_to_use()
    source_features = tuple(reverse.get(feature, feature) for feature in features)
    outputs = tuple(source.field_mapping.get(feature, feature) for feature in source_features)
    if full_feature_names:
        outputs = tuple(f"{name}__{output}" for output in outputs)
    ttl_seconds = int(view.ttl.total_seconds()) if isinstance(view.ttl, timedelta) else 0
    created = source.created_timestamp_column or None
    schema = [field.name for field in view.features]
    tie_order = sorted(range(len(features)),
                       key=lambda i: schema.index(features[i]) if features[i] in schema else len(schema))
    return ViewPlan(
        name=name,
        source_sql=source.get_table_query_string(),
        join_keys=tuple(view.projection.join_key_map.get(c.name, c.name) for c in view.entity_columns),
        source_keys=tuple(reverse.get(c.name, c.name) for c in view.entity_columns),
        timestamp_field=reverse.get(source.timestamp_field, source.timestamp_field),
        created_timestamp_column=reverse.get(created, created) if created else None,
        features=source_features,
        output_names=outputs,
        ttl_seconds=max(ttl_seconds, 0),
        tie_order=tuple(tie_order),
    )


# --- connections, time zones and the entity set ----------------------------------------------------------------

def session_time_zone(config: PostgreSQLConfig) -> str:
    """The TimeZone of the offline store's sessions as Feast opens them (the database's or role's setting, PGTZ,
    or the connection options): the zone of every naive timestamp the join compares."""
    with _get_conn(config) as conn:
        return str(conn.execute("SHOW TimeZone").fetchone()[0])


def conninfo(config: PostgreSQLConfig, time_zone: str, parallel_query: bool = True) -> str:
    """The libpq connection string of the offline store, with sslmode, ssl files, search_path and keepalives as
    Feast sets them, for ADBC (libpq) connections, and the session TimeZone pinned to ``time_zone`` (a Ray worker
    elsewhere must read naive timestamps in the same zone as the driver).

    ``parallel_query=False`` is for the partition reads: Ray already runs one per CPU, and with PostgreSQL's
    parallel workers the planner picks a parallel scan of the whole table over an index range scan of the
    partition's keys (measured: each of 13 partitions then read the full 6M-row table).
    """
    options = {name: value for name, value in _get_conn_kwargs(config).items() if value is not None}
    zone = time_zone.replace("\\", "\\\\").replace(" ", "\\ ")
    extra = f"-c TimeZone={zone}" + ("" if parallel_query else " -c max_parallel_workers_per_gather=0")
    options["options"] = f"{options.get('options', '')} {extra}".strip()
    if config.keepalives_idle is not None:
        options["keepalives_idle"] = config.keepalives_idle
    return make_conninfo(_get_conninfo(config), **options)


_UTC_NAMES = {"UTC", "ETC/UTC", "GMT", "ETC/GMT", "UCT", "ETC/UCT", "UNIVERSAL", "ETC/UNIVERSAL", "ZULU", "ETC/ZULU",
              "GMT0", "ETC/GMT0", "GMT+0", "GMT-0", "ETC/GMT+0", "ETC/GMT-0", "GREENWICH", "ETC/GREENWICH"}


def wall_clock_to_utc(naive_ns: np.ndarray, zone: str, config: PostgreSQLConfig) -> np.ndarray:
    """UTC nanoseconds of wall-clock times in ``zone``, converted as PostgreSQL converts timestamp to timestamptz:
    a wall-clock time skipped by a DST transition, or repeated by one, is the later of its candidate instants
    (PostgreSQL: the offset before a spring-forward gap, the one after a fall-back overlap)."""
    if zone.upper() in _UTC_NAMES:
        return naive_ns
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return _wall_clock_to_utc_in_postgres(naive_ns, config)
    out = naive_ns.copy()
    valid = naive_ns != NULL_TIME
    local = pd.DatetimeIndex(naive_ns[valid].view("datetime64[ns]")).tz_localize(tz, ambiguous="NaT",
                                                                                  nonexistent="NaT")
    converted = local.asi8.copy()
    unresolved = np.flatnonzero(local.isna())
    for wall in np.unique(naive_ns[valid][unresolved]):
        moment = pd.Timestamp(wall).to_pydatetime(warn=False)
        offsets = [moment.replace(tzinfo=tz, fold=fold).utcoffset() for fold in (0, 1)]
        shift = min(offset for offset in offsets if offset is not None)
        converted[unresolved[naive_ns[valid][unresolved] == wall]] = wall - int(shift.total_seconds() * 1e9)
    out[valid] = converted
    return out


def _wall_clock_to_utc_in_postgres(naive_ns: np.ndarray, config: PostgreSQLConfig) -> np.ndarray:
    """The same conversion by PostgreSQL itself, for a TimeZone Python does not know (a POSIX zone string)."""
    valid = naive_ns != NULL_TIME
    walls, inverse = np.unique(naive_ns[valid], return_inverse=True)
    stamps = [pd.Timestamp(wall).to_pydatetime(warn=False) for wall in walls]
    with _get_conn(config) as conn:
        rows = conn.execute("SELECT t::timestamptz FROM unnest(%s::timestamp[]) WITH ORDINALITY AS u(t, n) "
                            "ORDER BY n", [stamps]).fetchall()
    instants = np.array([pd.Timestamp(row[0]).value for row in rows], dtype=np.int64)
    out = naive_ns.copy()
    out[valid] = instants[inverse] + (naive_ns[valid] - walls[inverse])  # sub-microsecond part kept
    return out


def entity_nanoseconds(values: pa.ChunkedArray, zone: str, config: PostgreSQLConfig) -> np.ndarray:
    """int64 UTC nanoseconds of the entity timestamps (NULL_TIME for NULL): aware ones as they are, naive ones as
    wall-clock time in the session's zone (PostgreSQL's reading, see wall_clock_to_utc); text is parsed."""
    if not pa.types.is_timestamp(values.type):
        series = values.to_pandas()
        try:
            parsed = pd.to_datetime(series)
        except (ValueError, TypeError):  # mixed offsets
            parsed = pd.to_datetime(series, utc=True)
        values = pa.chunked_array([pa.Array.from_pandas(parsed)])
    if values.type.tz is not None:
        return arrow_nanoseconds(values)
    return wall_clock_to_utc(arrow_nanoseconds(values), zone, config)


@dataclass(frozen=True)
class EntitySet:
    table: pa.Table  # every column of the entity set, with Feast's PostgreSQL output types
    rows: EntityRows  # what the join reads: the join keys as given, UTC nanoseconds
    timestamp_column: str

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def time_range(self) -> tuple[datetime, datetime] | None:
        stamps = self.rows.timestamps_ns
        valid = stamps[stamps != NULL_TIME]
        if valid.size == 0:
            return None
        low, high = pd.Timestamp(valid.min(), tz="UTC"), pd.Timestamp(valid.max(), tz="UTC")
        return low.to_pydatetime(warn=False), high.to_pydatetime(warn=False)


class ArrivingRows:
    """A SQL entity set's batches as they arrive; rows can be taken by position before the last one is in."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.batches: list[pa.RecordBatch] = []
        self.starts = [0]  # each batch's first position, then the rows so far

    def append(self, batch: pa.RecordBatch) -> pa.Table:
        self.batches.append(batch)
        self.starts.append(self.starts[-1] + batch.num_rows)
        return pa.Table.from_batches([batch], self.schema)

    def take(self, positions: np.ndarray) -> pa.Table:
        """The rows at ``positions`` (ascending), batch by batch (a take from every batch at once would first
        concatenate them)."""
        cuts = np.searchsorted(positions, self.starts)
        pieces = [self.batches[index].take(pa.array(positions[low:high] - self.starts[index]))
                  for index, (low, high) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)) if high > low]
        return pa.Table.from_batches(pieces, self.schema)

    def table(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, self.schema)


def with_features(entities: pa.Table, per_view: list[pa.Table], date_range: bool) -> pa.Table:
    """A result's columns: the entity set's, then each view's features; a date-range retrieval's created
    timestamp second, Feast's place for it."""
    result = entities
    for features in per_view:
        for name, column in zip(features.column_names, features.columns, strict=True):
            if name == DATE_RANGE_CREATED and date_range:
                result = result.add_column(1, name, column)
            else:
                result = result.append_column(name, column)
    return result


def timestamp_column(schema: pa.Schema) -> str:
    """Feast's rule: ``event_timestamp`` if present, else the only timestamp column."""
    if DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL in schema.names:
        return DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
    stamps = [field.name for field in schema if pa.types.is_timestamp(field.type)]
    if len(stamps) != 1:
        raise EntityTimestampInferenceException(DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL)
    return stamps[0]


def load_entities(entity_df: pd.DataFrame | str, config: PostgreSQLConfig, zone: str,
                  join_keys: set[str]) -> EntitySet:
    if isinstance(entity_df, pd.DataFrame):
        table = pa.Table.from_pandas(entity_df, preserve_index=False)
    elif isinstance(entity_df, str):
        table = read_arrow(conninfo(config, zone), entity_df)
    else:
        raise InvalidEntityType(type(entity_df))
    missing = join_keys - set(table.schema.names)
    if missing:
        raise FeastEntityDFMissingColumnsError(join_keys, missing)
    column = timestamp_column(table.schema)
    rows = EntityRows(keys=table.select(sorted(join_keys)),
                      timestamps_ns=entity_nanoseconds(table.column(column), zone, config))
    return EntitySet(table=feast_types(table), rows=rows, timestamp_column=column)


_IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)')
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def saved_dataset_relation(name: str) -> tuple[str, ...]:
    """The (table,) or (schema, table) a saved dataset's table name names, read as PostgreSQL reads it: the dataset
    is read back through ``PostgreSQLSource(table=name)``, which puts the name into its SQL as it is, so an unquoted
    part is lowercased and a double-quoted one kept. Any other name is refused: it would not read back, and it
    would be SQL."""
    parts, position = [], 0
    while len(parts) < 2:
        match = _IDENTIFIER.match(name, position)
        if match is None:
            break
        quoted, plain = match.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else plain.translate(_ASCII_LOWER))
        position = match.end()
        if position == len(name):
            return tuple(parts)
        if name[position] != ".":
            break
        position += 1
    raise ValueError(f"cannot persist to {name!r}: not a table name a saved dataset reads back (a PostgreSQL table "
                     "name, optionally schema-qualified; double-quote a part that is not lowercase letters, digits "
                     "and underscores)")


class SavedDatasetTable:
    """persist's table, written in one transaction: a new table under a unique name in the saved dataset's schema,
    created with the first part's columns and filled part by part with binary COPY (ADBC's ingest when a column
    is of a type COPY cannot send, such as a list); at the end the old table (``allow_overwrite``) is dropped and
    the new one takes its name. Until then the old table stays readable and unlocked: the join may be reading it (a
    view's own source), and the saved dataset's readers are not held up for the whole join."""

    def __init__(self, connection: str, name: str, allow_overwrite: bool):
        self.connection, self.name, self.allow_overwrite = connection, name, allow_overwrite
        *schema, self.table = saved_dataset_relation(name)
        self.schema_name = schema[0] if schema else None
        self.staging_name = f"feast_persist_{uuid.uuid4().hex}"
        self.target, self.staging = sql.Identifier(*schema, self.table), sql.Identifier(*schema, self.staging_name)
        self._conn: psycopg.Connection | adbc.Connection | None = None
        self._copying = False

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.Error, adbc.Error, ValueError) as exc:
            raise ValueError(f"cannot persist to {self.name}: {first_line(exc)}") from exc

    def __enter__(self) -> SavedDatasetTable:
        if not self.allow_overwrite:  # refused before the join, not after it
            with self._errors(), psycopg.connect(self.connection) as conn:
                if conn.execute("SELECT to_regclass(%s)", (self.target.as_string(conn),)).fetchone()[0]:
                    raise ValueError("it exists (persist with allow_overwrite=True replaces it)")
        return self

    def write(self, data: pa.Table) -> None:
        with self._errors():
            if self._conn is None:
                self._create(data.schema)
            with self._conn.cursor() as cur:
                if self._copying:
                    copy_rows(cur, self.staging, for_copy(data)[1])
                else:
                    cur.adbc_ingest(self.staging_name, data, mode="append", db_schema_name=self.schema_name)

    def _create(self, schema: pa.Schema) -> None:
        self._copying = copyable(schema)
        if not self._copying:
            self._conn = adbc.connect(self.connection)
            with self._conn.cursor() as cur:
                cur.adbc_ingest(self.staging_name, schema.empty_table(), mode="create",
                                db_schema_name=self.schema_name)
            return
        self._conn = psycopg.connect(self.connection)
        types, sent = for_copy(schema.empty_table())
        with self._conn.cursor() as cur:
            create_table(cur, self.staging, sent.schema, types)

    def _swap(self) -> None:
        statements = [sql.SQL("ALTER TABLE {} RENAME TO {}").format(self.staging, sql.Identifier(self.table))]
        if self.allow_overwrite:
            statements.insert(0, sql.SQL("DROP TABLE IF EXISTS {}").format(self.target))
        with self._conn.cursor() as cur:
            for statement in statements:  # as text: the connection may be ADBC's, which takes no psycopg SQL
                cur.execute(statement.as_string(None))
        self._conn.commit()

    def __exit__(self, kind, value, traceback) -> None:
        if self._conn is None:
            return
        try:
            if kind is None:
                with self._errors():
                    self._swap()
            else:
                with contextlib.suppress(psycopg.Error, adbc.Error):  # the failure that got here is the one to report
                    self._conn.rollback()
        finally:
            self._conn.close()


class SavedDatasetWriter:
    """persist's sink for a one-view request: each partition's rows (the entity rows at its positions, then its
    features) are appended to the saved dataset's table as the partition arrives, so the whole result is never in
    this process; the entity rows no partition holds (a NULL key or time) come last, with NULL features."""

    def __init__(self, table: SavedDatasetTable, entity_rows: Callable[[np.ndarray], pa.Table], date_range: bool):
        self.table, self.entity_rows, self.date_range = table, entity_rows, date_range
        self.schema: pa.Schema | None = None
        self.features: pa.Schema | None = None
        self.covered = np.zeros(0, dtype=bool)

    def add(self, part: pa.Table) -> None:
        positions, features = split_positions(part)
        order = position_order(positions)
        if order is not None:
            positions, features = positions[order], features.take(pa.array(order))
        if len(positions):
            self._cover(int(positions[-1]) + 1)
        self.covered[positions] = True
        if self.features is None:
            self.features = features.schema
        self._write(self.entity_rows(positions), features)

    def finish(self, rows: int) -> None:
        assert self.features is not None  # every view has at least one partition, empty or not
        self._cover(rows)
        missing = np.flatnonzero(~self.covered[:rows])
        nulls = pa.table([pa.nulls(len(missing), field.type) for field in self.features], schema=self.features)
        self._write(self.entity_rows(missing), nulls)

    def _cover(self, rows: int) -> None:
        """Room for ``rows`` positions in ``covered`` (doubling, while a SQL entity set is still arriving)."""
        if rows > len(self.covered):
            grown = np.zeros(max(rows, 2 * len(self.covered)), dtype=bool)
            grown[:len(self.covered)] = self.covered
            self.covered = grown

    def _write(self, entities: pa.Table, features: pa.Table) -> None:
        data = with_features(entities, [features], self.date_range)
        if self.schema is None:
            self.schema = data.schema
        elif not data.num_rows:
            return
        elif data.schema != self.schema:
            data = data.cast(self.schema)
        self.table.write(data)


# --- the retrieval job ------------------------------------------------------------------------------------------

class RayPostgreSQLRetrievalJob(RetrievalJob):
    """The RetrievalJob of a Ray point-in-time join: runs on first use, like Feast's PostgreSQL job."""

    def __init__(self, config: RepoConfig, plans: list[ViewPlan], entity_df: pd.DataFrame | str | None,
                 feature_refs: list[str], full_feature_names: bool,
                 on_demand_feature_views: list[OnDemandFeatureView],
                 date_range: tuple[datetime, datetime] | None = None):
        """``entity_df`` None: a date-range retrieval of ``date_range`` (start, end), whose entity set is the
        views' rows in the range."""
        self.config = config
        self._date_range = date_range
        self._plans = plans
        self._entity_df = entity_df
        self._feature_refs = feature_refs
        self._full_feature_names = full_feature_names
        self._on_demand_feature_views = on_demand_feature_views
        self._entities: EntitySet | None = None
        self._arriving: ArrivingRows | None = None  # a SQL entity set while it is being read
        self._time_zone: str | None = None
        self.timings: dict[str, float] = {}
        """Seconds from the start of the join to the end of each phase (logged at DEBUG; for benchmarks)."""
        self._started = 0.0

    def _mark(self, phase: str) -> None:
        self.timings[phase] = time.perf_counter() - self._started

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._on_demand_feature_views

    def time_zone(self) -> str:
        if self._time_zone is None:
            self._time_zone = session_time_zone(self.config.offline_store)
        return self._time_zone

    def _entity_query(self) -> pd.DataFrame | str:
        if self._entity_df is not None:
            return self._entity_df
        assert self._date_range is not None
        start, end = (pd.Timestamp(moment).value for moment in self._date_range)
        return date_range_query(self._plans, start, end)

    def _join_keys(self) -> set[str]:
        return {key for plan in self._plans for key in plan.join_keys}

    def entities(self) -> EntitySet:
        """The entity set, read once (a SQL entity set is a query on the offline store)."""
        if self._entities is None:
            self._entities = load_entities(self._entity_query(), self.config.offline_store, self.time_zone(),
                                           self._join_keys())
        return self._entities

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        outputs = [InEntityOrder() for _ in self._plans]
        self._join(outputs)
        entities = self.entities()
        result = with_features(entities.table, [output.finish(entities.num_rows) for output in outputs],
                               self._entity_df is None)
        self._mark("result table")
        logger.debug("Ray join of %s entity rows: %s", result.num_rows,
                     ", ".join(f"{phase} at {seconds:.2f} s" for phase, seconds in self.timings.items()))
        return result

    def _join(self, sinks: list[Sink]) -> None:
        """Every view's partition results into its sink; afterwards ``entities()`` is the entity set. Starts the
        phase clock (``timings``)."""
        self._started, self.timings = time.perf_counter(), {}
        store = self.config.offline_store
        query = self._entity_query()
        if isinstance(query, str) and store.partitions is None and not store.ray_min_entity_rows \
                and self._entities is None:
            self._join_streamed(query, sinks)
        else:
            self._join_loaded(sinks)

    def _entity_rows(self, positions: np.ndarray) -> pa.Table:
        """The entity set's rows at ``positions`` (ascending), also while a SQL entity set is still arriving."""
        if self._entities is not None:
            return self._entities.table.take(pa.array(positions))
        assert self._arriving is not None
        return feast_types(self._arriving.take(positions))

    def _attach(self) -> tuple[int, list[Any] | None]:
        """Ray attached (or started); the cluster's CPUs and the warm join workers, if any."""
        store = self.config.offline_store
        persistent = ensure_ray(store.ray_address, store.ray_conf)
        self._mark("ray attached")
        cpus = cluster_cpus()
        count = store.warm_workers if store.warm_workers is not None else (cpus if persistent else 0)
        workers = join_workers(count) if count else None
        self._mark("join workers")
        return cpus, workers

    def _parallelism(self) -> Parallelism:
        store = self.config.offline_store
        return Parallelism(store.partitions, store.rows_per_partition, store.min_rows_per_partition)

    def _join_loaded(self, sinks: list[Sink]) -> None:
        """The join of an entity set read at once (a DataFrame; a SQL set with a fixed partition count or a size
        threshold): in this process when smaller than ray_min_entity_rows, else on Ray."""
        store = self.config.offline_store
        small = isinstance(self._entity_df, pd.DataFrame) and len(self._entity_df) < store.ray_min_entity_rows
        if small or (store.ray_min_entity_rows and self._entities is None):
            self.entities()  # whether Ray is needed depends on the entity set's size
        if self._entities is not None and self._entities.num_rows < store.ray_min_entity_rows:
            run_in_process(self._plans, self._entities.rows, self._partition_connection(), sinks)
            return
        with ThreadPoolExecutor(1) as loader:  # read the entity set while attaching to Ray
            loading = loader.submit(self.entities)
            cpus, workers = self._attach()
            entities = loading.result()
        self._mark("entity set read")
        run_on_ray(self._plans, entities.rows, self._partition_connection(),
                   self._parallelism().partitions_for(entities.num_rows, cpus), sinks, cpus, workers)
        self._mark("joins")

    def _join_streamed(self, query: str, sinks: list[Sink]) -> None:
        """The join of a SQL entity set read as a stream of batches (in a thread, while Ray attaches): partitions
        are joined while PostgreSQL is still producing the rest (driver.StreamCutter)."""
        config = self.config.offline_store
        arrived: Queue = Queue()
        stamps: list[np.ndarray] = []

        def read() -> pa.Schema:
            try:
                with adbc.connect(conninfo(config, self.time_zone())) as conn, conn.cursor() as cur:
                    cur.adbc_statement.set_options(**{STREAM_BATCH_OPTION: str(STREAM_BATCH_BYTES)})
                    cur.execute(query)
                    reader = cur.fetch_record_batch()
                    arrived.put(reader.schema)
                    for batch in reader:
                        arrived.put(batch)
                    return reader.schema
            except BaseException as exc:
                arrived.put(exc)
                raise
            finally:
                arrived.put(None)

        def batches(entities: ArrivingRows) -> Iterator[tuple[pa.Table, np.ndarray]]:
            while (item := arrived.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                table = entities.append(item)
                stamps.append(entity_nanoseconds(table.column(column), self.time_zone(), config))
                yield table.select(sorted(self._join_keys())), stamps[-1]

        with ThreadPoolExecutor(1) as reader:
            reading = reader.submit(read)
            cpus, workers = self._attach()
            schema = arrived.get()
            if isinstance(schema, BaseException) or schema is None:
                reading.result()  # raises the reader's error
            missing = self._join_keys() - set(schema.names)
            if missing:
                raise FeastEntityDFMissingColumnsError(self._join_keys(), missing)
            column = timestamp_column(schema)
            self._arriving = ArrivingRows(schema)
            try:
                run_streaming(self._plans, batches(self._arriving), self._partition_connection(), cpus,
                              self._parallelism(), sinks, workers, on_read=lambda: self._mark("entity set read"))
                reading.result()
                table = self._arriving.table()
            finally:
                self._arriving = None
        self._mark("joins")
        self._entities = EntitySet(
            table=feast_types(table),
            rows=EntityRows(keys=table.select(sorted(self._join_keys())),
                            timestamps_ns=np.concatenate(stamps) if stamps else np.zeros(0, np.int64)),
            timestamp_column=column)

    def _partition_connection(self) -> str:
        return conninfo(self.config.offline_store, self.time_zone(), parallel_query=False)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas()

    def to_df(self, validation_reference: ValidationReference | None = None,
              timeout: int | None = None) -> pd.DataFrame:
        """Feast's to_df without its trailing reset_index(drop=True): to_pandas already gives a RangeIndex, and
        the reset copies every column (2 s at 6M rows); each Arrow column is released once converted."""
        table = self.to_arrow(validation_reference=validation_reference, timeout=timeout)
        return table.to_pandas(split_blocks=True, self_destruct=True)

    @property
    def metadata(self) -> RetrievalMetadata:
        entities = self.entities()
        time_range = entities.time_range()
        return RetrievalMetadata(
            features=self._feature_refs,
            keys=[name for name in entities.table.column_names if name != entities.timestamp_column],
            min_event_timestamp=time_range[0] if time_range else None,
            max_event_timestamp=time_range[1] if time_range else None,
        )

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool | None = False,
                timeout: int | None = None) -> None:
        """The result (on-demand features included) into the saved dataset's table (SavedDatasetTable: binary
        COPY in one transaction, the old table replaced at the end and only with ``allow_overwrite``; Feast's store
        inserts row by row). A one-view request without on-demand features is written partition by partition
        as the join produces it (SavedDatasetWriter), so a result larger than this process's memory can be
        persisted; its rows are then in the partitions' order, not the entity set's."""
        assert isinstance(storage, SavedDatasetPostgreSQLStorage)
        name = storage.postgres_options._table
        with SavedDatasetTable(conninfo(self.config.offline_store, self.time_zone()), name,
                               bool(allow_overwrite)) as table:
            if len(self._plans) == 1 and not self.on_demand_feature_views:
                writer = SavedDatasetWriter(table, self._entity_rows, self._entity_df is None)
                self._join([writer])
                writer.finish(self.entities().num_rows)
                self._mark("written")
            else:
                table.write(self.to_arrow(timeout=timeout))
