"""The bulk online store (sales_forecast/online_store.py) against Feast's own PostgreSQLOnlineStore on a real
PostgreSQL: the same writes leave the same table rows, Feast's reads (and the model server's) read them, unchanged
rows are not rewritten, a write reads only its own keys' stored rows, a failed write leaves the store usable, and the
table keeps one index, its primary key, which Feast's reads use.
The Ray engine writing through it is step 1's own test (test_step1_feature_pipeline)."""

from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
from conftest import database_settings
from psycopg import sql

from sales_forecast.config import Settings
from sales_forecast.online_store import (
    STAGING_TABLE,
    STORE_TYPE,
    BulkPostgreSQLOnlineStore,
    insert_statement,
    online_columns,
    primary_key_as_entity_key_index,
    staged_keys_statement,
    upsert_statement,
)
from sales_forecast.serving.online_features import _postgres_query
from sales_forecast.stack.processes import wait_until

T0 = pd.Timestamp("2026-11-27", tz="UTC")
# as text: Feast stores a NaT created timestamp as year 48113, which psycopg cannot read back as a datetime
COLUMNS = "entity_key, feature_name, value, value_text, vector_value, event_ts::text, created_ts::text"


def _definitions():
    from feast import Entity, FeatureView, Field, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.types import Float32, Float64, Int32, Int64, String

    store = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64)
    dept = Entity(name="dept", join_keys=["dept"], value_type=ValueType.INT64)
    source = PostgreSQLSource(name="rows_source", table="rows_source", timestamp_field="event_timestamp",
                              created_timestamp_column="created")
    view = FeatureView(name="series", entities=[store, dept], ttl=dt.timedelta(days=3650), source=source,
                       schema=[Field(name="store", dtype=Int64), Field(name="dept", dtype=Int64),
                               Field(name="level", dtype=Float64), Field(name="units", dtype=Int64),
                               Field(name="label", dtype=String)])
    levels = FeatureView(name="levels", entities=[store, dept], ttl=dt.timedelta(days=3650), source=source,
                         schema=[Field(name="store", dtype=Int64), Field(name="dept", dtype=Int64),
                                 Field(name="level", dtype=Float64), Field(name="ratio", dtype=Float32),
                                 Field(name="units", dtype=Int64), Field(name="rank", dtype=Int32)])
    return [store, dept, source, view, levels]


def _feature_store(settings: Settings, project: str, online_type: str, db_schema: str = "public", **online: Any):
    """A FeatureStore of ``_definitions``, applied; ``online``: more keys of its online store."""
    from feast import FeatureStore, RepoConfig

    pg = settings.postgres
    connection = {"host": pg.host, "port": pg.port, "database": pg.database, "user": pg.user,
                  "password": pg.password, "sslmode": "disable"}
    config = RepoConfig(project=project, provider="local", entity_key_serialization_version=3,
                        registry={"registry_type": "sql", "path": pg.sqlalchemy_url(), "cache_ttl_seconds": 0},
                        offline_store={"type": "postgres", "db_schema": "public", **connection},
                        online_store={"type": online_type, "db_schema": db_schema, **connection, **online})
    store = FeatureStore(config=config)
    store.apply(_definitions())
    return store


@pytest.fixture(scope="module")
def stores(stack_settings: Settings):
    """(Feast's PostgreSQL online store, the bulk one), each its own project (and so its own online table) on one
    database whose TimeZone is not UTC: Feast writes naive UTC timestamps, which PostgreSQL reads in that zone."""
    settings = database_settings(stack_settings, "bulk_online_store")
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{settings.postgres.database}" SET timezone TO \'America/New_York\'')
    return settings, _feature_store(settings, "feast_pg", "postgres"), _feature_store(settings, "bulk_pg", STORE_TYPE)


def _rows(settings: Settings, project: str, view: str = "series") -> list[tuple]:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute(f'SELECT {COLUMNS} FROM "{project}_{view}" ORDER BY entity_key, feature_name').fetchall()


def _xmins(settings: Settings, project: str) -> dict[tuple, str]:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        rows = conn.execute(f'SELECT entity_key, feature_name, xmin::text FROM "{project}_series"').fetchall()
    return {(key, name): xmin for key, name, xmin in rows}


