"""The Ray offline store on inputs outside this project's feature view, case by case, against Feast's own
PostgreSQL store (or a hand-computed answer where Feast's is undefined): views without entities, partitions where
no feature row is usable, entity keys outside the source column's type, naive timestamps on a non-UTC server,
duplicate (key, timestamp) rows, offline writes, and the requests Feast's store used to serve (a date range without
an entity set, filter_by_created_timestamp). The definitions are tests/fixtures/ray_repo/features.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from conftest import database_settings
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import SavedDatasetPostgreSQLStorage

from sales_forecast.config import Settings
from sales_forecast.ray_engine import ENGINE_TYPE
from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob
from tests.support.feast_repo import RAY_REPO, definitions, feature_store, load_tables, postgres_store

T0 = pd.Timestamp("2026-01-02", tz="UTC")
DAY = pd.Timedelta(days=1)

pytestmark = pytest.mark.usefixtures("own_ray")


@pytest.fixture(scope="module")
def contract_db(stack_settings: Settings) -> Settings:
    settings = database_settings(stack_settings, "ray_contract")
    feature_store(settings).apply(definitions(RAY_REPO / "features.py"))
    return settings


def both(settings: Settings, entities: pd.DataFrame, features: list[str], **options) -> tuple[pd.DataFrame, ...]:
    """(Ray store's answer, Feast's PostgreSQL store's answer), each ordered by row_id; ``options`` apply to both
    (Feast's store drops the Ray store's own)."""
    job = feature_store(settings, **options).get_historical_features(entity_df=entities, features=features)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    theirs = postgres_store(settings, **options).get_historical_features(entity_df=entities, features=features).to_df()
    return tuple(frame.sort_values("row_id").reset_index(drop=True) for frame in (job.to_df(), theirs))


def store_rows(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    if "created" not in frame:
        frame.insert(2, "created", frame["event_timestamp"])
    return frame


# --- 1. views without entities ----------------------------------------------------------------------------------

def test_view_without_entities_joins_on_time_alone(contract_db: Settings) -> None:
    """entities=[] (global statistics): every entity row gets the latest global row at or before its time, within
    the ttl, the later created row winning a tie; mixed with a keyed view in one request."""
    load_tables(contract_db, {
        "global_rows": pd.DataFrame({
            "event_timestamp": [T0, T0 + DAY, T0 + DAY, T0 + 9 * DAY],
            "created": [T0, T0 + DAY, T0 + DAY + pd.Timedelta(hours=1), T0 + 9 * DAY],
            "level": [1.0, 2.0, 3.0, 4.0]}),
        "store_rows": store_rows(store=[1, 2], event_timestamp=[T0, T0], temperature=[10.0, 20.0], visitors=[1, 2]),
    })
    times = [T0 - DAY, T0, T0 + DAY, T0 + 5 * DAY, T0 + 8 * DAY, T0 + 8 * DAY + pd.Timedelta(seconds=1),
             T0 + 9 * DAY]
    entities = pd.DataFrame({"row_id": range(2 * len(times)), "store": [1, 2] * len(times),
                             "event_timestamp": [t for t in times for _ in (1, 2)]})
    ours, theirs = both(contract_db, entities, ["store_stats:temperature", "global_stats:level"])
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["level"].tolist() == [np.nan] * 2 + [1.0] * 2 + [3.0] * 6 + [np.nan] * 2 + [4.0] * 2 or \
        np.allclose(ours["level"], [np.nan] * 2 + [1.0] * 2 + [3.0] * 6 + [np.nan] * 2 + [4.0] * 2, equal_nan=True)


# --- 2. no usable feature row in a partition ----------------------------------------------------------------------

def test_partition_without_usable_feature_rows(contract_db: Settings) -> None:
    """The only rows in the entity rows' window have a NULL key (or a NULL time): NULL features, as Feast."""
    load_tables(contract_db, {"dept_rows": pd.DataFrame({
        "dept": pd.array([None, 1, 2], dtype="Int64"),
        "event_timestamp": pd.Series([T0, T0 + 30 * DAY, None], dtype="datetime64[ns, UTC]"),
        "dept_index": [0.5, 0.7, 0.9]})})
    entities = pd.DataFrame({"row_id": [0, 1], "dept": [1, 2], "event_timestamp": [T0 + DAY, T0 + DAY]})
    for options in ({"partitions": 1}, {"partitions": 2}, {"ray_min_entity_rows": 10}):
        ours, theirs = both(contract_db, entities, ["dept_stats:dept_index"], **options)
        pd.testing.assert_frame_equal(ours, theirs)
        assert ours["dept_index"].isna().all()


# --- 3. entity keys outside the source column's type ------------------------------------------------------------

def test_entity_key_outside_the_source_column_type(contract_db: Settings) -> None:
    """A 2^40 entity id against an integer (int4) source column matches nothing: NULL for that row, as Feast,
    instead of failing the whole retrieval."""
    rows = store_rows(store=np.array([1, 2], dtype="int32"), event_timestamp=[T0, T0], temperature=[10.0, 20.0],
                      visitors=np.array([1, 2], dtype="int32"))
    load_tables(contract_db, {"store_rows": rows})
    entities = pd.DataFrame({"row_id": [0, 1, 2], "store": [1, 2**40, -(2**40)],
                             "event_timestamp": [T0 + DAY] * 3})
    ours, theirs = both(contract_db, entities, ["store_stats:temperature"])
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["temperature"].tolist()[0] == 10.0 and ours["temperature"].iloc[1:].isna().all()


# --- 5. duplicate (key, event timestamp) rows -------------------------------------------------------------------

def test_duplicate_rows_without_created_timestamp_pick_deterministically(contract_db: Settings) -> None:
    """Rows equal in key and event timestamp (no created timestamp to break the tie): the row with the greatest
    feature values wins, whatever order PostgreSQL returns them in, however the entity rows are partitioned.
    (Feast's own join returns the entity row once per tied row.)"""
    duplicates = pd.DataFrame({"dept": [1, 1, 1, 2], "event_timestamp": [T0, T0, T0, T0],
                               "dept_index": [0.1, 0.9, np.nan, 0.3]})
    entities = pd.DataFrame({"row_id": range(4), "dept": [1, 2, 1, 2],
                             "event_timestamp": [T0, T0 + DAY, T0 + DAY, T0]})
    answers = []
    for order in (duplicates, duplicates.iloc[::-1]):
        load_tables(contract_db, {"dept_rows": order})
        for options in ({"partitions": 1}, {"partitions": 2}, {"ray_min_entity_rows": 10}):
            answers.append(feature_store(contract_db, **options).get_historical_features(
                entity_df=entities, features=["dept_stats:dept_index"]).to_df()["dept_index"].tolist())
    assert all(answer == [0.9, 0.3, 0.9, 0.3] for answer in answers), answers


def test_duplicate_rows_with_equal_created_timestamps_pick_deterministically(contract_db: Settings) -> None:
    """Equal key, event and created timestamps: the greatest feature values in the view's schema order win
    (temperature, then visitors), NULL lowest."""
    rows = store_rows(store=[1, 1, 1, 1], event_timestamp=[T0] * 4, temperature=[5.0, 5.0, 4.0, None],
                      visitors=[10, 30, 99, 100])
    entities = pd.DataFrame({"row_id": [0], "store": [1], "event_timestamp": [T0 + DAY]})
    for order in (rows, rows.iloc[::-1], rows.iloc[[2, 0, 3, 1]]):
        load_tables(contract_db, {"store_rows": order})
        result = feature_store(contract_db).get_historical_features(
            entity_df=entities, features=["store_stats:visitors", "store_stats:temperature"]).to_df()
        assert result[["temperature", "visitors"]].values.tolist() == [[5.0, 30]]


# --- 4. naive timestamps ----------------------------------------------------------------------------------------

ZONE = "America/New_York"  # UTC-5 in winter, with both DST transitions in 2026 (Mar 8 02:00, Nov 1 02:00)


@pytest.fixture(scope="module")
def new_york_db(stack_settings: Settings) -> Settings:
    """A database whose sessions run in New York time, with one view on a ``timestamp`` (naive) source column and
    one on a ``timestamptz`` column, hourly rows around 2026-01-05 and both DST transitions, ttl 3 hours."""
    import psycopg
    from feast import Entity, FeatureView, Field, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.types import Float64

    settings = database_settings(stack_settings, "ray_new_york")
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE ray_new_york SET TimeZone = '{ZONE}'")
        for table, kind in (("naive_rows", "timestamp"), ("aware_rows", "timestamptz")):
            conn.execute(f"CREATE TABLE {table} (k bigint, ts {kind}, v float8)")
            # the same wall-clock strings: naive as written, aware read in the session's zone (New York)
            conn.execute(f"""INSERT INTO {table} SELECT k, (d + h * interval '1 hour')::{kind}, k * 1000 + h
                             FROM unnest(ARRAY[1, 2]) k, unnest(ARRAY['2026-01-05'::timestamp, '2026-03-08',
                             '2026-11-01']) d, generate_series(0, 30, 2) h WHERE (k + h) % 3 <> 0""")
            conn.execute(f"CREATE INDEX ON {table} (k, ts)")
    k = Entity(name="k", join_keys=["k"], value_type=ValueType.INT64)
    views = [FeatureView(name=name, entities=[k], ttl=pd.Timedelta(hours=3).to_pytimedelta(),
                         schema=[Field(name="v", dtype=Float64)],
                         source=PostgreSQLSource(name=name, table=f"{name}_rows", timestamp_field="ts"))
             for name in ("naive", "aware")]
    feature_store(settings, project="new_york").apply([k, *views])
    return settings


def new_york_entities() -> pd.DataFrame:
    """Wall-clock times (New York) at, between and around the rows, in winter and at the DST transitions (a time
    that does not exist, 2026-03-08 02:30, and one that exists twice, 2026-11-01 01:30)."""
    times = []
    for day in ("2026-01-05", "2026-03-08", "2026-11-01"):
        base = pd.Timestamp(day)
        times += [base + pd.Timedelta(minutes=m) for m in (0, 45, 90, 150, 179, 181, 240, 330, 600, 1_200, 1_800)]
    times += [pd.Timestamp("2026-03-08 02:30"), pd.Timestamp("2026-11-01 01:30"), pd.Timestamp("2026-11-01 01:00")]
    frame = pd.DataFrame({"k": np.tile([1, 2], len(times)), "event_timestamp": np.repeat(times, 2)})
    return frame.assign(row_id=np.arange(len(frame)))


def instant_oracle(settings: Settings, view: str, entity_query: str) -> pd.Series:
    """The rule computed by PostgreSQL on instants: both sides cast to timestamptz (the session's reading of a naive
    value), the latest row within 3 hours at or before the entity row; by row_id."""
    import psycopg

    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        rows = conn.execute(f"""
            SELECT e.row_id, (SELECT r.v FROM {view}_rows r WHERE r.k = e.k
                              AND r.ts::timestamptz <= e.event_timestamp::timestamptz
                              AND r.ts::timestamptz >= e.event_timestamp::timestamptz - interval '3 hours'
                              ORDER BY r.ts::timestamptz DESC LIMIT 1)
            FROM ({entity_query}) e ORDER BY e.row_id""").fetchall()
    return pd.Series([row[1] for row in rows], dtype="float64", name=f"{view}__v")


@pytest.mark.parametrize("entity_kind", ["frame naive", "frame aware", "frame naive, coerce_tz_aware off",
                                         "sql naive", "sql aware"])
def test_naive_timestamps_follow_feast_on_a_non_utc_server(new_york_db: Settings, entity_kind: str) -> None:
    """One rule, Feast's: a naive timestamp that reaches PostgreSQL (a timestamp-without-time-zone source column,
    a SQL entity set's column, a DataFrame's column once coerce_tz_aware is off) is wall-clock time in the
    session's TimeZone, a skipped or repeated wall-clock time being the later instant, as PostgreSQL converts it;
    FeatureStore makes a DataFrame's naive timestamps UTC by default. Everything is then compared as instants.

    The one place Feast differs: where both sides are naive, its SQL compares wall clocks and subtracts the ttl on
    the wall clock, so across a DST transition its window is an hour longer or shorter than the ttl. There the Ray
    store follows the rule (checked against PostgreSQL's own instants), and only DST-day rows may differ.
    Each entity row's answer is also the same alone as within the whole set (the time window pushed down per
    partition must not change it)."""
    from sales_forecast.features.load import load_table

    entities = new_york_entities()
    load_table(new_york_db.postgres, "entity_rows", entities, ["row_id"])  # naive: New York wall clock
    options = {"project": "new_york"}
    aware = entity_kind in ("frame aware", "sql aware")
    if entity_kind == "frame aware":
        entities["event_timestamp"] = entities["event_timestamp"].dt.tz_localize(ZONE, ambiguous=False,
                                                                                 nonexistent="shift_forward")
    if entity_kind.endswith("coerce_tz_aware off"):
        options["coerce_tz_aware"] = False
    entity_df: pd.DataFrame | str = entities
    if entity_kind.startswith("sql"):
        cast = "timestamptz" if aware else "timestamp"  # timestamptz: the wall clock read in New York time
        entity_df = f"SELECT row_id, k, event_timestamp::{cast} AS event_timestamp FROM entity_rows"
    features = ["naive:v", "aware:v"]
    ours, theirs = (store.get_historical_features(entity_df=entity_df, features=features, full_feature_names=True)
                    .to_df().sort_values("row_id").reset_index(drop=True)
                    for store in (feature_store(new_york_db, **options), postgres_store(new_york_db, **options)))
    assert ours["naive__v"].notna().any() and ours["aware__v"].isna().any()

    both_naive = entity_kind in ("sql naive", "frame naive, coerce_tz_aware off")
    if not both_naive:
        pd.testing.assert_frame_equal(ours, theirs)
    else:
        pd.testing.assert_frame_equal(ours.drop(columns="naive__v"), theirs.drop(columns="naive__v"))
        entity_query = "SELECT row_id, k, event_timestamp FROM entity_rows"
        pd.testing.assert_series_equal(ours["naive__v"], instant_oracle(new_york_db, "naive", entity_query))
        differ = ~((ours["naive__v"] == theirs["naive__v"]) | (ours["naive__v"].isna() & theirs["naive__v"].isna()))
        days = set(ours.loc[differ, "event_timestamp"].dt.strftime("%Y-%m-%d"))
        assert days <= {"2026-03-08", "2026-11-01"}, days

    if isinstance(entity_df, pd.DataFrame):  # each row alone, in partitions of one row: the same answer
        store = feature_store(new_york_db, partitions=1, **options)
        for row in range(0, len(entities), 7):
            alone = store.get_historical_features(entity_df=entities.iloc[[row]], features=features,
                                                  full_feature_names=True).to_df()
            pd.testing.assert_frame_equal(alone.reset_index(drop=True), ours.iloc[[row]].reset_index(drop=True))


# --- 7. the requests Feast's store used to serve: created-timestamp filtering, a date range -------------------------

def created_rows() -> pd.DataFrame:
    """Two series per view, one the (1, 12) / (11, 2) pair; the newest rows were created (written) late."""
    hour = pd.Timedelta(hours=1)
    return pd.DataFrame({
        "store": [1, 1, 1, 11, 11, 1],
        "dept": [12, 12, 12, 2, 2, 12],
        "event_timestamp": [T0, T0 + DAY, T0 + 2 * DAY, T0, T0 + DAY, T0 + DAY],
        "created": [T0, T0 + 3 * DAY, T0 + 2 * DAY + hour, T0 + hour, T0 + DAY, T0 + DAY + hour],
        "sales": [1.0, 2.0, 3.0, 10.0, 11.0, 2.5],
        "units": [1, 2, 3, 10, 11, 25],
    })


def test_filter_by_created_timestamp_runs_the_ray_join(contract_db: Settings) -> None:
    """Only rows created at or before the entity time qualify; Ray serves it for any view (it used to go to
    Feast's join, or be refused for several join keys). Two keys: a hand-computed answer; one key: Feast's."""
    rows = created_rows()
    load_tables(contract_db, {"store_dept_rows": rows, "store_rows": rows.drop(columns=["dept", "units"])
                              .rename(columns={"sales": "temperature"}).assign(visitors=rows["units"])
                              .query("store == 1").reset_index(drop=True)})
    times = [T0, T0 + DAY, T0 + DAY + 2 * pd.Timedelta(hours=1), T0 + 2 * DAY, T0 + 2 * DAY + pd.Timedelta(hours=2),
             T0 + 3 * DAY]
    entities = pd.DataFrame({"row_id": range(2 * len(times)), "store": [1, 11] * len(times),
                             "dept": [12, 2] * len(times), "event_timestamp": [t for t in times for _ in (1, 2)]})
    job = feature_store(contract_db).get_historical_features(entity_df=entities, features=["store_dept_stats:sales"],
                                                             filter_by_created_timestamp=True)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    got = job.to_df().sort_values("row_id")["sales"].tolist()
    # (1, 12): day 1's rows were created at day 1 + 1 h (2.5) and day 3 (2.0), day 2's at day 2 + 1 h;
    # (11, 2): day 0's row was created an hour late
    want = [1.0, np.nan, 1.0, 11.0, 2.5, 11.0, 2.5, 11.0, 3.0, 11.0, 3.0, 11.0]
    assert np.allclose(got, want, equal_nan=True), got
    ours = feature_store(contract_db).get_historical_features(
        entity_df=entities, features=["store_stats:temperature"], filter_by_created_timestamp=True)
    theirs = postgres_store(contract_db).get_historical_features(
        entity_df=entities, features=["store_stats:temperature"], filter_by_created_timestamp=True)
    assert isinstance(ours, RayPostgreSQLRetrievalJob)
    pd.testing.assert_frame_equal(ours.to_df().sort_values("row_id").reset_index(drop=True),
                                  theirs.to_df().sort_values("row_id").reset_index(drop=True))


def test_date_range_without_entity_set_runs_the_ray_join(contract_db: Settings) -> None:
    """start_date/end_date without an entity set: every distinct (keys, event timestamp) of the view's rows in the
    range, with the view's features as of that time (the latest created row of a tie), ordered by time; the
    columns of Feast's store (event_timestamp, created_timestamp for one view with a created column, the keys,
    the features). Two keys (the (1, 12) / (11, 2) pair) used to be refused."""
    load_tables(contract_db, {"store_dept_rows": created_rows()})
    start, end = (T0 + DAY).to_pydatetime(), (T0 + 2 * DAY).to_pydatetime()
    job = feature_store(contract_db).get_historical_features(features=["store_dept_stats:sales"], start_date=start,
                                                             end_date=end)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    got = job.to_df()
    assert list(got.columns) == ["event_timestamp", "created_timestamp", "store", "dept", "sales"]
    want = pd.DataFrame({
        "event_timestamp": [T0 + DAY, T0 + DAY, T0 + 2 * DAY],
        "created_timestamp": [T0 + 3 * DAY, T0 + DAY, T0 + 2 * DAY + pd.Timedelta(hours=1)],
        "store": [1, 11, 1], "dept": [12, 2, 12], "sales": [2.0, 11.0, 3.0]})
    for column in ("event_timestamp", "created_timestamp"):
        want[column] = want[column].dt.tz_convert(None).astype("datetime64[us]")
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_date_range_over_several_views_equals_feast(contract_db: Settings) -> None:
    """Two one-key views (store), no duplicate rows: Feast's multi-view date-range join and the Ray join agree."""
    rows = store_rows(store=[1, 1, 2, 2, 1], event_timestamp=[T0, T0 + DAY, T0, T0 + 2 * DAY, T0 + 3 * DAY],
                      temperature=[1.0, 2.0, 3.0, 4.0, 5.0], visitors=[1, 2, 3, 4, 5])
    visits = rows[["store", "event_timestamp", "created"]].assign(visit_count=[7, 8, 9, 10, 11]).iloc[[0, 3, 4]]
    load_tables(contract_db, {"store_rows": rows, "visit_rows": visits})
    features = ["store_stats:temperature", "store_visits:visits"]
    kwargs = {"start_date": (T0 - DAY).to_pydatetime(), "end_date": (T0 + 2 * DAY).to_pydatetime(),
              "full_feature_names": True}
    ours = feature_store(contract_db).get_historical_features(features=features, **kwargs)
    assert isinstance(ours, RayPostgreSQLRetrievalJob)
    theirs = postgres_store(contract_db).get_historical_features(features=features, **kwargs).to_df()
    ours = ours.to_df()
    assert list(ours.columns) == list(theirs.columns)
    by = ["event_timestamp", "store"]
    pd.testing.assert_frame_equal(ours, theirs.sort_values(by).reset_index(drop=True), check_dtype=False)


# --- 6. offline writes ------------------------------------------------------------------------------------------

def visit_rows(stores: list[int], day: int, counts: list[int]) -> pd.DataFrame:
    moment = T0 + day * DAY
    return pd.DataFrame({"store": stores, "event_timestamp": [moment] * len(stores),
                         "created": [moment] * len(stores), "visit_count": counts})


def read_visits(settings: Settings) -> list[tuple]:
    import psycopg

    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute("SELECT store, event_timestamp, visit_count FROM visit_rows "
                            "ORDER BY event_timestamp, store").fetchall()


def test_offline_writes_append_to_the_source_table(contract_db: Settings) -> None:
    """write_to_offline_store and a push with PushMode.OFFLINE append to a PostgreSQL table source: columns in
    any order, a field-mapped column (visit_count -> visits), an int8 frame column into an int4 table column, one
    write after another; the rows are then visible to the point-in-time join."""
    import psycopg
    from feast.data_source import PushMode

    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS visit_rows")
        conn.execute("CREATE TABLE visit_rows (store int, event_timestamp timestamptz, created timestamptz, "
                     "visit_count int)")
    store = feature_store(contract_db)
    store.write_to_offline_store("store_visits", visit_rows([1, 2], 0, [10, 20]).iloc[:, ::-1])
    store.write_to_offline_store("store_visits", visit_rows([1], 1, [11]), reorder_columns=False)
    store.push("visits_push", visit_rows([2], 2, [22])[["visit_count", "store", "created", "event_timestamp"]],
               to=PushMode.OFFLINE)
    stamp = [(T0 + day * DAY).to_pydatetime() for day in range(3)]
    assert read_visits(contract_db) == [(1, stamp[0], 10), (2, stamp[0], 20), (1, stamp[1], 11), (2, stamp[2], 22)]

    entities = pd.DataFrame({"row_id": [0, 1], "store": [1, 2], "event_timestamp": [T0 + 3 * DAY] * 2})
    ours, theirs = both(contract_db, entities, ["store_visits:visits"])
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["visits"].tolist() == [11, 22]


def test_offline_writes_and_the_join_quote_names_with_double_quotes(contract_db: Settings) -> None:
    """Source columns whose names hold a double quote (key k"q, timestamp t"s, feature f"x): the offline write
    quotes them as PostgreSQL identifiers (the INSERT wrote "k"q" and failed), and the join reads them back. Feast's
    PostgreSQL store cannot be the reference here: its join fails on such names."""
    import psycopg
    from feast import Entity, FeatureView, Field, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.types import Float64

    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute('DROP TABLE IF EXISTS quoted_rows')
        conn.execute('CREATE TABLE quoted_rows ("k""q" bigint, "t""s" timestamptz, "f""x" float8)')
    entity = Entity(name="quoted_key", join_keys=['k"q'], value_type=ValueType.INT64)
    view = FeatureView(name="quoted_view", entities=[entity], ttl=pd.Timedelta(days=1),
                       schema=[Field(name='f"x', dtype=Float64)],
                       source=PostgreSQLSource(name="quoted_source", table="quoted_rows", timestamp_field='t"s'))
    store = feature_store(contract_db, project="quoted_names")
    store.apply([entity, view])
    store.write_to_offline_store("quoted_view", pd.DataFrame({'k"q': [1, 2], 't"s': [T0, T0 + DAY],
                                                              'f"x': [1.5, 2.5]}))
    with psycopg.connect(contract_db.postgres.libpq_url()) as conn:
        assert conn.execute('SELECT "k""q", "f""x" FROM quoted_rows ORDER BY 1').fetchall() == [(1, 1.5), (2, 2.5)]
    entities = pd.DataFrame({'k"q': [2, 1, 3], "event_timestamp": [T0 + DAY, T0 + DAY, T0 + DAY]})
    got = store.get_historical_features(entity_df=entities, features=['quoted_view:f"x']).to_df()
    assert got['f"x'].tolist()[:2] == [2.5, 1.5] and pd.isna(got['f"x'].iloc[2])


def test_a_feature_named_like_the_joins_internal_column_equals_feast(contract_db: Settings) -> None:
    """A feature named __pos, the name of the column that carries each result row's entity position: the join
    answered 'Field "__pos" exists 2 times in schema' where Feast's store answers; now both agree, to_df and
    persist."""
    from feast import Entity, FeatureView, Field, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.types import Float64

    load_tables(contract_db, {"pos_rows": pd.DataFrame({"store": [1, 2], "event_timestamp": [T0, T0],
                                                        "__pos": [10.0, 20.0], "sales": [1.5, 2.5]})})
    entity = Entity(name="pos_store", join_keys=["store"], value_type=ValueType.INT64)
    view = FeatureView(name="pos_view", entities=[entity], ttl=pd.Timedelta(days=1),
                       schema=[Field(name="__pos", dtype=Float64), Field(name="sales", dtype=Float64)],
                       source=PostgreSQLSource(name="pos_source", table="pos_rows", timestamp_field="event_timestamp"))
    feature_store(contract_db, project="internal_names").apply([entity, view])
    entities = pd.DataFrame({"row_id": [0, 1, 2], "store": [2, 1, 3], "event_timestamp": [T0 + DAY] * 3})
    ours, theirs = both(contract_db, entities, ["pos_view:__pos", "pos_view:sales"], project="internal_names")
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["__pos"].tolist()[:2] == [20.0, 10.0]
    feature_store(contract_db, project="internal_names").get_historical_features(
        entity_df=entities, features=["pos_view:__pos"]).persist(
        SavedDatasetPostgreSQLStorage(table_ref="persisted_pos"), allow_overwrite=True)
    assert read_table(contract_db, "persisted_pos").sort_values("row_id")["__pos"].tolist()[:2] == [20.0, 10.0]


def test_offline_writes_refuse_a_schema_mismatch(contract_db: Settings) -> None:
    """A table that does not fit the source is refused, naming the columns, and nothing is written."""
    import psycopg
    import pyarrow as pa

    from sales_forecast.ray_offline_store.store import OfflineWriteError, RayPostgreSQLOfflineStore

    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS visit_rows")
        conn.execute("CREATE TABLE visit_rows (store int, event_timestamp timestamptz, created timestamptz, "
                     "visit_count int)")
    store = feature_store(contract_db)
    view = store.get_feature_view("store_visits")

    def write(frame: pd.DataFrame, feature_view=view) -> None:
        RayPostgreSQLOfflineStore.offline_write_batch(store.config, feature_view, pa.Table.from_pandas(frame), None)

    good = visit_rows([1], 0, [10]).rename(columns={"visit_count": "visits"})  # as the provider hands it over
    with pytest.raises(OfflineWriteError, match=r"missing.*created"):
        write(good.drop(columns="created"))
    with pytest.raises(OfflineWriteError, match=r"not in .*visit_rows.*: extra"):
        write(good.assign(extra=1))
    with pytest.raises(OfflineWriteError, match=r"visit_count"):
        write(good.assign(visits=["many"]))
    with pytest.raises(OfflineWriteError, match="integer out of range"):
        write(good.assign(visits=[2**40]))
    with pytest.raises(OfflineWriteError, match="query"):
        write(pd.DataFrame({"region": ["B"], "event_timestamp": [T0], "score": [1.0]}),
              store.get_feature_view("region_stats"))
    assert read_visits(contract_db) == []
    write(good)
    assert read_visits(contract_db) == [(1, T0.to_pydatetime(), 10)]


# --- persist: a one-view result is written partition by partition ------------------------------------------------

def many_store_dept_rows(rng: np.random.Generator) -> pd.DataFrame:
    keys = pd.MultiIndex.from_product([range(1, 13), range(1, 13), range(6)], names=["store", "dept", "day"])
    frame = keys.to_frame(index=False)
    frame["event_timestamp"] = T0 + frame.pop("day") * DAY
    frame["created"] = frame["event_timestamp"] + pd.to_timedelta(rng.integers(0, 3, len(frame)), unit="h")
    return frame.assign(sales=rng.normal(size=len(frame)), units=rng.integers(0, 100, len(frame)))


def read_table(settings: Settings, name: str) -> pd.DataFrame:
    import adbc_driver_postgresql.dbapi as adbc

    with adbc.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{name}"')
        return cur.fetch_arrow_table().to_pandas()


@pytest.mark.parametrize("entity_kind", ["sql", "frame", "frame in process"])
def test_persist_writes_a_one_view_result_partition_by_partition(contract_db: Settings, entity_kind: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-view request (two keys) persists the rows to_df returns, rows with a NULL key or time included, without
    ever putting the whole result together (InEntityOrder is what does that); one ingest per partition."""
    from sales_forecast.ray_offline_store import driver
    from sales_forecast.ray_offline_store import store as store_module

    rng = np.random.default_rng(5)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})
    entities = pd.DataFrame({"row_id": np.arange(600), "store": rng.integers(0, 14, 600),
                             "dept": rng.integers(0, 14, 600),
                             "event_timestamp": T0 + pd.to_timedelta(rng.integers(0, 9 * 24, 600), unit="h")})
    entities["dept"] = entities["dept"].astype("Int64").mask(entities.row_id % 50 == 7)
    entities["event_timestamp"] = entities["event_timestamp"].mask(entities.row_id % 50 == 9)
    options = {"sql": {"min_rows_per_partition": 20}, "frame": {"partitions": 12},
               "frame in process": {"ray_min_entity_rows": 10_000}}[entity_kind]
    if entity_kind == "sql":
        load_tables(contract_db, {"persist_entities": entities})
        monkeypatch.setattr(store_module, "STREAM_BATCH_BYTES", 2048)  # in several batches
        entity_df = 'SELECT * FROM persist_entities ORDER BY store, dept'
    else:
        entity_df = entities
    store = feature_store(contract_db, **options)
    features = ["store_dept_stats:sales", "store_dept_stats:units"]
    want = store.get_historical_features(entity_df=entity_df, features=features).to_df()

    class Refused(store_module.InEntityOrder):
        def __init__(self) -> None:
            raise AssertionError("persist put the whole result together")

    ingests, pending = [], []
    original, submit = store_module.SavedDatasetWriter._write, driver.Calls.submit

    def write(self, *parts) -> None:
        ingests.append(parts[0].num_rows)
        time.sleep(0.2)  # a sink slower than the join: results must not pile up in Ray's object store
        original(self, *parts)

    def counted(self, *args) -> None:
        submit(self, *args)
        pending.append((len(self.pending), self.in_flight))

    monkeypatch.setattr(store_module, "InEntityOrder", Refused)
    monkeypatch.setattr(store_module.SavedDatasetWriter, "_write", write)
    monkeypatch.setattr(driver.Calls, "submit", counted)
    job = store.get_historical_features(entity_df=entity_df, features=features)
    job.persist(SavedDatasetPostgreSQLStorage(table_ref="persisted"), allow_overwrite=True)
    got = read_table(contract_db, "persisted")
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want) == 600 and got["sales"].notna().sum() > 300
    pd.testing.assert_frame_equal(got.sort_values("row_id").reset_index(drop=True),
                                  want.sort_values("row_id").reset_index(drop=True), check_dtype=False)
    assert len(ingests) >= (1 if entity_kind == "frame in process" else 4) + 1  # partitions, then NULL-key rows
    assert all(count <= bound for count, bound in pending)
    # twelve partitions submitted in one loop fill the bound; a SQL set's are cut as its batches arrive, and whether
    # earlier calls are still pending then depends on timing
    assert entity_kind != "frame" or max(count for count, _ in pending) == pending[0][1]


def test_persist_of_a_date_range_keeps_feasts_columns(contract_db: Settings) -> None:
    load_tables(contract_db, {"store_dept_rows": created_rows()})
    kwargs = {"features": ["store_dept_stats:sales"], "start_date": (T0 + DAY).to_pydatetime(),
              "end_date": (T0 + 2 * DAY).to_pydatetime()}
    want = feature_store(contract_db).get_historical_features(**kwargs).to_df()
    feature_store(contract_db).get_historical_features(**kwargs).persist(
        SavedDatasetPostgreSQLStorage(table_ref="persisted_range"), allow_overwrite=True)
    got = read_table(contract_db, "persisted_range")
    assert list(got.columns) == ["event_timestamp", "created_timestamp", "store", "dept", "sales"]
    by = ["event_timestamp", "store", "dept"]
    pd.testing.assert_frame_equal(got.sort_values(by).reset_index(drop=True), want, check_dtype=False)


def test_a_failed_persist_leaves_the_table_it_would_replace(contract_db: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after some partitions were written rolls all of them back: the old table stays as it was; without
    allow_overwrite an existing table is refused."""
    from sales_forecast.ray_offline_store import store as store_module

    rng = np.random.default_rng(6)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})
    entities = pd.DataFrame({"row_id": np.arange(300), "store": rng.integers(1, 13, 300),
                             "dept": rng.integers(1, 13, 300), "event_timestamp": [T0 + 3 * DAY] * 300})
    storage = SavedDatasetPostgreSQLStorage(table_ref="persisted_kept")
    store = feature_store(contract_db, partitions=4)
    store.get_historical_features(entity_df=entities.head(3), features=["store_dept_stats:sales"]).persist(
        storage, allow_overwrite=True)
    before = read_table(contract_db, "persisted_kept")
    with pytest.raises(ValueError, match="cannot persist to persisted_kept"):
        store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"]).persist(storage)

    original, calls = store_module.SavedDatasetWriter._write, []

    def failing(self, *parts):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the third partition fails")
        original(self, *parts)

    monkeypatch.setattr(store_module.SavedDatasetWriter, "_write", failing)
    with pytest.raises(RuntimeError, match="third partition"):
        store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"]).persist(
            storage, allow_overwrite=True)
    pd.testing.assert_frame_equal(read_table(contract_db, "persisted_kept"), before)


