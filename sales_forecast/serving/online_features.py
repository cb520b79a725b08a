"""The online feature lookup: the training feature service's views, read with Feast's online store.

The feature service names the feature views (and the features of each) the model reads. On Feast's PostgreSQL
online store a lookup reads each view's rows of the requested entities with one prepared statement (planned once,
run through libpq with binary keys and results) on the server's own connection (Feast's table, Feast's serialized
entity keys, Feast's ValueProto values); on any other online
store with the store's ``online_read`` (the plugin interface ``FeatureStore.get_online_features`` calls too). That
skips what ``get_online_features`` repeats on every call (resolving the service, grouping references, building and
converting a response proto) and Feast's per-feature-name filter, which PostgreSQL evaluates by string comparison
for every row: together about twice the database round trip at a request's few rows. The values are
``get_online_features``'s (a test compares them). On-demand views are not served.

Feature rows come back in request order as column arrays (``{feature: float64 array}``), which
``Forecaster.inputs`` turns into the network's matrix exactly as in training (it takes a DataFrame or such a
mapping: the same code). Instances without a complete row fresher than the feature view's ttl are refused (404),
never filled in.

Faults. Feast's PostgreSQL online store caches one connection (``conn_type: singleton``) or a pool and never
replaces a broken one: after a PostgreSQL restart every read fails, and in pool mode each failed read also leaks a
connection until reads hang. So the server gives the store its own connection keeper (``OnlineConnection``), in
place of the store's ``_get_conn``: lookup threads share one connection; a database error retires the connection
that failed (only that one: a thread that already holds the next connection keeps it), the next read connects
afresh, and a retired connection is closed once no thread reads through it any more, never under a reading
thread. Connection attempts are made one at a time, and the threads that waited for one share its failure:
during an outage concurrent requests get their 503 at once instead of each trying in turn. A read that came from a
cached connection is retried once (a restart while the server was idle); otherwise the answer is 503. A lookup that
times out (``OnlineFeatureLookup.abandon``) retires its connection and cancels its query, so the requests after
it connect afresh instead of waiting behind it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import sqlalchemy.exc

from sales_forecast.config import Settings, apply_to_environment
from sales_forecast.contract import FEATURE_SERVICE, MODEL_NAME
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.features.derive import REQUIRED_FEATURES
from sales_forecast.serving.http_errors import FeaturesUnavailable, UnknownEntities
from sales_forecast.serving.instances import Instance
from sales_forecast.serving.metrics import FEATURE_LOOKUP_TIMEOUTS, FEATURE_STORE_RECONNECTS

DATABASE_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, sqlalchemy.exc.SQLAlchemyError)
LISTED_KEYS = 20  # instances named in a 404 message; the body lists them all
APPLICATION_NAME = f"{MODEL_NAME}-server"  # pg_stat_activity.application_name of the server's connections
CANCEL_TIMEOUT_SECONDS = 3.0
FeatureRows = dict[str, np.ndarray]  # feature name -> one float64 value per instance, in request order
# One view's rows of the requested entities: (values (features, entities) float64, NaN for NULL or no row; each
# entity's oldest event time among them in epoch seconds, NaN without a row)
ViewRows = tuple[np.ndarray, np.ndarray]
DOUBLE_TAG = 0x29  # a ValueProto holding double_val (field 5, 64-bit): this byte, then the IEEE double
BYTEA_OID = 17
BINARY = 1  # libpq's format code for binary parameters and results


def open_serving_store(settings: Settings) -> Any:
    """The feature repo's FeatureStore, set up for serving whatever the yaml says:

    - the PostgreSQL online store in singleton mode: in pool mode an outage costs more than the leak, each read
      waits for the pool's 30 s getconn timeout instead of failing at once. One connection, replaced after errors,
      answers an outage immediately and serializes reads of under a millisecond, plenty for this server;
    - a registry cache that never expires by itself (Feast's ``cache_ttl_seconds: 0``): with a ttl, the request
      that finds the cache expired re-reads the whole registry from PostgreSQL (tens of milliseconds, and a
      database call in the request path during an outage). The server's background task refreshes it instead
      (``OnlineFeatureLookup.refresh_registry``).
    """
    from feast import FeatureStore
    from feast.infra.utils.postgres.postgres_config import ConnectionType
    from feast.repo_config import load_repo_config

    apply_to_environment(settings)
    repo = settings.feast_repo_path
    config = load_repo_config(repo, repo / "feature_store.yaml")
    if config.online_store.type == "postgres":
        config.online_store.conn_type = ConnectionType.singleton
    config.registry.cache_ttl_seconds = 0
    return FeatureStore(repo_path=str(repo), config=config)


@dataclass
class ReadTicket:
    """One lookup: how it may read, and what it read through (set by the connection keeper in its thread)."""

    inline: bool = False  # on the event loop: never connect (NoConnection instead), the watchdog bounds it
    conn: psycopg.Connection | None = None
    fresh: bool = False  # connected for this read (a failure is then not a stale cached connection)
    timed_out: bool = False  # the watchdog ended it
    timeout: float = 0.0  # what the watchdog allowed it


class NoConnection(Exception):
    """An inline read found no open connection: connecting (up to PGCONNECT_TIMEOUT) is a worker thread's job."""


class LookupTimedOut(FeaturesUnavailable):
    pass


class OnlineConnection:
    """The online store's one PostgreSQL connection, shared by the lookup threads; installed as the store's
    ``_get_conn`` (Feast 0.67's PostgreSQLOnlineStore reads through ``with self._get_conn(config, autocommit)``).

    Each use holds the connection it got until its ``with`` ends; retiring a connection (after a database error, or
    when a lookup is abandoned) only stops handing it out, and it is closed by its last user.
    """

    def __init__(self, connect: Any):
        self._connect = connect
        self._attempts = 0  # connection attempts ended (threads that waited for one share its failure)
        self._lock = threading.Lock()  # guards the fields below; never held while talking to PostgreSQL
        self._connecting = threading.Lock()  # one connection attempt at a time
        self._current: psycopg.Connection | None = None
        self._users: dict[psycopg.Connection, int] = {}
        self._retired: set[psycopg.Connection] = set()
        self._failed_at = 0.0
        self._failure = ""  # the last attempt's error, "" after a success
        self.local = threading.local()  # .ticket: the ReadTicket of the lookup running in this thread
        self._prepared: weakref.WeakKeyDictionary[psycopg.Connection, set[bytes]] = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def connection(self, config: Any = None, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        ticket: ReadTicket | None = getattr(self.local, "ticket", None)
        conn, fresh = self._acquire(may_connect=ticket is None or not ticket.inline)
        if ticket is not None:
            ticket.conn, ticket.fresh = conn, fresh
        try:
            if conn.autocommit != autocommit:  # the server only reads (autocommit); Feast's writes do not
                conn.set_autocommit(autocommit)
            yield conn
        except DATABASE_ERRORS:
            self.retire(conn)
            raise
        finally:
            self._release(conn)

    def execute(self, conn: psycopg.Connection, statement: bytes, query: bytes, params: Sequence[bytes]) -> Any:
        """The ``PGresult`` of the server-side prepared statement ``statement`` (``query``, prepared on the first use
        on ``conn``) with binary parameters and results; a database error raises as psycopg's error for it.

        libpq through psycopg's ``pgconn``, which releases the GIL while it waits: for a request's few rows psycopg's
        cursor (parameter adaptation, its prepare bookkeeping, row loading) costs half as much again as PostgreSQL's
        answer. The connection's lock serializes its users, as a cursor does."""
        with conn.lock:
            pgconn = conn.pgconn
            prepared = self._prepared.setdefault(conn, set())
            for attempt in (1, 2):
                if statement not in prepared:
                    _check(pgconn.prepare(statement, query), conn)
                    prepared.add(statement)
                try:
                    return _check(pgconn.exec_prepared(statement, params, [BINARY] * len(params), BINARY), conn)
                except psycopg.errors.InvalidSqlStatementName:  # deallocated meanwhile (DISCARD ALL, a pooler)
                    prepared.discard(statement)
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def _usable_current(self) -> psycopg.Connection | None:
        conn = self._current
        if conn is not None and not conn.closed:
            self._users[conn] = self._users.get(conn, 0) + 1
            return conn
        return None

    def _acquire(self, may_connect: bool = True) -> tuple[psycopg.Connection, bool]:
        with self._lock:
            conn = self._usable_current()
        if conn is not None:
            return conn, False
        if not may_connect:
            raise NoConnection()
        seen = self._attempts
        with self._connecting:
            with self._lock:  # another thread may have connected, or failed to, while this one waited
                conn = self._usable_current()
                if conn is not None:
                    return conn, False
                if self._attempts != seen and self._failure:
                    raise psycopg.OperationalError(f"{self._failure} (a connection attempt that ended "
                                                   f"{time.monotonic() - self._failed_at:.2f} s ago)")
            try:
                conn = self._connect()
            except DATABASE_ERRORS as exc:
                with self._lock:
                    self._attempts += 1
                    self._failed_at, self._failure = time.monotonic(), first_line(exc)
                raise
            with self._lock:
                self._attempts += 1
                self._failure = ""
                self._current = conn
                self._users[conn] = self._users.get(conn, 0) + 1
            return conn, True

    def _release(self, conn: psycopg.Connection) -> None:
        with self._lock:
            left = self._users[conn] - 1
            if left:
                self._users[conn] = left
                return
            del self._users[conn]
            close = conn in self._retired
            self._retired.discard(conn)
        if close:
            _close_quietly(conn)

    @contextlib.contextmanager
    def holding(self, conn: psycopg.Connection) -> Iterator[bool]:
        """True, and ``conn`` stays open until the block ends, when a read is still using it; else False."""
        with self._lock:
            held = conn in self._users
            if held:
                self._users[conn] += 1
        try:
            yield held
        finally:
            if held:
                self._release(conn)

    def retire(self, conn: psycopg.Connection) -> None:
        """Hand ``conn`` out no more; close it now if nobody reads through it, else when its last user is done."""
        with self._lock:
            if self._current is conn:
                self._current = None
            if conn in self._retired or conn.closed and conn not in self._users:
                return
            in_use = conn in self._users
            if in_use:
                self._retired.add(conn)
        FEATURE_STORE_RECONNECTS.inc()
        if not in_use:
            _close_quietly(conn)

    def reset(self) -> None:
        """Retire the current connection, if any: the next read connects afresh."""
        with self._lock:
            conn = self._current
        if conn is not None:
            self.retire(conn)

    @property
    def current(self) -> psycopg.Connection | None:
        return self._current

    def has_open_connection(self) -> bool:
        conn = self._current
        return conn is not None and not conn.closed


class Watchdog:
    """Bounds the lookups that read on the event loop: one daemon thread that, when a guarded read passes its
    deadline, retires its connection and shuts its socket down, which ends the blocked read at once (also when
    PostgreSQL no longer answers at all, where a cancel request would not)."""

    def __init__(self, keeper: OnlineConnection):
        self.keeper = keeper
        self._guarded: dict[int, tuple[float, ReadTicket]] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, ticket: ReadTicket, seconds: float) -> Iterator[None]:
        key = id(ticket)
        with self._wake:
            self._guarded[key] = (time.monotonic() + seconds, ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lookup-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._wake:
                self._guarded.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                expired = [ticket for deadline, ticket in self._guarded.values() if deadline <= now]
                for ticket in expired:
                    del self._guarded[id(ticket)]
                if not expired:
                    nearest = min((deadline for deadline, _ in self._guarded.values()), default=now + 0.5)
                    self._wake.wait(timeout=max(0.001, min(nearest - now, 0.5)))
                    continue
            for ticket in expired:
                self._end(ticket)

    def _end(self, ticket: ReadTicket) -> None:
        ticket.timed_out = True
        FEATURE_LOOKUP_TIMEOUTS.inc()
        conn = ticket.conn
        if conn is None:
            return
        # Held, the connection cannot be closed meanwhile and its socket's descriptor reused by another connection.
        with self.keeper.holding(conn) as in_use:
            self.keeper.retire(conn)
            if not in_use:  # the read ended after all
                return
            with contextlib.suppress(Exception):
                duplicate = socket.socket(fileno=os.dup(conn.pgconn.socket))
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                finally:
                    duplicate.close()


def _check(result: Any, conn: psycopg.Connection) -> Any:
    """``result`` if it succeeded, else psycopg's error for it: a lost connection (no SQLSTATE, the connection bad)
    is an OperationalError, as psycopg's cursor reports it."""
    if result.status in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK):
        return result
    if conn.pgconn.status == psycopg.pq.ConnStatus.BAD and not result.error_field(psycopg.pq.DiagnosticField.SQLSTATE):
        raise psycopg.OperationalError(result.get_error_message(conn.info.encoding) or "the connection was lost")
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


def _close_quietly(conn: psycopg.Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _cancel_quietly(conn: psycopg.Connection) -> None:
    """Ask PostgreSQL to cancel the query ``conn`` is running (a new connection to the server; blocking)."""
    with contextlib.suppress(Exception):
        conn.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)


def _connect_function(online_config: Any, statement_timeout_ms: int) -> Any:
    """Feast's connection parameters for the online store (``_get_conninfo``/``_get_conn_kwargs``, as Feast's own
    ``_get_conn`` uses them), plus what a server needs: autocommit reads, a name in pg_stat_activity, a server-side
    statement timeout, TCP keepalives so a read on a vanished host ends, UTF-8 text whatever the database's or the
    environment's encoding (feature names are matched as UTF-8 bytes), and generic plans for the prepared read
    (by its estimates PostgreSQL would plan ``entity_key = ANY($1)`` afresh on every execution, a third of the
    round trip at a request's few rows, and pick the same index scan)."""
    from feast.infra.utils.postgres.connection_utils import _get_conn_kwargs, _get_conninfo

    kwargs = _get_conn_kwargs(online_config)
    kwargs["options"] = (f"{kwargs['options']} -c statement_timeout={statement_timeout_ms} "
                         "-c plan_cache_mode=force_generic_plan")
    keepalives_idle = online_config.keepalives_idle or 10

    def connect() -> psycopg.Connection:
        return psycopg.connect(conninfo=_get_conninfo(online_config), autocommit=True, client_encoding="UTF8",
                               application_name=APPLICATION_NAME, keepalives=1, keepalives_idle=keepalives_idle,
                               keepalives_interval=5, keepalives_count=3, **kwargs)

    return connect


@dataclass(frozen=True)
class ViewRead:
    """One feature view of the feature service: the model's features it holds, and how to key, read and age its
    rows."""

    view: Any  # feast.FeatureView
    features: list[str]
    join_keys: list[str]
    key_types: dict[str, Any]  # join key -> feast ValueType
    ttl: dt.timedelta | None
    query: bytes  # PostgreSQL: every online row of the entity keys given as a parameter

    @functools.cached_property
    def statement(self) -> bytes:
        """The prepared statement's name on a connection (one per query text)."""
        return b"sales_forecast_" + hashlib.sha1(self.query).hexdigest()[:16].encode()

    @functools.cached_property
    def columns(self) -> dict[bytes, int]:
        """Feature name as PostgreSQL sends it (UTF-8) -> its row in the view's values."""
        return {name.encode(): j for j, name in enumerate(self.features)}

    def entity_keys(self, entity_rows: Mapping[str, list[int]]) -> list[Any]:
        """Feast's EntityKey protos of the rows, in order."""
        types = tuple(self.key_types[key] for key in self.join_keys)
        return [_entity_key(tuple(self.join_keys), types, ids)
                for ids in zip(*(entity_rows[key] for key in self.join_keys), strict=True)]

    def serialized_keys(self, entity_rows: Mapping[str, list[int]], version: int) -> list[bytes]:
        """Feast's serialized entity keys (the online table's ``entity_key``), remembered per key."""
        types = tuple(self.key_types[key] for key in self.join_keys)
        return [_serialized_key(tuple(self.join_keys), types, ids, version)
                for ids in zip(*(entity_rows[key] for key in self.join_keys), strict=True)]


def _entity_key(join_keys: tuple[str, ...], types: tuple[Any, ...], ids: tuple[int, ...]) -> Any:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values

    values = [python_values_to_proto_values([value], kind)[0] for value, kind in zip(ids, types, strict=True)]
    return EntityKey(join_keys=join_keys, entity_values=values)


@functools.lru_cache(maxsize=200_000)
def _serialized_key(join_keys: tuple[str, ...], types: tuple[Any, ...], ids: tuple[int, ...], version: int) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key

    return serialize_entity_key(_entity_key(join_keys, types, ids), entity_key_serialization_version=version)


def _postgres_query(store: Any, view: Any) -> bytes:
    """Feast's PostgreSQL online read (``PostgreSQLOnlineStore.online_read``) of all of an entity's rows, the keys a
    binary bytea[] parameter; NULLs as what they mean here (no value, no event time), so every result field is set."""
    from feast.infra.online_stores.helpers import compute_table_id
    from psycopg import sql

    table = compute_table_id(store.config.project, view, store.config.registry.enable_online_feature_view_versioning)
    return sql.SQL("SELECT entity_key, feature_name, coalesce(value, ''::bytea), "
                   "coalesce(extract(epoch FROM event_ts)::float8, 'NaN') FROM {} WHERE entity_key = ANY($1)"
                   ).format(sql.Identifier(table)).as_bytes(None)


def plan_reads(store: Any, service: Any, features: Sequence[str]) -> list[ViewRead]:
    """The feature views to read for ``features``, from the service's projections (PipelineError for what the
    server cannot read online: an on-demand view, an entity alias, a view not keyed by store and dept)."""
    from feast.errors import FeatureViewNotFoundException

    holder: dict[str, Any] = {}
    for projection in service.feature_view_projections:
        try:
            view = store.get_feature_view(projection.name)
        except FeatureViewNotFoundException:
            raise PipelineError(f"feature service {service.name} holds {projection.name}, which is not a feature view "
                                "(the server reads feature views online; on-demand views are not served)") from None
        if projection.join_key_map:
            raise PipelineError(f"feature service {service.name} maps the join keys of {projection.name} "
                                f"({projection.join_key_map}); the server reads views keyed by store and dept")
        for feature in projection.features:
            holder.setdefault(feature.name, view)
    reads = []
    for view in {id(v): v for v in holder.values()}.values():
        wanted = [name for name in features if holder.get(name) is view]
        if not wanted:
            continue
        key_types = {column.name: column.dtype.to_value_type() for column in view.entity_columns}
        if sorted(key_types) != sorted(Instance._fields):
            raise PipelineError(f"feature view {view.name} is keyed by {sorted(key_types)}; the server's instances "
                                f"name {list(Instance._fields)}")
        reads.append(ViewRead(view, wanted, list(key_types), key_types, view.ttl or None, _postgres_query(store, view)))
    return reads


class OnlineFeatureLookup:
    def __init__(self, store: Any, features: Sequence[str], where: str, statement_timeout_ms: int = 5000):
        self.store = store
        self.features = list(features)
        self.where = where
        self._load_service()
        self.check_features(self.features)
        online = self._online_store()
        self.connection: OnlineConnection | None = None
        self.watchdog: Watchdog | None = None
        if hasattr(online, "_get_conn") and store.config.online_store.type == "postgres":
            self.connection = OnlineConnection(_connect_function(store.config.online_store, statement_timeout_ms))
            self.watchdog = Watchdog(self.connection)
            online._conn, online._conn_pool = None, None
            online._get_conn = self.connection.connection  # the instance attribute shadows Feast's method

    def _load_service(self, service: Any = None, plans: dict[tuple[str, ...], list[ViewRead]] | None = None) -> None:
        self.service = service or self.store.get_feature_service(FEATURE_SERVICE)
        self.served_features = frozenset(f.name for projection in self.service.feature_view_projections
                                         for f in projection.features)
        self._plans: dict[tuple[str, ...], list[ViewRead]] = plans or {}

    @classmethod
    def open(cls, settings: Settings, features: Sequence[str], timeout_seconds: float = 5.0) -> OnlineFeatureLookup:
        pg = settings.postgres
        return cls(open_serving_store(settings), features, where=f"{pg.host}:{pg.port}/{pg.database}",
                   statement_timeout_ms=int(timeout_seconds * 1000))

    def check_features(self, features: Sequence[str]) -> None:
        missing = [name for name in features if name not in self.served_features]
        if missing:
            raise PipelineError(f"the model needs features that feature service {FEATURE_SERVICE} lacks: {missing}")
        self.reads(features)

    def reads(self, features: Sequence[str]) -> list[ViewRead]:
        key = tuple(features)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_reads(self.store, self.service, features)
        return plan

    def can_read_inline(self) -> bool:
        """Whether a read can run on the event loop now: an open connection (no connecting) and a watchdog."""
        return self.watchdog is not None and self.connection.has_open_connection()

    def rows_inline(self, instances: Sequence[Instance], features: Sequence[str], timeout: float) -> FeatureRows:
        """``rows`` in the calling thread (the event loop), on the open connection, ended by the watchdog after
        ``timeout``: no thread hand-off for the common case. NoConnection when there is no open connection (the
        caller reads from a worker thread then, which may connect)."""
        ticket = ReadTicket(inline=True, timeout=timeout)
        with self.watchdog.guard(ticket, timeout):
            return self.rows(instances, features, ticket)

    def rows(self, instances: Sequence[Instance], features: Sequence[str] | None = None,
             ticket: ReadTicket | None = None) -> FeatureRows:
        """The features (default: the lookup's) of each instance, as column arrays in request order;
        UnknownEntities unless all are complete and fresher than the ttl."""
        features = self.features if features is None else features
        entity_rows = {"store": [i.store for i in instances], "dept": [i.dept for i in instances]}
        ticket = ticket or ReadTicket()
        columns: FeatureRows = {}
        stale, absent = np.zeros(len(instances), dtype=bool), np.zeros(len(instances), dtype=bool)
        reads = self.reads(features)
        for read in reads:
            values, stamps = self._read(read, entity_rows, ticket)
            columns.update(zip(read.features, values, strict=True))
            stale |= _older_than(stamps, read.ttl)
            absent |= np.isnan(stamps)
        self._check_complete(instances, columns, stale, [read.ttl for read in reads if read.ttl], absent)
        columns.update({name: np.array(ids, dtype="int64") for name, ids in entity_rows.items()})
        return columns

    def _read(self, read: ViewRead, entity_rows: Mapping[str, list[int]], ticket: ReadTicket) -> ViewRows:
        local = self.connection.local if self.connection is not None else threading.local()
        local.ticket = ticket
        try:
            for attempt in (1, 2):
                ticket.conn, ticket.fresh = None, False
                try:
                    return self._read_once(read, entity_rows)
                except DATABASE_ERRORS as exc:
                    if ticket.timed_out:
                        raise LookupTimedOut(f"the online feature lookup took over {ticket.timeout:g} s (PostgreSQL at "
                                             f"{self.where}); retry shortly") from exc
                    # The keeper retired the connection that failed. Retry once only when it was a cached one.
                    if attempt == 2 or ticket.conn is None or ticket.fresh:
                        raise FeaturesUnavailable(
                            f"the online feature store (PostgreSQL at {self.where}) is unavailable: "
                            f"{first_line(exc)}; retry shortly") from exc
            raise AssertionError("unreachable")
        finally:
            local.ticket = None

    def _read_once(self, read: ViewRead, entity_rows: Mapping[str, list[int]]) -> ViewRows:
        if self.connection is None:  # another online store: its online_read
            keys = read.entity_keys(entity_rows)
            found = self._online_store().online_read(self.store.config, read.view, keys, read.features)
            rows = [row or {} for _, row in found]
            values = np.array([[_float(row[name]) if name in row else np.nan for row in rows]
                               for name in read.features], dtype="float64").reshape(len(read.features), len(found))
            return values, np.array([_epoch(stamp) for stamp, _ in found], dtype="float64")
        serialized = read.serialized_keys(entity_rows, self.store.config.entity_key_serialization_version)
        unique = list(dict.fromkeys(serialized))
        with self.connection.connection(autocommit=True) as conn:
            result = self.connection.execute(conn, read.statement, read.query, [_bytea_array(unique)])
        return _view_rows(*_online_rows(result), unique, read.columns, serialized)

    def abandon(self, ticket: ReadTicket) -> None:
        """A lookup that timed out: retire the connection it reads through and cancel its query, so the next
        requests connect afresh instead of queueing behind it; its thread closes the connection when it returns."""
        FEATURE_LOOKUP_TIMEOUTS.inc()
        conn = ticket.conn
        if conn is None or self.connection is None:
            return
        self.connection.retire(conn)
        threading.Thread(target=_cancel_quietly, args=(conn,), name="cancel-abandoned-lookup", daemon=True).start()

    @staticmethod
    def _check_complete(instances: Sequence[Instance], columns: FeatureRows, stale: np.ndarray,
                        ttls: Sequence[dt.timedelta] = (), absent: np.ndarray | None = None) -> None:
        """UnknownEntities for instances without an online row (``absent``), with a missing required feature (the
        optional ones, year-ago sales..., are NULL without that history), or with a row older than the ttl."""
        required = [columns[name] for name in REQUIRED_FEATURES if name in columns]
        incomplete = (~np.isfinite(np.array(required)).all(axis=0) if required
                      else np.zeros(len(instances), dtype=bool))
        if absent is not None:
            incomplete |= absent
        stale = ~incomplete & stale
        if not (incomplete.any() or stale.any()):
            return
        missing = [{**instances[i].as_dict(), "index": int(i), "reason": "older than the ttl" if stale[i]
                    else "no online features"} for i in np.flatnonzero(incomplete | stale)]
        named = ", ".join(f"store {m['store']} dept {m['dept']}" for m in missing[:LISTED_KEYS])
        more = f" and {len(missing) - LISTED_KEYS} more" if len(missing) > LISTED_KEYS else ""
        ttl = (f"; rows older than the feature ttl ({', '.join(sorted({_duration(t) for t in ttls}))}) count as "
               "missing" if ttls else "")
        raise UnknownEntities(f"no current online features for {len(missing)} of {len(instances)} instances: "
                              f"{named}{more}{ttl}", missing=missing)

    def _online_store(self) -> Any:
        return self.store._get_provider().online_store

    def reset_connection(self) -> None:
        """Retire the online store's current connection; the next read connects afresh."""
        if self.connection is not None:
            self.connection.reset()

    def refresh_registry(self) -> None:
        """Re-read the Feast registry (the serving store's cache never expires by itself: see open_serving_store),
        and with it the service's views (their ttl, their features). The read plans of the feature lists in use are
        rebuilt here, off the request path; if one cannot be (PipelineError: say, an on-demand view added to the
        service), the old service and plans keep serving."""
        self.store.refresh_registry()
        service = self.store.get_feature_service(FEATURE_SERVICE)
        plans = {features: plan_reads(self.store, service, features) for features in list(self._plans)}
        self._load_service(service, plans)


def _float(value: Any) -> float:
    """A ValueProto's number (NaN when it holds none: a NULL feature)."""
    kind = value.WhichOneof("val")
    return float(getattr(value, kind)) if kind else np.nan


def _doubles(values: Sequence[bytes]) -> np.ndarray:
    """Serialized ValueProtos -> float64, NaN for a NULL (Feast writes an empty Value). Numeric features are stored as
    double_val, whose wire form is one tag byte and the double: those are read as one array, anything else (another
    type in the batch) value by value with protobuf."""
    lengths = np.fromiter(map(len, values), dtype=np.intp, count=len(values))
    doubles = lengths == 9
    if (doubles | (lengths == 0)).all():
        wire = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, 9)
        if (wire[:, 0] == DOUBLE_TAG).all():
            out = np.full(len(values), np.nan)
            out[doubles] = wire[:, 1:].copy().view("<f8").ravel()
            return out
    from feast.protos.feast.types.Value_pb2 import Value

    return np.array([_float(Value.FromString(value)) for value in values], dtype="float64")