def _frame(stores_depts: list[tuple[int, int]], level: list[float | None], units: list[int | None],
           label: list[str | None], when: list[pd.Timestamp], created: list[pd.Timestamp | None]) -> pd.DataFrame:
    return pd.DataFrame({
        "store": [s for s, _ in stores_depts], "dept": [d for _, d in stores_depts],
        "level": pd.array(level, dtype="Float64"), "units": pd.array(units, dtype="Int64"),
        "label": pd.array(label, dtype="string"), "event_timestamp": when,
        "created": pd.Series(created, dtype="datetime64[ns, UTC]")})


def _write_both(stores, frame: pd.DataFrame) -> None:
    settings, feast_store, bulk_store = stores
    for store in (feast_store, bulk_store):
        store.write_to_online_store("series", frame)


def test_the_config_is_feasts_postgres_store_with_the_bulk_write(stores) -> None:
    _, _, bulk = stores
    assert bulk.config.online_store.type == "postgres"  # what Feast's store and the model server check
    assert type(bulk._get_provider().online_store) is BulkPostgreSQLOnlineStore


def test_writes_leave_the_rows_feasts_store_leaves(stores) -> None:
    """New rows, NULL values, strings and integers, a key twice in one write (the later wins), aware timestamps
    with and without a created timestamp, then a second write changing some rows and repeating others."""
    settings = stores[0]
    later = T0 + pd.Timedelta(hours=5)
    _write_both(stores, _frame(
        [(1, 12), (11, 2), (1, 12), (3, 4), (5, 6)], [1.5, None, 2.5, 1e300, -0.1], [7, 8, None, 2**40, -3],
        ["a", None, "ü b", "", "x"], [T0, T0, later, T0, T0], [None, T0, later, None, T0]))
    assert _rows(settings, "bulk_pg") == _rows(settings, "feast_pg")
    assert len(_rows(settings, "bulk_pg")) == 4 * 3
    _write_both(stores, _frame(
        [(1, 12), (11, 2), (7, 7)], [2.5, 3.0, 4.0], [None, 8, 1], ["ü b", "new", None],
        [later, T0 + pd.Timedelta(days=1), T0], [later, T0, None]))
    assert _rows(settings, "bulk_pg") == _rows(settings, "feast_pg")
    assert len(_rows(settings, "bulk_pg")) == 5 * 3


def _indexes(settings: Settings, table: str) -> list[tuple[str, bool, str]]:
    """(name, primary, oid) of each index of ``table``."""
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute("SELECT indexrelid::regclass::text, indisprimary, indexrelid::text FROM pg_index "
                            "WHERE indrelid = to_regclass(%s) ORDER BY 1",
                            (sql.Identifier(table).as_string(conn),)).fetchall()


def _layout(settings: Settings, table: str) -> list[tuple[str, bool]]:
    """(name, primary) of each index of ``table``."""
    return [(name, primary) for name, primary, _ in _indexes(settings, table)]