def column_types(settings: Settings, name: str) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
                            "ORDER BY ordinal_position", (name,)).fetchall()


@pytest.mark.parametrize("views", ["one view, partition by partition", "two views, at once"])
def test_persist_writes_the_types_and_values_adbcs_ingest_wrote(contract_db: Settings, views: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """persist writes with binary COPY (pgpq), ADBC's ingest before: for entity columns of every type COPY sends (NULLs
    of each, text that SQL or a shell would interpret, a naive timestamp), the same column types and rows as ADBC's
    ingest of the job's to_arrow. A list column, which COPY cannot send, makes the whole table ADBC's ingest."""
    import adbc_driver_postgresql.dbapi as adbc

    from sales_forecast.ray_offline_store import store as store_module

    rng = np.random.default_rng(8)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng), "store_rows": store_rows(
        store=list(range(1, 13)), event_timestamp=[T0] * 12, temperature=rng.normal(size=12), visitors=range(12))})
    copies, copy_rows = [], store_module.copy_rows
    monkeypatch.setattr(store_module, "copy_rows", lambda cur, table, data: (copies.append(data.num_rows),
                                                                             copy_rows(cur, table, data)))
    n = 40
    entities = pd.DataFrame({
        "row_id": np.arange(n), "store": rng.integers(1, 13, n), "dept": rng.integers(1, 13, n),
        "event_timestamp": T0 + pd.to_timedelta(rng.integers(0, 7 * 24, n), unit="h"),
        "note": pd.Series(["'; DROP TABLE persisted; --", None, "$(rm -rf /) \\N \t\n é 😀", "x"] * (n // 4)),
        "flag": pd.array([True, None, False, True] * (n // 4), dtype="boolean"),
        "count": pd.array([2**62, None, -1, 0] * (n // 4), dtype="Int64"),
        "weight": pd.array([0.5, None, -1e300, 5e-324] * (n // 4), dtype="Float64"),
        "seen": pd.Series([pd.Timestamp("2026-03-08 02:30"), pd.NaT, pd.Timestamp("1970-01-01"),
                           pd.Timestamp("2026-01-01 00:00:00.123456789")] * (n // 4)),
    })
    features = ["store_dept_stats:sales", "store_dept_stats:units"] + (
        ["store_stats:temperature"] if views.startswith("two") else [])
    store = feature_store(contract_db, partitions=3)
    for suffix, frame in (("", entities), ("_lists", entities.assign(tags=[[1, 2], None, [], [3]] * (n // 4)))):
        job = store.get_historical_features(entity_df=frame, features=features)
        job.persist(SavedDatasetPostgreSQLStorage(table_ref=f"copied{suffix}"), allow_overwrite=True)
        with adbc.connect(contract_db.postgres.libpq_url()) as conn, conn.cursor() as cur:
            cur.adbc_ingest(f"ingested{suffix}", job.to_arrow(), mode="replace")
            conn.commit()
        assert column_types(contract_db, f"copied{suffix}") == column_types(contract_db, f"ingested{suffix}")
        got, want = (read_table(contract_db, f"{kind}{suffix}").sort_values("row_id").reset_index(drop=True)
                     for kind in ("copied", "ingested"))
        pd.testing.assert_frame_equal(got, want)
        assert got["note"].isna().sum() == n // 4 and got["sales"].notna().all()
        assert (sum(copies) == n) if suffix == "" else not copies, copies  # COPY, or ADBC's ingest for lists
        copies.clear()
    assert ("tags", "ARRAY") in column_types(contract_db, "copied_lists")


@pytest.mark.timeout(300, method="thread")  # a hang is in ray.wait, which a signal does not interrupt
def test_persist_can_replace_the_table_its_join_reads(contract_db: Settings) -> None:
    """Saved to the view's own source table with allow_overwrite: the old table is dropped only once the join is
    done. When the first partition's write dropped it, that write's lock and the next partitions' reads of the
    table waited for each other for ever."""
    rng = np.random.default_rng(9)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})
    entities = pd.DataFrame({"row_id": np.arange(400), "store": rng.integers(1, 13, 400),
                             "dept": rng.integers(1, 13, 400), "event_timestamp": [T0 + 3 * DAY] * 400})
    job = feature_store(contract_db, partitions=8).get_historical_features(entity_df=entities,
                                                                            features=["store_dept_stats:sales"])
    want = job.to_df()
    job.persist(SavedDatasetPostgreSQLStorage(table_ref="store_dept_rows"), allow_overwrite=True)
    got = read_table(contract_db, "store_dept_rows")
    pd.testing.assert_frame_equal(got.sort_values("row_id").reset_index(drop=True),
                                  want.sort_values("row_id").reset_index(drop=True), check_dtype=False)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})


def test_a_saved_dataset_reads_back_what_persist_wrote_under_its_name(contract_db: Settings) -> None:
    """The saved dataset is read back through PostgreSQLSource(table=name), which puts the name into SQL as it is:
    persist writes the table that SQL names (a schema-qualified name in its schema, an unquoted name lowercased, a
    quoted one as quoted). A name that would not read back, or that is SQL, is refused before anything is read or
    written. Feast's own persist fails on every one of these names."""
    import psycopg
    rng = np.random.default_rng(10)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})
    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS other_schema")
    entities = pd.DataFrame({"row_id": np.arange(50), "store": rng.integers(1, 13, 50),
                             "dept": rng.integers(1, 13, 50), "event_timestamp": [T0 + 3 * DAY] * 50})
    store = feature_store(contract_db, partitions=3)
    want = store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"]).to_df()
    for name, relation in (("other_schema.Saved_Here", "other_schema.saved_here"), ("MixedCase", "mixedcase"),
                           ('"Quoted Name"', '"Quoted Name"'), ('other_schema."x.y"', 'other_schema."x.y"')):
        job = store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"])
        saved = store.create_saved_dataset(from_=job, name=f"saved {name}", allow_overwrite=True,
                                           storage=SavedDatasetPostgreSQLStorage(table_ref=name))
        got = store.get_saved_dataset(saved.name).to_df()  # the dataset's keys, time and features, not row_id
        assert set(got.columns) == {"store", "dept", "event_timestamp", "sales"}, got.columns
        columns = ["store", "dept", "event_timestamp", "sales"]
        pd.testing.assert_frame_equal(got[columns].sort_values(columns).reset_index(drop=True),
                                      want[columns].sort_values(columns).reset_index(drop=True), check_dtype=False)
        with psycopg.connect(contract_db.postgres.libpq_url()) as conn:
            assert conn.execute(f"SELECT count(*) FROM {relation}").fetchone()[0] == 50
    for name in ('x"; DROP TABLE store_dept_rows; --', "with space", "a.b.c", "", '"unclosed', "t;"):
        job = store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"])
        with pytest.raises(ValueError, match="not a table name a saved dataset reads back"):
            job.persist(SavedDatasetPostgreSQLStorage(table_ref=name), allow_overwrite=True)
    assert len(read_table(contract_db, "store_dept_rows")) == len(many_store_dept_rows(rng))


def test_persist_refuses_an_unsigned_value_bigint_cannot_hold(contract_db: Settings) -> None:
    """An unsigned entity column is written in the smallest signed type that holds it; a uint64 value above
    2**63 - 1 is refused with the column's name (ADBC's ingest wrapped it around to a negative number; Feast's
    store fails with 'bigint out of range')."""
    rng = np.random.default_rng(11)
    load_tables(contract_db, {"store_dept_rows": many_store_dept_rows(rng)})
    entities = pd.DataFrame({"row_id": np.arange(4), "store": [1, 2, 3, 4], "dept": [1, 2, 3, 4],
                             "event_timestamp": [T0 + 3 * DAY] * 4,
                             "small": np.array([0, 1, 2, 255], dtype="uint8"),
                             "big": np.array([0, 1, 2**63 - 1, 2**32], dtype="uint64")})
    store = feature_store(contract_db, partitions=2)
    storage = SavedDatasetPostgreSQLStorage(table_ref="persisted_unsigned")
    store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"]).persist(
        storage, allow_overwrite=True)
    got = read_table(contract_db, "persisted_unsigned").sort_values("row_id")
    assert got["small"].tolist() == [0, 1, 2, 255] and got["big"].tolist() == [0, 1, 2**63 - 1, 2**32]
    assert ("big", "bigint") in column_types(contract_db, "persisted_unsigned")
    with pytest.raises(ValueError, match="cannot persist to persisted_unsigned: column 'big'"):
        store.get_historical_features(entity_df=entities.assign(big=entities["big"] + np.uint64(2**63)),
                                      features=["store_dept_stats:sales"]).persist(storage, allow_overwrite=True)
    assert read_table(contract_db, "persisted_unsigned").sort_values("row_id")["big"].tolist() == got["big"].tolist()


def test_a_failed_partition_read_reaches_the_caller_with_postgresqls_message(contract_db: Settings) -> None:
    """A Ray worker's failed read (here the view's source table is gone) reaches the caller as PartitionReadError
    with PostgreSQL's message (ADBC's own error does not survive Ray's pickling: the caller got "Failed to
    deserialize exception"), and persist does not call it a write failure."""
    import psycopg

    from sales_forecast.ray_offline_store.worker import PartitionReadError

    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS store_rows")
    entities = pd.DataFrame({"store": [1, 2, 3], "event_timestamp": [T0 + DAY] * 3})
    store = feature_store(contract_db, partitions=2)
    with pytest.raises(PartitionReadError, match='relation "store_rows" does not exist'):
        store.get_historical_features(entity_df=entities, features=["store_stats:temperature"]).to_df()
    with pytest.raises(PartitionReadError, match='relation "store_rows" does not exist'):
        store.get_historical_features(entity_df=entities, features=["store_stats:temperature"]).persist(
            SavedDatasetPostgreSQLStorage(table_ref="persisted_nothing"), allow_overwrite=True)


def test_a_view_whose_source_is_not_postgresql_is_refused_by_name(contract_db: Settings) -> None:
    """A view on a FileSource gets Feast's FeastOfflineStoreUnsupportedDataSource naming the source and the view
    (Feast's PostgreSQL store fails a bare assert, which python -O skips)."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.errors import FeastOfflineStoreUnsupportedDataSource
    from feast.types import Float64, Int64

    from sales_forecast.ray_offline_store.store import RayPostgreSQLOfflineStore

    store = feature_store(contract_db)
    entity = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64)
    view = FeatureView(name="parquet_view", entities=[entity],
                       schema=[Field(name="store", dtype=Int64), Field(name="sales", dtype=Float64)],
                       source=FileSource(name="parquet_rows", path="rows.parquet", timestamp_field="event_timestamp"))
    entities = pd.DataFrame({"store": [1], "event_timestamp": [T0]})
    with pytest.raises(FeastOfflineStoreUnsupportedDataSource, match=r"parquet_rows \(feature view parquet_view, a "
                                                                     r"FileSource\)"):
        RayPostgreSQLOfflineStore.get_historical_features(store.config, [view], ["parquet_view:sales"], entities,
                                                          store.registry, store.project)


def test_entity_columns_of_types_adbc_hands_over_as_extensions(contract_db: Settings) -> None:
    """An entity query's uuid and json columns come back as text and a numeric[] as arrays of doubles, in to_df
    and in a saved dataset alike; a type ADBC hands over as opaque wire bytes (inet) is refused with the column's
    name by both. to_df used to fail with KeyError on all of them while persist wrote inet's wire bytes."""
    load_tables(contract_db, {"store_rows": store_rows(store=[1, 2], event_timestamp=[T0, T0],
                                                       temperature=[10.0, 20.0], visitors=[1, 2])})
    query = ("SELECT s AS store, timestamptz '2026-01-03' AS event_timestamp, "
             "CASE WHEN s = 1 THEN 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid END AS id, "
             "jsonb_build_object('s', s) AS doc, ARRAY[s * 1.5, NULL]::numeric[] AS amounts "
             "FROM generate_series(1, 2) s")
    store = feature_store(contract_db, partitions=2)
    frame = store.get_historical_features(entity_df=query, features=["store_stats:temperature"]).to_df()
    store.get_historical_features(entity_df=query, features=["store_stats:temperature"]).persist(
        SavedDatasetPostgreSQLStorage(table_ref="persisted_extensions"), allow_overwrite=True)
    for got in (frame, read_table(contract_db, "persisted_extensions")):
        got = got.sort_values("store").reset_index(drop=True)
        assert got["id"].tolist() == ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None]
        assert [json.loads(doc) for doc in got["doc"]] == [{"s": 1}, {"s": 2}]
        np.testing.assert_array_equal(np.vstack([np.asarray(a, dtype=float) for a in got["amounts"]]),
                                      [[1.5, np.nan], [3.0, np.nan]])  # NULL items: NaN, as NumPy has no NULL
        assert got["temperature"].tolist() == [10.0, 20.0]
    inet = query.replace("AS amounts", "AS amounts, '10.0.0.1'::inet AS address")
    with pytest.raises(ValueError, match="column 'address' is of PostgreSQL type inet"):
        store.get_historical_features(entity_df=inet, features=["store_stats:temperature"]).to_df()
    with pytest.raises(ValueError, match="column 'address' is of PostgreSQL type inet"):
        store.get_historical_features(entity_df=inet, features=["store_stats:temperature"]).persist(
            SavedDatasetPostgreSQLStorage(table_ref="persisted_inet"), allow_overwrite=True)


# --- a partition's read goes through the (keys, timestamp) index ----------------------------------------------------
def test_a_partition_of_a_two_key_view_is_read_through_the_index(contract_db: Settings) -> None:
    """PostgreSQL overestimates the rows of a row comparison (``ROW(store, dept) >= ROW(..)``), here tenfold; on the
    10x feature table (6M rows) it then chose a full scan for every partition. The query also bounds the first key
    on its own, which the planner estimates from its statistics. Checked with EXPLAIN on an analyzed table."""
    import psycopg

    from sales_forecast.ray_offline_store.driver import KeyRange, TimeWindow, ViewPlan, feature_query

    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wide_sales")
        conn.execute("CREATE TABLE wide_sales AS SELECT s AS store, d AS dept, "
                     "timestamptz '2026-01-02' + w * interval '7 days' AS event_timestamp, random() AS sales "
                     "FROM generate_series(1, 200) s, generate_series(1, 20) d, generate_series(0, 51) w")
        conn.execute("CREATE INDEX ON wide_sales (store, dept, event_timestamp)")
        conn.execute("ANALYZE wide_sales")
        plan = ViewPlan(name="wide", source_sql='"wide_sales"', join_keys=("store", "dept"),
                        source_keys=("store", "dept"), timestamp_field="event_timestamp",
                        created_timestamp_column=None, features=("sales",), output_names=("sales",),
                        ttl_seconds=0)
        window = TimeWindow(low_ns=None, high_ns=pd.Timestamp("2027-01-01", tz="UTC").value)
        query = feature_query(plan, window, KeyRange((40, 7), (43, 12)), (False, False))
        explained = conn.execute(f"EXPLAIN (FORMAT JSON) {query}").fetchone()[0][0]["Plan"]
        rows = conn.execute(f"SELECT count(*) FROM ({query}) AS q").fetchone()[0]
    assert rows == (14 + 20 * 2 + 12) * 52  # the range's rows, no more
    assert explained["Plan Rows"] <= 2 * rows, explained  # not overestimated, as a full scan needs
    assert "Seq Scan" not in json.dumps(explained), explained


# --- materialization reads: pull_latest in blocks for Feast's Ray engine ------------------------------------------
@pytest.mark.parametrize("engine", ["ray.engine", ENGINE_TYPE])
def test_ray_engine_materializes_every_key_from_blocks_written_concurrently(contract_db: Settings,
                                                                           engine: str) -> None:
    """pull_latest hands the Ray engine (Feast's, and the project's, which writes Arrow batches) its latest rows in
    one block per concurrent write (LatestRowsJob), each a whole number of online write batches: every key lands in
    exactly one block, and the online store ends with each key's latest row (the later created row of a tie; nothing
    for a key whose latest row is older than the ttl), for two keys whose glued ids collide, written through the bulk
    online store by up to two tasks at once."""
    import ray

    from sales_forecast.online_store import STORE_TYPE as BULK_STORE
    from sales_forecast.ray_offline_store.store import LatestRowsJob

    now = pd.Timestamp.now(tz="UTC").floor("h")
    keys = [(1, 12), (11, 2), *((store, dept) for store in (2, 3) for dept in (1, 2, 3))]
    rows = pd.DataFrame([
        {"store": s, "dept": d, "event_timestamp": now - (2 - age) * DAY, "created": now - (2 - age) * DAY,
         "sales": 100.0 * s + d + age / 10, "units": 10 * s + d + age} for s, d in keys for age in (0, 1, 2)])
    tie = rows.iloc[[0]].assign(created=now + pd.Timedelta(minutes=5), sales=-1.0, units=-1)
    stale = rows.iloc[[0]].assign(store=5, dept=5, event_timestamp=now - 30 * DAY, created=now - 30 * DAY)
    load_tables(contract_db, {"store_dept_rows": pd.concat([rows, tie, stale], ignore_index=True)})
    rows.loc[0, ["sales", "units"]] = [-1.0, -1]  # key (1, 12)'s latest time has two rows: the later created wins
    sections = {"online_store": {"type": BULK_STORE},
                "batch_engine": {"type": engine, "max_workers": 2, "write_concurrency": 2},
                "materialization": {"online_write_batch_size": 2, "pull_latest_features": True}}
    store = feature_store(contract_db, project=f"ray_store_blocks_{engine == ENGINE_TYPE}", sections=sections)
    store.apply(definitions(RAY_REPO / "features.py"))
    view = store.get_feature_view("store_dept_stats")
    start, end = (now - 40 * DAY).to_pydatetime(), (now + DAY).to_pydatetime()

    job = store._get_provider().offline_store.pull_latest_from_table_or_query(
        store.config, view.batch_source, ["store", "dept"], ["sales", "units"], "event_timestamp", "created", start,
        end)
    assert isinstance(job, LatestRowsJob)
    blocks = [block.to_pandas() for block in ray.get(job.to_ray_dataset().to_arrow_refs())]
    assert [len(block) for block in blocks] == [6, 3]  # 9 keys: 5 batches of 2, for 2 writers
    in_blocks = pd.concat(blocks, ignore_index=True)
    assert sorted(zip(in_blocks["store"], in_blocks["dept"], strict=True)) == sorted([*keys, (5, 5)])

    def by_key(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values(["store", "dept"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(by_key(in_blocks), by_key(job.to_arrow().to_pandas()))

    store.materialize(start_date=start, end_date=end, feature_views=["store_dept_stats"])
    online = store.get_online_features(
        features=["store_dept_stats:sales", "store_dept_stats:units"],
        entity_rows=[{"store": s, "dept": d} for s, d in [*keys, (5, 5)]]).to_df()
    latest = rows.sort_values("event_timestamp").groupby(["store", "dept"]).tail(1).set_index(["store", "dept"])
    assert online["sales"].iloc[:-1].tolist() == latest.loc[keys, "sales"].tolist()
    assert online["units"].iloc[:-1].tolist() == latest.loc[keys, "units"].tolist()
    assert online[["sales", "units"]].iloc[-1].isna().all()  # (5, 5): its only row is older than the ttl


def test_the_projects_engine_leaves_the_online_rows_feasts_engine_leaves(contract_db: Settings) -> None:
    """Every view of the fixture repo materialized by Feast's Ray engine and by the project's (Arrow batches into the
    bulk store), each into its own project: the online tables hold the same bytes. Integer keys with Float64 and Int64
    features (ArrowRows), a NULL float and a batch with a NULL integer (Feast's protos for that batch), a text key
    with a query source and field mapping, ttl 0, a view without entities, a push source's batch table; 3-row write
    batches, two writers."""
    import psycopg

    from sales_forecast.online_store import STORE_TYPE as BULK_STORE

    now = pd.Timestamp.now(tz="UTC").floor("h")
    hours = [now - pd.Timedelta(hours=h) for h in (30, 20, 10)]
    rows = [{"store": s, "dept": d, "event_timestamp": t, "created": t + pd.Timedelta(minutes=m),
             "sales": 10.0 * s + d + m / 10, "units": s * d + m} for s in (1, 2, 11) for d in (1, 2, 12)
            for t, m in zip(hours, (1, 2, 3), strict=True)]
    rows[-1].update(sales=None)
    rows[-4].update(units=None)  # the latest row of one key: its batch goes through Feast's protos
    load_tables(contract_db, {
        "store_dept_rows": pd.DataFrame(rows).astype({"units": "Int64"}),
        "store_rows": store_rows(store=[1, 2, 3], event_timestamp=hours, temperature=[20.5, -0.0, None],
                                 visitors=[1, 2**40, -3]),
        "dept_rows": pd.DataFrame({"dept": [1, 2], "event_timestamp": hours[:2], "dept_index": [0.5, float("inf")]}),
        "region_rows": pd.DataFrame({"region": ["A", "B'; DROP TABLE x; --"], "event_timestamp": hours[:2],
                                     "region_score": [1.25, 2.5]}),
        "global_rows": pd.DataFrame({"event_timestamp": hours, "created": hours, "level": [1.0, 2.0, 3.0]}),
        "visit_rows": pd.DataFrame({"store": [1, 2], "event_timestamp": hours[:2], "created": hours[:2],
                                    "visit_count": [5, 6]}),
    })
    start, end = (now - 5 * DAY).to_pydatetime(), (now + DAY).to_pydatetime()
    projects = {}
    for engine in ("ray.engine", ENGINE_TYPE):
        project = f"engines_{'ours' if engine == ENGINE_TYPE else 'feast'}"
        store = feature_store(contract_db, project=project, sections={
            "online_store": {"type": BULK_STORE},
            "batch_engine": {"type": engine, "max_workers": 2, "write_concurrency": 2},
            "materialization": {"online_write_batch_size": 3, "pull_latest_features": True}})
        store.apply(definitions(RAY_REPO / "features.py"))
        store.materialize(start_date=start, end_date=end)
        projects[engine] = project
    views = ["store_dept_stats", "store_stats", "dept_stats", "region_stats", "global_stats", "store_visits"]
    with psycopg.connect(contract_db.postgres.libpq_url()) as conn:
        def online(project: str, view: str) -> list[tuple]:
            return conn.execute(
                f'SELECT entity_key, feature_name, value, value_text, vector_value, event_ts::text, created_ts::text '
                f'FROM "{project}_{view}" ORDER BY entity_key, feature_name').fetchall()

        for view in views:
            theirs, ours = online(projects["ray.engine"], view), online(projects[ENGINE_TYPE], view)
            assert theirs, view
            assert ours == theirs, view
        assert len(online(projects[ENGINE_TYPE], "store_dept_stats")) == 9 * 2


def test_the_projects_engine_fails_a_materialization_whose_write_fails(contract_db: Settings) -> None:
    """Feast's Ray engine logs a failed online write and reports success; the project's raises it. Here the
    view's online table is gone; after it is back, the same materialization writes."""
    import psycopg

    from sales_forecast.online_store import STORE_TYPE as BULK_STORE

    now = pd.Timestamp.now(tz="UTC").floor("h")
    load_tables(contract_db, {"store_dept_rows": pd.DataFrame({
        "store": [1, 2], "dept": [1, 1], "event_timestamp": [now - DAY] * 2, "created": [now - DAY] * 2,
        "sales": [1.5, 2.5], "units": [1, 2]})})
    sections = {"online_store": {"type": BULK_STORE}, "batch_engine": {"type": ENGINE_TYPE, "max_workers": 1}}
    store = feature_store(contract_db, project="ray_engine_fails", sections=sections)
    store.apply(definitions(RAY_REPO / "features.py"))
    start, end = (now - 3 * DAY).to_pydatetime(), (now + DAY).to_pydatetime()
    with psycopg.connect(contract_db.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute('ALTER TABLE "ray_engine_fails_store_dept_stats" RENAME TO "away"')
        try:
            with pytest.raises(Exception, match="ray_engine_fails_store_dept_stats.*does not exist"):
                store.materialize(start_date=start, end_date=end, feature_views=["store_dept_stats"])
        finally:
            conn.execute('ALTER TABLE "away" RENAME TO "ray_engine_fails_store_dept_stats"')
    store.materialize(start_date=start, end_date=end, feature_views=["store_dept_stats"])
    online = store.get_online_features(features=["store_dept_stats:sales", "store_dept_stats:units"],
                                       entity_rows=[{"store": 1, "dept": 1}, {"store": 2, "dept": 1}]).to_dict()
    assert online["sales"] == [1.5, 2.5] and online["units"] == [1, 2]


def test_write_blocks_are_whole_batches_one_per_concurrent_write() -> None:
    from sales_forecast.ray_offline_store.driver import write_blocks, write_concurrency

    assert [write_blocks(rows, 20_000, 2) for rows in (0, 11_583, 20_000, 20_001, 115_830)] == [1, 1, 1, 2, 2]
    assert write_blocks(115_830, None, 2) == 1 and write_blocks(10, 2, 8) == 5
    assert write_concurrency({"write_concurrency": 3, "max_workers": 2}) == 3
    assert write_concurrency({"write_concurrency": None, "max_workers": 4}) == 4 and write_concurrency({}) == 1