def _bytea_array(items: Sequence[bytes]) -> bytes:
    """PostgreSQL's binary form of a one-dimensional bytea[] (``array_send``): dimensions, no NULLs, the element type,
    length and lower bound, then each element's length and bytes."""
    return b"".join([struct.pack("!iiiii", 1, 0, BYTEA_OID, len(items), 1),
                     *(struct.pack("!i", len(item)) + item for item in items)])


def _online_rows(result: Any) -> tuple[list[bytes], list[bytes], list[bytes], np.ndarray]:
    """A binary ``PGresult`` of ``_postgres_query`` -> its columns: entity keys, feature names (UTF-8), serialized
    values, event times (epoch seconds, sent as big-endian float8)."""
    get, rows = result.get_value, range(result.ntuples)
    keys, names, values = ([get(i, j) for i in rows] for j in range(3))
    return keys, names, values, np.frombuffer(b"".join([get(i, 3) for i in rows]), dtype=">f8").astype("float64")


def _view_rows(keys: Sequence[bytes], names: Sequence[bytes], blobs: Sequence[bytes], stamps: np.ndarray,
               entities: Sequence[bytes], columns: Mapping[bytes, int], order: Sequence[bytes]) -> ViewRows:
    """Online rows (entity key, feature name, value, event time in epoch seconds) of the distinct ``entities`` ->
    ``ViewRows`` in the entity order ``order`` (where a key may repeat). Only the features in ``columns`` (name ->
    row) count, for the values and for the entity's oldest event time (the ttl ages an entity by it)."""
    position = {key: i for i, key in enumerate(entities)}
    values = np.full((len(columns), len(entities)), np.nan)
    oldest = np.full(len(entities), np.inf)
    found = np.zeros(len(entities), dtype=bool)
    wanted = [i for i, name in enumerate(names) if name in columns]
    if len(wanted) < len(names):
        keys, names, blobs = [[seq[i] for i in wanted] for seq in (keys, names, blobs)]
        stamps = stamps[wanted]
    if wanted:
        at = np.fromiter(map(position.__getitem__, keys), dtype=np.intp, count=len(keys))
        values[np.fromiter(map(columns.__getitem__, names), dtype=np.intp, count=len(names)), at] = _doubles(blobs)
        with np.errstate(invalid="ignore"):  # a NULL event time is NaN, and stays NaN: never fresh
            np.minimum.at(oldest, at, stamps)
        found[at] = True
    oldest[~found] = np.nan
    index = [position[key] for key in order]
    return values[:, index], oldest[index]


def _epoch(stamp: dt.datetime | None) -> float:
    """An event time in epoch seconds; naive times are UTC (what Feast writes and its stores return); NaN for none."""
    if stamp is None:
        return np.nan
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


def _older_than(stamps: np.ndarray, ttl: dt.timedelta | None) -> np.ndarray:
    """Per entity: its row's event time (epoch seconds) is older than ``ttl`` before now (no row: False, it is
    missing instead)."""
    if ttl is None:
        return np.zeros(len(stamps), dtype=bool)
    return stamps < time.time() - ttl.total_seconds()


def _duration(delta: dt.timedelta) -> str:
    return f"{delta.days} days" if delta == dt.timedelta(days=delta.days) else str(delta)