def test_the_online_table_keeps_one_index_its_primary_key_under_the_name_feasts_apply_checks(stores) -> None:
    """Feast's table has its primary key and ``<table>_ek`` on entity_key, the key's first column; the bulk store's
    has the primary key alone, under that name, so an apply builds nothing and a write maintains one index."""
    settings, _, bulk = stores
    assert _layout(settings, "feast_pg_series") == [
        ("feast_pg_series_ek", False), ("feast_pg_series_fts_idx", False), ("feast_pg_series_pkey", True)]
    before = _indexes(settings, "bulk_pg_series")  # the full-text index of string features stays Feast's
    assert [(name, primary) for name, primary, _ in before] == [("bulk_pg_series_ek", True),
                                                                 ("bulk_pg_series_fts_idx", False)]
    assert _layout(settings, "bulk_pg_levels") == [("bulk_pg_levels_ek", True)]
    bulk.apply(_definitions())
    assert _indexes(settings, "bulk_pg_series") == before  # the same index: nothing dropped or rebuilt

    # a table Feast's store made and wrote, then applied with the bulk store: its rows kept, Feast's index dropped
    frame = _frame([(41, 1), (41, 2)], [1.0, 2.0], [1, 2], ["a", "b"], [T0, T0], [None, None])
    _feature_store(settings, "feast_then_bulk", "postgres").write_to_online_store("series", frame)
    rows = _rows(settings, "feast_then_bulk")
    moved = _feature_store(settings, "feast_then_bulk", STORE_TYPE)
    assert _layout(settings, "feast_then_bulk_series") == [
        ("feast_then_bulk_series_ek", True), ("feast_then_bulk_series_fts_idx", False)]
    assert _rows(settings, "feast_then_bulk") == rows
    moved.write_to_online_store("series", frame.assign(level=[3.0, 4.0]))
    assert len(_rows(settings, "feast_then_bulk")) == len(rows)
    _feature_store(settings, "feast_then_bulk", "postgres")  # Feast's apply finds the name taken: builds nothing
    assert [primary for _, primary in _layout(settings, "feast_then_bulk_series")] == [True, False]

    # names past PostgreSQL's 63 bytes, which it truncates, applied twice, written and torn down. Past 63, the
    # table's own name: Feast's index names truncate to it, so Feast's apply creates neither of its indexes.
    for project, indexes in (("p" * 54, [True, False]), ("q" * 60, [True])):
        long = _feature_store(settings, project, STORE_TYPE)
        table = f"{project}_series"[:63]
        assert [primary for _, primary in _layout(settings, table)] == indexes, project
        long.apply(_definitions())
        long.write_to_online_store("series", frame)
        assert [primary for _, primary in _layout(settings, table)] == indexes, project
        # the online store's own teardown: FeatureStore.teardown would also empty the registry all projects share
        long._get_provider().online_store.teardown(long.config, [long.get_feature_view("series")], [])
        with psycopg.connect(settings.postgres.libpq_url()) as conn:
            assert conn.execute("SELECT to_regclass(%s)", (f'"{table}"',)).fetchone()[0] is None


def test_an_index_of_that_name_that_is_not_feasts_is_left_alone(stores) -> None:
    """Only Feast's index (entity_key alone, no constraint) is dropped: another index under its name stays, and the
    primary key keeps its own name."""
    settings, _, _ = stores
    project = "own_index"
    _feature_store(settings, project, "postgres")
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f'DROP INDEX "{project}_series_ek"')
        conn.execute(f'CREATE INDEX "{project}_series_ek" ON "{project}_series" (feature_name, entity_key)')
    _feature_store(settings, project, STORE_TYPE)
    assert _layout(settings, f"{project}_series") == [
        (f"{project}_series_ek", False), (f"{project}_series_fts_idx", False), (f"{project}_series_pkey", True)]


def test_two_applies_at_once_change_the_index_once(stores) -> None:
    """Two applies on a table Feast's store made: the second looked at the catalog before the first committed, so it
    also sees Feast's index. It waits for the table's lock, looks again, finds the primary key under the name, and
    does nothing (dropping "the index of that name" then would hit the primary key)."""
    settings, _, _ = stores
    project = "two_applies"
    _feature_store(settings, project, "postgres")
    table = f"{project}_series"
    first = psycopg.connect(settings.postgres.libpq_url())
    try:
        primary_key_as_entity_key_index(first.cursor(), table)  # its transaction open: the table locked

        def second() -> None:
            with psycopg.connect(settings.postgres.libpq_url()) as conn:
                primary_key_as_entity_key_index(conn.cursor(), table)

        with ThreadPoolExecutor(1) as pool:
            applied = pool.submit(second)
            wait_until(lambda: _waiting_backends(settings) > 0, 30, alive=lambda: not applied.done())
            first.commit()
            applied.result(timeout=60)
    finally:
        first.close()
    assert _layout(settings, table) == [
        (f"{table}_ek", True), (f"{table}_fts_idx", False)]


