"""The server's online read on a feature repo that is not the project's: Feast's SQLite online store (the generic
``online_read`` path), two feature views in the service, a NULL value, a stale row, a missing entity; compared with
Feast's own ``get_online_features``. And what the server refuses to serve, with a message at load."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sales_forecast.contract import FEATURE_SERVICE
from sales_forecast.errors import PipelineError
from sales_forecast.serving.http_errors import UnknownEntities
from sales_forecast.serving.instances import Instance
from sales_forecast.serving.online_features import OnlineFeatureLookup

NOW = pd.Timestamp.now(tz="UTC").floor("s")


@pytest.fixture(autouse=True)
def feasts_sqlite_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite3's converters are global: Feast registers its epoch-seconds "timestamp" converter when its SQLite store
    is imported, and IPython's history (imported by other tests' libraries) replaces it with an ISO-format one, which
    fails on Feast's rows. Feast's own, for these tests."""
    import sqlite3

    from feast.infra.online_stores.sqlite import convert_timestamp

    monkeypatch.setitem(sqlite3.converters, "TIMESTAMP", convert_timestamp)


def other_repo(tmp_path: Path, service_views: str = "both"):
    """A FeatureStore on SQLite: views ``levels`` (store, dept; ttl 7 days) and ``prices`` (store, dept; no ttl)."""
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
    from feast.on_demand_feature_view import on_demand_feature_view
    from feast.types import Float64, Int64

    frame = pd.DataFrame({"store": [1, 2, 3], "dept": [10, 20, 30], "event_timestamp": [NOW] * 3,
                          "level": [1.5, np.nan, 3.5], "price": [9.0, 8.0, 7.0]})
    frame.to_parquet(tmp_path / "rows.parquet")
    source = FileSource(path=str(tmp_path / "rows.parquet"), timestamp_field="event_timestamp")
    store_entity = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64)
    dept_entity = Entity(name="dept", join_keys=["dept"], value_type=ValueType.INT64)
    fields = [Field(name="store", dtype=Int64), Field(name="dept", dtype=Int64)]
    levels = FeatureView(name="levels", entities=[store_entity, dept_entity], ttl=dt.timedelta(days=7),
                         schema=[*fields, Field(name="level", dtype=Float64)], source=source)
    prices = FeatureView(name="prices", entities=[store_entity, dept_entity], ttl=dt.timedelta(0),
                         schema=[*fields, Field(name="price", dtype=Float64)], source=source)
    by_store = FeatureView(name="by_store", entities=[store_entity], ttl=dt.timedelta(0),
                           schema=[Field(name="store", dtype=Int64), Field(name="store_price", dtype=Float64)],
                           source=source)

    @on_demand_feature_view(sources=[prices], schema=[Field(name="double_price", dtype=Float64)], mode="pandas")
    def doubled(inputs: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"double_price": inputs["price"] * 2})

    views = {"both": [levels, prices], "on_demand": [levels, doubled], "by_store": [levels, by_store]}[service_views]
    service = FeatureService(name=FEATURE_SERVICE, features=views)
    config = RepoConfig(project="other", provider="local", registry=str(tmp_path / "registry.db"),
                        online_store={"type": "sqlite", "path": str(tmp_path / "online.db")},
                        offline_store={"type": "file"}, entity_key_serialization_version=3, repo_path=str(tmp_path))
    store = FeatureStore(config=config)
    store.apply([store_entity, dept_entity, levels, prices, by_store, doubled, service])
    online = frame.drop(columns=["level"]).assign(event_timestamp=NOW - pd.Timedelta(days=30))  # older than 7 days
    store.write_to_online_store("prices", online.iloc[:2])
    store.write_to_online_store("levels", frame.drop(columns=["price"]).iloc[:2])
    return store


def test_another_online_store_reads_like_get_online_features(tmp_path: Path) -> None:
    store = other_repo(tmp_path)
    lookup = OnlineFeatureLookup(store, ["price", "level"], where="sqlite")
    assert lookup.connection is None  # not PostgreSQL: the store's own online_read
    keys = [Instance(2, 20), Instance(1, 10), Instance(2, 20)]
    got = lookup.rows(keys)
    reference = store.get_online_features(features=store.get_feature_service(FEATURE_SERVICE),
                                          entity_rows=[k.as_dict() for k in keys]).to_dict()
    for name in ("price", "level"):
        np.testing.assert_array_equal(got[name], [np.nan if v is None else v for v in reference[name]])
    assert np.isnan(got["level"][0]) and reference["level"][0] is None  # a NULL value is served as NaN
    np.testing.assert_array_equal(got["dept"], [20, 10, 20])


def test_a_missing_row_is_refused_and_the_ttl_is_each_views(tmp_path: Path) -> None:
    store = other_repo(tmp_path)
    lookup = OnlineFeatureLookup(store, ["price", "level"], where="sqlite")
    with pytest.raises(UnknownEntities) as raised:
        lookup.rows([Instance(1, 10), Instance(3, 30)])  # (3, 30) has no online row in either view
    assert [(m["index"], m["reason"]) for m in raised.value.details["missing"]] == [(1, "no online features")]
    # prices' rows are 30 days old but prices has no ttl; levels' are fresh: served
    assert lookup.rows([Instance(1, 10)])["price"].tolist() == [9.0]


@pytest.mark.parametrize(("views", "message"), [
    ("on_demand", "not a feature view"),
    ("by_store", r"keyed by \['store'\]"),
])
def test_what_the_server_cannot_serve_is_refused_at_load(tmp_path: Path, views: str, message: str) -> None:
    store = other_repo(tmp_path, views)
    features = ["level", "double_price" if views == "on_demand" else "store_price"]
    with pytest.raises(PipelineError, match=message):
        OnlineFeatureLookup(store, features, where="sqlite")


def test_stored_values_read_as_protobuf_reads_them() -> None:
    """The PostgreSQL read decodes Feast's serialized ValueProtos in bulk when all are doubles or NULL, and value by
    value with protobuf otherwise: either way, protobuf's numbers."""
    from feast.protos.feast.types.Value_pb2 import Value

    from sales_forecast.serving.online_features import _doubles, _float

    rng = np.random.default_rng(7)
    doubles = [*rng.normal(0, 1e6, 50), 0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308]
    batches = {
        "doubles and NULLs": [Value(double_val=v) for v in doubles] + [Value(), Value()],
        "an int64 among them": [Value(double_val=1.5), Value(int64_val=2**40), Value()],
        "a float": [Value(float_val=0.1), Value(double_val=0.1)],
        "an int64 nine bytes long": [Value(int64_val=2**50), Value(double_val=3.0)],  # the length of a double
        "a bool": [Value(bool_val=True), Value()],
        "nothing": [],
    }
    for name, protos in batches.items():
        blobs = [proto.SerializeToString() for proto in protos]
        expected = np.array([_float(Value.FromString(blob)) for blob in blobs], dtype="float64")
        got = _doubles(blobs)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(expected), err_msg=name)  # -0.0 stays -0.0


def test_only_the_models_features_age_an_entity_and_keys_may_repeat() -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    from sales_forecast.serving.online_features import _view_rows

    def blob(v: float) -> bytes:
        return Value(double_val=v).SerializeToString()

    rows = [(b"a", b"x", blob(1.0), 100.0), (b"a", b"y", blob(2.0), 300.0), (b"a", b"other", blob(9.0), 5.0),
            (b"b", b"x", b"", 200.0), (b"c", b"other", blob(7.0), 50.0), (b"e", b"y", blob(3.0), np.nan)]
    keys, names, blobs, stamps = zip(*rows, strict=True)
    values, oldest = _view_rows(keys, names, blobs, np.array(stamps), [b"b", b"a", b"c", b"d", b"e"],
                                {b"x": 0, b"y": 1}, [b"b", b"a", b"c", b"a", b"d", b"e"])
    np.testing.assert_array_equal(values, [[np.nan, 1.0, np.nan, 1.0, np.nan, np.nan],
                                           [np.nan, 2.0, np.nan, 2.0, np.nan, 3.0]])
    # a's oldest row of x and y (not of "other"); c holds only a feature the model does not read: no row for it;
    # e's row has no event time (NaN: never fresh)
    np.testing.assert_array_equal(oldest, [200.0, 100.0, np.nan, 100.0, np.nan, np.nan])
    # every row wanted (no filtering), and no rows at all
    values, oldest = _view_rows(keys[:2], names[:2], blobs[:2], np.array(stamps[:2]), [b"a"], {b"x": 0, b"y": 1},
                                [b"a"])
    np.testing.assert_array_equal(values, [[1.0], [2.0]])
    np.testing.assert_array_equal(oldest, [100.0])
    values, oldest = _view_rows([], [], [], np.empty(0), [b"a", b"b"], {b"x": 0}, [b"b", b"a"])
    np.testing.assert_array_equal(values, [[np.nan, np.nan]])
    np.testing.assert_array_equal(oldest, [np.nan, np.nan])