def test_a_failed_apply_leaves_the_store_usable(stores) -> None:
    """Feast's part of ``update`` failing (here: a sequence holds the name of a view's table, so Feast's CREATE
    TABLE IF NOT EXISTS skips it and its CREATE INDEX fails) rolls back the store's cached connection."""
    from feast import FeatureView

    settings, _, bulk = stores
    store, dept, source, series, _ = _definitions()
    blocked = FeatureView(name="blocked", entities=[store, dept], ttl=series.ttl, source=source, schema=series.schema)
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute('CREATE SEQUENCE "bulk_pg_blocked"')
    try:
        with pytest.raises(psycopg.errors.Error):
            bulk._get_provider().online_store.update(bulk.config, [], [blocked], [], [], True)
    finally:
        with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
            conn.execute('DROP SEQUENCE "bulk_pg_blocked"')
    frame = _frame([(52, 1)], [2.0], [1], ["a"], [T0], [None])
    bulk.write_to_online_store("series", frame)
    assert bulk.get_online_features(features=["series:level"], entity_rows=[{"store": 52, "dept": 1}]).to_dict()[
        "level"] == [2.0]


def test_feasts_reads_use_the_primary_key(stores) -> None:
    """Feast's own online read (its statement, by key and feature) finds rows through the primary key, not by
    reading the table."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.postgres_online_store.postgres import PostgreSQLOnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    settings, _, bulk = stores
    series = [(2000 + n // 50, n % 50) for n in range(5_000)]
    bulk.write_to_online_store("series", _frame(series, [1.0] * len(series), [1] * len(series), ["x"] * len(series),
                                                [T0] * len(series), [None] * len(series)))
    keys = [serialize_entity_key(EntityKey(join_keys=["store", "dept"], entity_values=[
        Value(int64_val=store), Value(int64_val=dept)]), entity_key_serialization_version=3)
        for store, dept in series[:10]]
    view = bulk.get_feature_view("series")
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute('ANALYZE "bulk_pg_series"')
        for features in (["level", "units"], None):
            query, params = PostgreSQLOnlineStore._construct_query_and_params(bulk.config, view, keys, features)
            plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params if features else params[:1]
                                ).fetchone()[0]
            assert _relations_scanned(plan[0]["Plan"]) == set(), plan
            assert "'Index Name': 'bulk_pg_series_ek'" in str(plan), plan
        # the model server's prepared read, planned once for any keys (its connections force generic plans)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(sql.SQL("PREPARE server_read(bytea[]) AS ") + sql.SQL(_postgres_query(bulk, view).decode()))
        plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE server_read({})").format(sql.Literal(keys))
                            ).fetchone()[0]
        assert _relations_scanned(plan[0]["Plan"]) == set(), plan
        assert "'Index Name': 'bulk_pg_series_ek'" in str(plan), plan


def test_feasts_reads_read_the_bulk_writes(stores) -> None:
    """get_online_features through the bulk store, and through Feast's plain PostgreSQL store on the same table."""
    settings, _, bulk = stores
    frame = _frame([(21, 1), (21, 2)], [10.25, None], [3, 4], ["p", "q"], [T0, T0], [None, None])
    bulk.write_to_online_store("series", frame)
    plain = _feature_store(settings, "bulk_pg", "postgres")
    rows = [{"store": 21, "dept": 1}, {"store": 21, "dept": 2}, {"store": 99, "dept": 1}]
    for store in (bulk, plain):
        read = store.get_online_features(features=["series:level", "series:units", "series:label"],
                                         entity_rows=rows).to_dict()
        assert read["level"] == [10.25, None, None]
        assert read["units"] == [3, 4, None]
        assert read["label"] == ["p", "q", None]


def test_unchanged_rows_are_not_rewritten(stores) -> None:
    settings, _, bulk = stores
    frame = _frame([(31, 1), (31, 2)], [1.0, 2.0], [1, 2], ["a", "b"], [T0, T0], [None, None])
    bulk.write_to_online_store("series", frame)
    before = _xmins(settings, "bulk_pg")
    bulk.write_to_online_store("series", frame)
    assert _xmins(settings, "bulk_pg") == before
    frame.loc[1, "level"] = 2.5
    bulk.write_to_online_store("series", frame)
    after = _xmins(settings, "bulk_pg")
    changed = {key for key in before if after[key] != before[key]}
    assert len(changed) == 1 and next(iter(changed))[1] == "level"


def _relations_scanned(plan: dict) -> set[str]:
    """The relations a JSON plan reads with a sequential scan, subplans included."""
    scanned = {plan["Relation Name"]} if plan["Node Type"] == "Seq Scan" else set()
    for child in plan.get("Plans", []):
        scanned |= _relations_scanned(child)
    return scanned


def test_a_write_probes_the_stored_rows_of_its_keys_instead_of_reading_the_online_table(stores) -> None:
    """A write's upsert reads the stored rows of its own keys only: a plan that reads the whole online table (the
    hash anti-join of NOT EXISTS did) costs every write the table's size (`make bench-online-write`: 53.5 s for one
    write of unchanged rows into a 100x table, 8.3 s probing)."""
    settings, _, bulk = stores
    series = [(1000 + n // 50, n % 50) for n in range(20_000)]
    frame = _frame(series, [float(n) for n in range(len(series))], list(range(len(series))),
                   ["x"] * len(series), [T0] * len(series), [None] * len(series))
    bulk.write_to_online_store("series", frame)
    table = "bulk_pg_series"
    names = [name for name, _ in online_columns(False)]
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute(f'ANALYZE "{table}"')
        conn.execute(f"CREATE TEMPORARY TABLE {STAGING_TABLE} ON COMMIT DROP AS "
                     f'SELECT {", ".join(names)} FROM "{table}" WHERE feature_name <> \'label\'')
        conn.execute(f"INSERT INTO {STAGING_TABLE} SELECT '\\x01'::bytea || entity_key, {', '.join(names[1:])} "
                     f"FROM {STAGING_TABLE} LIMIT 5000")  # rows of keys the table does not hold
        scanned = {}
        for statement in (staged_keys_statement(table), upsert_statement(table, names), None,
                          insert_statement(table, names), upsert_statement(table, names, stored_keys=True)):
            if statement is None:  # the keys' temporary table, which the last two read
                conn.execute(staged_keys_statement(table))
                continue
            plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + statement).fetchone()[0]
            scanned[statement.as_string(conn)] = _relations_scanned(plan[0]["Plan"])
    assert len(scanned) == 4 and not any(table in relations for relations in scanned.values()), scanned


def _waiting_backends(settings: Settings) -> int:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0]


def test_a_write_whose_new_keys_another_write_stores_meanwhile_upserts_them(stores, caplog) -> None:
    """A write inserts the rows of keys the table did not hold without ON CONFLICT. Here another transaction stores
    one of those keys after the write looked and before it inserted: the write waits for that transaction, then
    fails its insert with a unique violation, rolls it back to its savepoint and upserts every row. It lands, its
    values win, and the table holds what Feast's store holds after the same write."""
    settings, feast_store, bulk_store = stores
    frame = _frame([(61, 1), (61, 2)], [6.5, 7.5], [1, 2], ["a", "b"], [T0, T0], [None, None])
    feast_store.write_to_online_store("series", frame)
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        key = conn.execute("SELECT entity_key FROM feast_pg_series WHERE feature_name = 'level' AND value_text = "
                           "'6.5'").fetchone()[0]
    other = psycopg.connect(settings.postgres.libpq_url())
    try:
        other.execute("INSERT INTO bulk_pg_series (entity_key, feature_name, value, event_ts) "
                      "VALUES (%s, 'level', '\\x00', now())", (key,))
        with ThreadPoolExecutor(1) as pool:
            write = pool.submit(bulk_store.write_to_online_store, "series", frame)
            wait_until(lambda: _waiting_backends(settings) > 0, 30, alive=lambda: not write.done())
            assert not write.done(), "the write did not wait for the other transaction's key"
            with caplog.at_level(logging.INFO, logger="sales_forecast.online_store"):
                other.commit()
                write.result(timeout=60)
    finally:
        other.close()
    assert "upserting every row instead" in caplog.text
    keys = {key}
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        keys |= {row[0] for row in conn.execute("SELECT entity_key FROM feast_pg_series WHERE value_text = 'b'")}
    assert [row for row in _rows(settings, "bulk_pg") if row[0] in keys] == \
        [row for row in _rows(settings, "feast_pg") if row[0] in keys]