def test_the_bytea_array_parameter_is_postgresqls_binary_form(stack_settings) -> None:
    """The keys go to PostgreSQL as a binary bytea[] written here: PostgreSQL reads back every byte, also of empty,
    NUL-holding and long keys, repeated ones and an empty list."""
    import psycopg

    from sales_forecast.serving.online_features import BINARY, _bytea_array

    cases = [[], [b""], [b"\x00\xff", b"a" * 70_000, bytes(range(256))], [b"same", b"same"]]
    with psycopg.connect(stack_settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        for items in cases:
            result = conn.pgconn.exec_params(b"SELECT encode(k, 'hex') FROM unnest($1::bytea[]) WITH ORDINALITY "
                                             b"u(k, i) ORDER BY i", [_bytea_array(items)], None, [BINARY], 0)
            assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
            got = [bytes.fromhex(result.get_value(i, 0).decode()) for i in range(result.ntuples)]
            assert got == items


def test_the_server_reads_postgresql_with_one_generic_prepared_plan(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lookup is one execution of the view's named prepared statement, planned once (a generic plan), not
    re-planned per request, and its answers are Feast's values read the server's way, in request order; feature
    names arrive as UTF-8 even when the environment asks libpq for another encoding."""
    from sales_forecast.features.derive import MODEL_FEATURES

    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")

    lookup = OnlineFeatureLookup.open(settings, MODEL_FEATURES)
    instances = [Instance(1, 1), Instance(2, 1), Instance(1, 1)]
    first = lookup.rows(instances)
    for _ in range(6):
        again = lookup.rows(instances)
        assert all(np.array_equal(again[name], first[name], equal_nan=True) for name in first)
    expected = lookup.store.get_online_features(features=lookup.service, entity_rows=[
        {"store": i.store, "dept": i.dept} for i in instances]).to_dict()
    for name in MODEL_FEATURES:
        np.testing.assert_array_equal(first[name], np.array(expected[name], dtype="float64"), err_msg=name)
    [read] = lookup.reads(MODEL_FEATURES)
    assert lookup.connection.current.info.parameter_status("client_encoding") == "UTF8"
    plans = lookup.connection.current.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s",
        [read.statement.decode()]).fetchall()
    assert plans == [(7, 0)]
    lookup.connection.current.execute("DEALLOCATE ALL")  # e.g. DISCARD ALL, or a pooler's reset
    connection = lookup.connection.current
    again = lookup.rows(instances)  # prepared afresh on the same connection, not retired
    assert lookup.connection.current is connection
    assert all(np.array_equal(again[name], first[name], equal_nan=True) for name in first)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York"])
def test_naive_event_times_are_utc_in_any_server_time_zone(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """Feast writes event times as naive UTC and its stores read them back so: a naive time is UTC, never the server's
    local time (which would make rows fresher or staler by the zone's offset)."""
    import time

    from sales_forecast.serving.online_features import _epoch, _older_than

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        aware = dt.datetime.now(dt.UTC) - dt.timedelta(days=7, hours=-2)  # 2 h inside a 7-day ttl
        naive = aware.replace(tzinfo=None)
        assert _epoch(naive) == _epoch(aware) == aware.timestamp()
        stale = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=7, hours=2)
        stamps = np.array([_epoch(naive), _epoch(stale), _epoch(None)])
        assert _older_than(stamps, dt.timedelta(days=7)).tolist() == [False, True, False]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_registry_refresh_rebuilds_the_read_plans_off_the_request_path(tmp_path: Path) -> None:
    """After a refresh the plans already hold the registry's views (a ttl changed by `feast apply` counts for the
    next request without the request planning it); a service the server cannot read leaves the old plans serving."""
    from feast import FeatureService

    store = other_repo(tmp_path)
    lookup = OnlineFeatureLookup(store, ["price", "level"], where="sqlite")
    assert lookup.rows([Instance(1, 10)])["price"].tolist() == [9.0]
    prices = store.get_feature_view("prices")
    prices.ttl = dt.timedelta(days=1)  # its rows are 30 days old
    store.apply([prices])
    lookup.refresh_registry()
    planned = {read.view.name: read.ttl for read in lookup._plans[("price", "level")]}
    assert planned == {"levels": dt.timedelta(days=7), "prices": dt.timedelta(days=1)}
    with pytest.raises(UnknownEntities, match="older than the ttl|no current online features") as raised:
        lookup.rows([Instance(1, 10)])
    assert raised.value.details["missing"][0]["reason"] == "older than the ttl"

    doubled = store.get_on_demand_feature_view("doubled")
    store.apply([FeatureService(name=FEATURE_SERVICE, features=[store.get_feature_view("levels"), prices, doubled])])
    with pytest.raises(PipelineError, match="not a feature view"):
        lookup.refresh_registry()
    assert {read.view.name: read.ttl for read in lookup._plans[("price", "level")]} == planned  # still serving
    with pytest.raises(UnknownEntities):
        lookup.rows([Instance(1, 10)])