def test_the_model_servers_lookup_reads_through_its_connection_keeper(small_features) -> None:
    """The model server replaces a PostgreSQL online store's connection with its own keeper (outages, timeouts):
    on the project's repo, where step 1 wrote through the bulk store, it still does, and reads step 1's rows."""
    from sales_forecast.features.derive import MODEL_FEATURES
    from sales_forecast.serving.instances import Instance
    from sales_forecast.serving.online_features import OnlineFeatureLookup

    settings, _ = small_features
    lookup = OnlineFeatureLookup.open(settings, MODEL_FEATURES)
    assert isinstance(lookup.store._get_provider().online_store, BulkPostgreSQLOnlineStore)
    assert lookup.connection is not None
    rows = lookup.rows([Instance(store=1, dept=12), Instance(store=11, dept=2)])
    assert lookup.connection.current is not None  # the read went through the keeper's connection
    assert rows["sales_lag_1"][0] != rows["sales_lag_1"][1]


def test_a_failed_write_leaves_the_store_usable(stores) -> None:
    """A write that fails (here: its table is gone) rolls back, so the store's cached connection keeps working."""
    from feast.infra.online_stores.postgres_online_store.postgres import PostgreSQLOnlineStore

    settings, _, bulk = stores
    frame = _frame([(51, 1)], [1.0], [1], ["a"], [T0], [None])
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute('ALTER TABLE "bulk_pg_series" RENAME TO "bulk_pg_series_away"')
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            bulk.write_to_online_store("series", frame)
    finally:
        with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
            conn.execute('ALTER TABLE "bulk_pg_series_away" RENAME TO "bulk_pg_series"')
    bulk.write_to_online_store("series", frame)
    assert isinstance(bulk._get_provider().online_store, PostgreSQLOnlineStore)
    assert bulk.get_online_features(features=["series:level"], entity_rows=[{"store": 51, "dept": 1}]).to_dict()[
        "level"] == [1.0]


def test_arrow_writes_leave_the_rows_feasts_store_leaves(stores) -> None:
    """online_write_arrow (the project's Ray engine's write) against Feast's PostgreSQLOnlineStore writing Feast's
    conversion of the same Arrow batch: encoded column by column (Float64, Float32, Int64, Int32 with NULL, NaN,
    -0.0 and extremes), then a batch it leaves to Feast's conversion (a NULL integer, NULL created timestamps),
    then the first again."""
    from feast.infra.online_stores.postgres_online_store.postgres import PostgreSQLOnlineStore

    from sales_forecast.online_store import ArrowRows, write_as_protos

    settings, feast_store, bulk_store = stores

    def batch(units: list[int | None], level: list[float | None], created: list[int | None]) -> pa.Table:
        return pa.table({
            "store": pa.array([1, 11, 3, -5], pa.int64()), "dept": pa.array([12, 2, 2**40, 0], pa.int64()),
            "level": pa.array(level, pa.float64()), "ratio": pa.array([0.1, None, -0.0, 3.4e38], pa.float32()),
            "units": pa.array(units, pa.int64()), "rank": pa.array([-1, 0, 2**31 - 1, 300], pa.int32()),
            "event_timestamp": pa.array([T0.value + 999, T0.value, T0.value - 10**15, T0.value], pa.timestamp(
                "ns", "UTC")), "created": pa.array(created, pa.timestamp("us", "UTC"))})

    def write_both(data: pa.Table) -> None:
        for store in (feast_store, bulk_store):
            view = store.get_feature_view("levels")
            if store is feast_store:
                write_as_protos(PostgreSQLOnlineStore(), store.config, view, data)
            else:
                store._get_provider().online_store.online_write_arrow(store.config, view, data)

    first = batch([7, -1, 2**63 - 1, -(2**63)], [1.5, None, float("nan"), 1e308], [T0.value // 1000] * 4)
    assert ArrowRows.of(bulk_store.config, bulk_store.get_feature_view("levels"), first) is not None
    write_both(first)
    assert _rows(settings, "bulk_pg", "levels") == _rows(settings, "feast_pg", "levels")
    assert len(_rows(settings, "bulk_pg", "levels")) == 4 * 4
    protos = batch([8, None, 1, 2], [2.5, 0.0, -0.0, float("inf")], [None] * 4)
    assert ArrowRows.of(bulk_store.config, bulk_store.get_feature_view("levels"), protos) is None
    write_both(protos)
    assert _rows(settings, "bulk_pg", "levels") == _rows(settings, "feast_pg", "levels")
    write_both(first)
    assert _rows(settings, "bulk_pg", "levels") == _rows(settings, "feast_pg", "levels")


def _level(store, key: tuple[int, int]) -> list:
    return store.get_online_features(features=["series:level"], entity_rows=[{"store": key[0], "dept": key[1]}]
                                     ).to_dict()["level"]


def _terminate(settings: Settings, application: str) -> int:
    """Ends the backends of connections made with PGAPPNAME ``application``; how many."""
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True, application_name="pytest") as conn:
        return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                                (application,)).fetchall())


def test_a_lost_connection_is_replaced(stores, monkeypatch) -> None:
    """The store's cached connection lost (its backend ended, as by a PostgreSQL restart): the call that finds it
    broken fails, and the next one connects afresh. Feast's store keeps failing until the process restarts."""
    settings, _, _ = stores
    monkeypatch.setenv("PGAPPNAME", "bulk-reconnect")  # libpq names the store's connection so
    store = _feature_store(settings, "reconnect", STORE_TYPE)
    frame = _frame([(61, 1)], [1.0], [1], ["a"], [T0], [None])
    store.write_to_online_store("series", frame)
    assert _terminate(settings, "bulk-reconnect") >= 1
    with pytest.raises(psycopg.OperationalError):
        store.write_to_online_store("series", frame.assign(level=[2.0]))
    store.write_to_online_store("series", frame.assign(level=[3.0]))
    assert _level(store, (61, 1)) == [3.0]
    assert _terminate(settings, "bulk-reconnect") >= 1  # a read finds it broken too, and the next read heals
    with pytest.raises(psycopg.OperationalError):
        _level(store, (61, 1))
    assert _level(store, (61, 1)) == [3.0]


@pytest.mark.parametrize("conn_type", ["singleton", "pool"])
def test_async_reads_replace_a_lost_connection(stores, monkeypatch, conn_type: str) -> None:
    import asyncio

    settings, _, _ = stores
    monkeypatch.setenv("PGAPPNAME", "bulk-reconnect-async")
    store = _feature_store(settings, f"reconnect_async_{conn_type}", STORE_TYPE, conn_type=conn_type, min_conn=1,
                           max_conn=2)
    store.write_to_online_store("series", _frame([(62, 1)], [4.0], [1], ["a"], [T0], [None]))

    async def level() -> list:
        response = await store.get_online_features_async(features=["series:level"],
                                                         entity_rows=[{"store": 62, "dept": 1}])
        return response.to_dict()["level"]

    async def reads() -> None:
        online = store._get_provider().online_store
        try:
            assert await level() == [4.0]
            assert _terminate(settings, "bulk-reconnect-async") >= 1
            failed = 0
            while failed <= 2:  # each read finds one lost connection (a pool may hold max_conn), then reads afresh
                try:
                    assert await level() == [4.0]
                    break
                except psycopg.OperationalError:
                    failed += 1
            assert 1 <= failed <= (2 if conn_type == "pool" else 1)
        finally:  # the pool's tasks run on this loop, which asyncio.run closes
            if online._conn_pool_async is not None:
                await online._conn_pool_async.close()
            if online._conn_async is not None:
                await online._conn_async.close()

    asyncio.run(reads())


def test_a_pool_gets_its_connections_back_from_failed_calls(stores) -> None:
    """``conn_type: pool``: a failed write returns its connection (Feast's is lost, and ``max_conn`` failed calls
    left every later call waiting for the pool, then failing with PoolTimeout)."""
    from feast.infra.utils.postgres.postgres_config import ConnectionType

    settings, _, _ = stores
    store = _feature_store(settings, "pooled", STORE_TYPE, conn_type=ConnectionType.pool, min_conn=1, max_conn=2)
    frame = _frame([(63, 1)], [1.0], [1], ["a"], [T0], [None])
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute('ALTER TABLE "pooled_series" RENAME TO "pooled_series_away"')
    try:
        for _ in range(3):
            with pytest.raises(psycopg.errors.UndefinedTable):
                store.write_to_online_store("series", frame)
    finally:
        with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
            conn.execute('ALTER TABLE "pooled_series_away" RENAME TO "pooled_series"')
    store.write_to_online_store("series", frame.assign(level=[5.0]))
    assert _level(store, (63, 1)) == [5.0]
    pool = store._get_provider().online_store._conn_pool
    stats = pool.get_stats()
    pool.close()
    assert stats["pool_size"] - stats["pool_available"] == 0  # every connection back in the pool


def test_a_schema_of_its_own(stores) -> None:
    """``db_schema`` other than public: Feast's connections search that schema first, so the table, its index and
    every statement of the store are there; a table of the same name in public (Feast's store's) is left alone."""
    settings, _, _ = stores
    feast_public = _feature_store(settings, "schema_x", "postgres")
    bulk = _feature_store(settings, "schema_x", STORE_TYPE, db_schema="online_x")
    bulk.apply(_definitions())
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        indexes = conn.execute("SELECT schemaname, indexname FROM pg_indexes WHERE tablename = 'schema_x_series' "
                               "ORDER BY 1, 2").fetchall()
        primary = conn.execute("SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indisprimary AND "
                               "i.indrelid = 'online_x.schema_x_series'::regclass").fetchone()[0]
    assert indexes == [("online_x", "schema_x_series_ek"), ("online_x", "schema_x_series_fts_idx"),
                       ("public", "schema_x_series_ek"), ("public", "schema_x_series_fts_idx"),
                       ("public", "schema_x_series_pkey")]
    assert primary == "online_x.schema_x_series_ek"
    frame = _frame([(64, 1), (64, 2)], [6.0, 7.0], [1, 2], ["a", "b"], [T0, T0], [None, None])
    bulk.write_to_online_store("series", frame)
    feast_public.write_to_online_store("series", frame.assign(level=[8.0, 9.0]))
    assert _level(bulk, (64, 2)) == [7.0]
    assert _level(feast_public, (64, 2)) == [9.0]
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        assert conn.execute('SELECT count(*) FROM online_x."schema_x_series"').fetchone()[0] == 2 * 3


def test_threads_sharing_the_cached_connection_take_turns(stores, monkeypatch) -> None:
    """A read from another thread while a write is between its statements and its commit (Feast's feature server
    reads and writes from a thread pool): the read waits for the write's commit, so it neither joins the write's
    transaction nor, failing, rolls it back (the write reported success and was lost)."""
    import threading

    settings, _, _ = stores
    store = _feature_store(settings, "threads", STORE_TYPE)
    store.write_to_online_store("series", _frame([(65, 1)], [1.0], [1], ["a"], [T0], [None]))
    merged, read = threading.Event(), threading.Event()
    merge = BulkPostgreSQLOnlineStore._merge

    def merge_then_pause(conn, cur, table_name, names) -> None:
        merge(conn, cur, table_name, names)
        if threading.current_thread().name == "writer":
            merged.set()
            read.wait(1.0)  # the reader's turn, if it could take one before the commit

    monkeypatch.setattr(BulkPostgreSQLOnlineStore, "_merge", staticmethod(merge_then_pause))
    outcome: dict[str, object] = {}

    def write() -> None:
        store.write_to_online_store("series", _frame([(65, 1)], [2.0], [1], ["a"], [T0 + pd.Timedelta(days=1)],
                                                     [None]))
        outcome["write"] = "ok"

    def read_level() -> None:
        merged.wait(10)
        try:
            outcome["read"] = _level(store, (65, 1))
        except Exception as exc:  # noqa: BLE001 - what it raised is the finding
            outcome["read"] = repr(exc)
        read.set()

    threads = [threading.Thread(target=write, name="writer"), threading.Thread(target=read_level, name="reader")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcome == {"write": "ok", "read": [2.0]}
    assert _level(store, (65, 1)) == [2.0]


def test_a_transaction_left_open_on_the_cached_connection_is_rolled_back(stores, caplog) -> None:
    """Feast's ``set_autocommit`` fails on a connection left in a transaction, and so did every later call."""
    settings, _, _ = stores
    store = _feature_store(settings, "left_open", STORE_TYPE)
    store.write_to_online_store("series", _frame([(66, 1)], [7.0], [1], ["a"], [T0], [None]))
    conn = store._get_provider().online_store._conn
    conn.set_autocommit(False)
    conn.execute("SELECT 1")  # begins a transaction nobody ends
    with caplog.at_level(logging.WARNING, logger="sales_forecast.online_store"):
        assert _level(store, (66, 1)) == [7.0]
    assert "left in a transaction" in caplog.text
