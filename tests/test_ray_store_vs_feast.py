"""The Ray offline store against a real PostgreSQL and a real local Ray, on randomized data.

Each result is checked against an independent oracle (pandas merge_asof per feature view, multi-column ``by``)
and, for views with one join key, against Feast's own PostgreSQL join. The definitions are in
tests/fixtures/ray_repo (two join keys, created-timestamp ties, ttl 0, a text key, a query source with a
field mapping, an on-demand view).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import database_settings
from feast import FeatureStore
from feast.errors import FeastEntityDFMissingColumnsError

from sales_forecast.config import Settings
from sales_forecast.features.load import load_table
from sales_forecast.ray_offline_store import RayPostgreSQLOfflineStore
from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob
from tests.support.feast_repo import (
    RAY_REPO,
    definitions,
    feast_env,
    feature_store,
    load_tables,
    postgres_store,
    repo_config,
)

BASE = pd.Timestamp("2026-01-02", tz="UTC")
WEEKS = 30
STORES, DEPTS = 12, 13  # both (1, 12) and (11, 2) exist
REGIONS = ["alpha", "B", "North", "north", "south", "Zeta", "éclair", "z"]  # C order differs from a locale's

pytestmark = pytest.mark.usefixtures("own_ray")


# --- data -------------------------------------------------------------------------------------------------------

def _weekly_rows(rng: np.random.Generator, keys: pd.DataFrame, keep: float) -> pd.DataFrame:
    """About one row per key per week, at the week's start or a little later; some weeks missing (gaps)."""
    rows = keys.loc[keys.index.repeat(WEEKS)].reset_index(drop=True)
    week = np.tile(np.arange(WEEKS), len(keys))
    jitter = rng.choice([0, 0, 0, 3_600, 86_400, 2 * 86_400 + 1_234], size=len(rows))
    rows["event_timestamp"] = BASE + pd.to_timedelta(week * 7, "D") + pd.to_timedelta(jitter, "s")
    return rows[rng.random(len(rows)) < keep].reset_index(drop=True)


def _with_created_ties(rng: np.random.Generator, rows: pd.DataFrame, values: dict) -> pd.DataFrame:
    """A created timestamp per row, and ~15% of rows repeated at the same event time, created later,
    with other values: the later created row must win."""
    rows = rows.assign(created=rows["event_timestamp"] + pd.to_timedelta(rng.integers(0, 600, len(rows)), "s"))
    rows = rows.assign(**{name: make(len(rows)) for name, make in values.items()})
    again = rows.sample(frac=0.15, random_state=int(rng.integers(1 << 30)))
    again = again.assign(created=again["created"] + pd.to_timedelta(rng.integers(1, 3_600, len(again)), "s"),
                         **{name: make(len(again)) for name, make in values.items()})
    return pd.concat([rows, again], ignore_index=True).sample(frac=1, random_state=int(rng.integers(1 << 30)))


def feature_tables(seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    pairs = pd.DataFrame([(s, d) for s in range(1, STORES + 1) for d in range(1, DEPTS + 1)], columns=["store", "dept"])
    pairs = pairs[(rng.random(len(pairs)) < 0.75) | pairs.apply(tuple, axis=1).isin([(1, 12), (11, 2)])]
    store_dept = _with_created_ties(rng, _weekly_rows(rng, pairs.reset_index(drop=True), 0.8), {
        "sales": lambda n: np.round(rng.normal(1_000, 300, n), 2),
        "units": lambda n: rng.integers(0, 500, n)})
    stores = pd.DataFrame({"store": np.arange(1, STORES)})  # the last store has no rows
    store = _with_created_ties(rng, _weekly_rows(rng, stores, 0.7), {
        "temperature": lambda n: np.round(rng.normal(60, 15, n), 2),
        "visitors": lambda n: rng.integers(100, 5_000, n)})
    dept = _weekly_rows(rng, pd.DataFrame({"dept": np.arange(1, DEPTS)}), 0.5).drop_duplicates(
        ["dept", "event_timestamp"])
    dept["dept_index"] = np.round(rng.random(len(dept)), 4)
    region = _weekly_rows(rng, pd.DataFrame({"region": REGIONS}), 0.6).drop_duplicates(["region", "event_timestamp"])
    region["region_score"] = np.round(rng.normal(0, 1, len(region)), 4)
    return {"store_dept_rows": store_dept, "store_rows": store, "dept_rows": dept, "region_rows": region}


def entity_rows(seed: int, tables: dict[str, pd.DataFrame], n: int = 3_000) -> pd.DataFrame:
    """Exact feature timestamps, near misses (+-1 s), times between weeks, before and long after the data,
    keys without rows, the (1, 12) / (11, 2) pair at equal times, and duplicate rows; in random order."""
    rng = np.random.default_rng(seed + 1_000)
    source = tables["store_dept_rows"].sample(n // 3, replace=True, random_state=seed)
    exact = source[["store", "dept", "event_timestamp"]].reset_index(drop=True)
    near = exact.assign(event_timestamp=exact["event_timestamp"]
                        + pd.to_timedelta(rng.choice([-1, 1], len(exact)), "s"))
    span, rest = (WEEKS * 7 + 40) * 86_400, n - 2 * len(exact)
    anywhere = pd.DataFrame({
        "store": rng.integers(1, STORES + 2, rest),
        "dept": rng.integers(1, DEPTS + 2, rest),
        "event_timestamp": BASE - pd.Timedelta(days=10) + pd.to_timedelta(rng.integers(0, span, rest), "s"),
    })
    collide = pd.DataFrame({"store": [1, 11, 1, 11], "dept": [12, 2, 12, 2],
                            "event_timestamp": [BASE + pd.Timedelta(days=21)] * 2 + [BASE + pd.Timedelta(days=50)] * 2})
    entities = pd.concat([exact, near, anywhere, collide], ignore_index=True)
    entities = pd.concat([entities, entities.sample(frac=0.05, random_state=seed)], ignore_index=True)
    entities["region"] = rng.choice([*REGIONS, "nowhere"], len(entities))
    entities["label"] = rng.normal(size=len(entities))
    entities = entities.sample(frac=1, random_state=seed + 1).reset_index(drop=True)
    entities.insert(0, "row_id", rng.permutation(len(entities)))
    return entities


# --- the oracle -------------------------------------------------------------------------------------------------

VIEWS = {  # view: (table, keys, (source column, feature), ttl, created column)
    "store_dept_stats": ("store_dept_rows", ["store", "dept"], [("sales", "sales"), ("units", "units")],
                         pd.Timedelta(days=7), "created"),
    "store_stats": ("store_rows", ["store"], [("temperature", "temperature"), ("visitors", "visitors")],
                    pd.Timedelta(days=3), "created"),
    "dept_stats": ("dept_rows", ["dept"], [("dept_index", "dept_index")], None, None),
    "region_stats": ("region_rows", ["region"], [("region_score", "score")], pd.Timedelta(days=10), None),
}


def oracle_view(entities: pd.DataFrame, tables: dict[str, pd.DataFrame], view: str) -> pd.DataFrame:
    """Feast's point-in-time semantics with pandas merge_asof: the latest row at or before the entity time,
    within ttl, ties broken by the created timestamp (merge_asof keeps the last of equal times)."""
    table, keys, columns, ttl, created = VIEWS[view]
    left = entities[["row_id", *keys, "event_timestamp"]].sort_values("event_timestamp", kind="stable")
    order = ["event_timestamp", created] if created else ["event_timestamp"]
    right = tables[table].sort_values(order, kind="stable")[[*keys, "event_timestamp", *(c for c, _ in columns)]]
    joined = pd.merge_asof(left, right, on="event_timestamp", by=keys, direction="backward", tolerance=ttl)
    return joined.set_index("row_id")[[c for c, _ in columns]].set_axis([f for _, f in columns], axis=1)


def expected(entities: pd.DataFrame, tables: dict[str, pd.DataFrame], views: list[str]) -> pd.DataFrame:
    out = entities.set_index("row_id", drop=False)
    for view in views:
        out = out.join(oracle_view(entities, tables, view))
    return out.reset_index(drop=True)


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Timestamps as naive UTC, numbers as float, ordered by row_id: the shape both sides are compared in."""
    frame = frame.copy()
    stamps = pd.to_datetime(frame["event_timestamp"])
    frame["event_timestamp"] = stamps.dt.tz_convert(None) if stamps.dt.tz is not None else stamps
    frame["event_timestamp"] = frame["event_timestamp"].astype("datetime64[us]")
    for column in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[column]) and column != "row_id":
            frame[column] = frame[column].astype("float64")
    return frame.sort_values("row_id").reset_index(drop=True)


# --- the repo ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_db(stack_settings: Settings) -> Settings:
    settings = database_settings(stack_settings, "ray_store")
    FeatureStore(config=repo_config(settings)).apply(definitions(RAY_REPO / "features.py"))
    return settings


@pytest.fixture(scope="module")
def hand_db(stack_settings: Settings) -> Settings:
    """A second database for the hand-made rows, so they never mix with the randomized ones."""
    settings = database_settings(stack_settings, "ray_store_hand")
    FeatureStore(config=repo_config(settings)).apply(definitions(RAY_REPO / "features.py"))
    return settings


@pytest.fixture(scope="module", params=[11, 12])
def random_data(request: pytest.FixtureRequest, ray_db: Settings) -> tuple[Settings, dict, pd.DataFrame]:
    tables = feature_tables(request.param)
    load_tables(ray_db, tables)
    return ray_db, tables, entity_rows(request.param, tables)


def ray_store(settings: Settings, **offline: object) -> FeatureStore:
    return feature_store(settings, **offline)


def features_of(views: list[str]) -> list[str]:
    return [f"{view}:{feature}" for view in views for _, feature in VIEWS[view][2]]


ALL_VIEWS = list(VIEWS)
SINGLE_KEY_VIEWS = ["store_stats", "dept_stats", "region_stats"]


# --- tests ------------------------------------------------------------------------------------------------------

def test_matches_the_oracle_in_entity_order(random_data) -> None:
    settings, tables, entities = random_data
    job = ray_store(settings).get_historical_features(entity_df=entities, features=features_of(ALL_VIEWS))
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    result = job.to_df()

    assert result["row_id"].tolist() == entities["row_id"].tolist()  # every row once, in the entity set's order
    assert list(result.columns) == [*entities.columns, "sales", "units", "temperature", "visitors", "dept_index",
                                    "score"]
    pd.testing.assert_frame_equal(comparable(result), comparable(expected(entities, tables, ALL_VIEWS)))
    # the cases the data is built to contain actually occur
    assert result["sales"].isna().any() and result["sales"].notna().mean() > 0.3
    assert result["dept_index"].notna().mean() > result["temperature"].notna().mean()  # ttl 0 vs 3 days


def test_two_join_keys_do_not_collide(random_data) -> None:
    settings, tables, entities = random_data
    result = ray_store(settings).get_historical_features(
        entity_df=entities, features=features_of(["store_dept_stats"])).to_df()
    rows = tables["store_dept_rows"]
    for when in (BASE + pd.Timedelta(days=21), BASE + pd.Timedelta(days=50)):
        for store, dept in ((1, 12), (11, 2)):
            got = result[(result.store == store) & (result.dept == dept)
                         & (result.event_timestamp == when.tz_convert(None))]
            own = rows[(rows.store == store) & (rows.dept == dept) & (rows.event_timestamp <= when)
                       & (rows.event_timestamp >= when - pd.Timedelta(days=7))]
            want = own.sort_values(["event_timestamp", "created"]).tail(1)["sales"].tolist() or [np.nan]
            assert len(got) >= 1 and np.allclose(got["sales"], want[0], equal_nan=True)


def test_sql_entity_set_keeps_the_query_order(random_data) -> None:
    settings, tables, entities = random_data
    load_table(settings.postgres, "entity_rows", entities, ["row_id"])
    query = "SELECT * FROM entity_rows ORDER BY row_id DESC"
    result = ray_store(settings).get_historical_features(entity_df=query, features=features_of(ALL_VIEWS)).to_df()
    assert result["row_id"].tolist() == sorted(entities["row_id"], reverse=True)
    pd.testing.assert_frame_equal(comparable(result), comparable(expected(entities, tables, ALL_VIEWS)))


def test_sql_entity_set_is_joined_while_it_streams(random_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQL entity set arrives in batches; in key order, partitions are cut and joined while the rest arrives,
    out of order the rest is partitioned at the end: the same result as the oracle either way."""
    from sales_forecast.ray_offline_store import driver
    from sales_forecast.ray_offline_store import store as store_module

    settings, tables, entities = random_data
    load_table(settings.postgres, "entity_rows", entities, ["row_id"])
    monkeypatch.setattr(store_module, "STREAM_BATCH_BYTES", 4096)  # batches of about a hundred rows
    cut = []
    original = driver.StreamCutter.add
    monkeypatch.setattr(driver.StreamCutter, "add", lambda self, *a: cut.extend(parts := original(self, *a)) or parts)
    for order in ("store, dept, event_timestamp", "row_id"):
        cut.clear()
        result = ray_store(settings, partitions=None, min_rows_per_partition=100).get_historical_features(
            entity_df=f"SELECT * FROM entity_rows ORDER BY {order}", features=features_of(ALL_VIEWS)).to_df()
        pd.testing.assert_frame_equal(comparable(result), comparable(expected(entities, tables, ALL_VIEWS)))
        big = [part for part in cut if len(part.positions) >= 100]
        assert (len(big) >= 5) == order.startswith("store")  # cut while streaming only in key order


@pytest.mark.parametrize("full_feature_names", [False, True])
@pytest.mark.parametrize("entity_kind", ["frame", "sql"])
def test_equals_feast_postgres_join_on_single_key_views(random_data, full_feature_names: bool,
                                                        entity_kind: str) -> None:
    settings, _, entities = random_data
    if entity_kind == "sql":
        load_table(settings.postgres, "entity_rows", entities, ["row_id"])
    entity_df = "SELECT * FROM entity_rows" if entity_kind == "sql" else entities
    features = features_of(SINGLE_KEY_VIEWS)
    ours = ray_store(settings).get_historical_features(entity_df=entity_df, features=features,
                                                      full_feature_names=full_feature_names).to_df()
    feast = postgres_store(settings).get_historical_features(
        entity_df=entity_df, features=features, full_feature_names=full_feature_names).to_df()
    assert list(ours.columns) == list(feast.columns)
    if full_feature_names:
        assert "region_stats__score" in ours.columns and "dept_stats__dept_index" in ours.columns
    pd.testing.assert_frame_equal(ours.sort_values("row_id").reset_index(drop=True),
                                  feast.sort_values("row_id").reset_index(drop=True))


def test_partitioning_does_not_change_the_result(random_data) -> None:
    """1, 3 or 16 key ranges on Ray (warm join workers, or plain tasks), or the whole join in this process (small
    entity sets skip Ray)."""
    settings, _, entities = random_data
    options = [{"partitions": n} for n in (1, 3, 16)] + [{"ray_min_entity_rows": len(entities) + 1},
                                                          {"warm_workers": 0, "partitions": 3}]
    results = [ray_store(settings, **option).get_historical_features(
        entity_df=entities, features=features_of(ALL_VIEWS)).to_df() for option in options]
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)


def test_join_workers_stay_warm_between_requests(random_data) -> None:
    """Attached to a Ray head that outlives the process, the join runs on named detached workers, created once and
    reused by the next request; a pool of another code version is removed."""
    import ray

    from sales_forecast.ray_offline_store.driver import POOL_NAMESPACE, _actor_class, code_version

    settings, _, entities = random_data
    stale = _actor_class().options(name="pit-join-000000000000-0", namespace=POOL_NAMESPACE, lifetime="detached",
                                   get_if_exists=True, num_cpus=0).remote()
    ray.get(stale.__ray_ready__.remote())

    def pool() -> dict[str, str]:
        named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == POOL_NAMESPACE]
        return {name: ray.get_actor(name, namespace=POOL_NAMESPACE)._actor_id.hex() for name in named}

    store = ray_store(settings, warm_workers=2)
    first = store.get_historical_features(entity_df=entities, features=features_of(ALL_VIEWS)).to_df()
    workers = pool()
    assert set(workers) == {f"pit-join-{code_version()}-{i}" for i in range(2)}
    second = store.get_historical_features(entity_df=entities, features=features_of(ALL_VIEWS)).to_df()
    assert pool() == workers  # the same actors
    pd.testing.assert_frame_equal(first, second)


def test_on_demand_view_is_applied(random_data) -> None:
    settings, _, entities = random_data
    result = ray_store(settings).get_historical_features(
        entity_df=entities, features=["store_stats:temperature", "store_temperature_f:temperature_f"]).to_df()
    assert np.allclose(result["temperature_f"], result["temperature"] * 9 / 5 + 32, equal_nan=True)


def test_edge_cases_by_hand(hand_db: Settings) -> None:
    """ttl bounds are inclusive, the later created row wins a tie, unknown keys and early times get NULL."""
    t0 = BASE
    load_tables(hand_db, {
        "store_rows": pd.DataFrame({
            "store": [1, 1, 1, 2],
            "event_timestamp": [t0, t0 + pd.Timedelta(days=7), t0 + pd.Timedelta(days=7), t0],
            "created": [t0, t0 + pd.Timedelta(days=8), t0 + pd.Timedelta(days=7, hours=1), t0],
            "temperature": [1.0, 2.0, 3.0, 4.0], "visitors": [10, 20, 30, 40]}),
        "dept_rows": pd.DataFrame({"dept": [1], "event_timestamp": [t0 - pd.Timedelta(days=400)],
                                   "dept_index": [0.5]}),
    })
    cases = [  # store, dept, time, expected temperature, expected dept_index
        (1, 1, t0 - pd.Timedelta(seconds=1), np.nan, 0.5),  # before the first row; ttl 0 reaches back a year
        (1, 1, t0, 1.0, 0.5),  # exactly at a row
        (1, 1, t0 + pd.Timedelta(days=3), 1.0, 0.5),  # exactly ttl later: still valid
        (1, 1, t0 + pd.Timedelta(days=3, seconds=1), np.nan, 0.5),  # expired
        (1, 2, t0 + pd.Timedelta(days=7), 2.0, np.nan),  # tie at day 7: created day 8 beats day 7 + 1 h
        (2, 1, t0 + pd.Timedelta(days=1), 4.0, 0.5),
        (3, 1, t0 + pd.Timedelta(days=1), np.nan, 0.5),  # a store without rows
    ]
    entities = pd.DataFrame(cases, columns=["store", "dept", "event_timestamp", "want_t", "want_d"])
    result = ray_store(hand_db).get_historical_features(
        entity_df=entities, features=["store_stats:temperature", "dept_stats:dept_index"]).to_df()
    assert np.allclose(result["temperature"], result["want_t"], equal_nan=True)
    assert np.allclose(result["dept_index"], result["want_d"], equal_nan=True)


def test_empty_entity_set_and_missing_columns(hand_db: Settings) -> None:
    empty = pd.DataFrame({"store": pd.Series([], dtype="int64"),
                          "event_timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})
    result = ray_store(hand_db).get_historical_features(entity_df=empty, features=["store_stats:temperature"]).to_df()
    assert len(result) == 0 and list(result.columns) == ["store", "event_timestamp", "temperature"]
    with pytest.raises(FeastEntityDFMissingColumnsError):
        ray_store(hand_db).get_historical_features(entity_df=empty, features=["dept_stats:dept_index"]).to_df()


def test_yaml_selects_the_store_and_the_rest_is_postgres(hand_db: Settings) -> None:
    """feature_store.yaml's type string loads this store; materialization is Feast's PostgreSQL code path and
    online reads return the latest rows; a date range and created-timestamp filtering run the Ray join."""
    with feast_env(hand_db):
        store = FeatureStore(repo_path=str(RAY_REPO))
    assert isinstance(store._get_provider().offline_store, RayPostgreSQLOfflineStore)
    t0 = BASE
    load_tables(hand_db, {"store_rows": pd.DataFrame({
        "store": [1, 1, 2], "event_timestamp": [t0, t0 + pd.Timedelta(days=7), t0],
        "created": [t0, t0 + pd.Timedelta(days=7), t0], "temperature": [1.0, 2.0, 4.0], "visitors": [1, 2, 4]})})

    store.materialize(start_date=t0 - pd.Timedelta(days=1), end_date=t0 + pd.Timedelta(days=8),
                      feature_views=["store_stats"])
    online = store.get_online_features(features=["store_stats:temperature"],
                                       entity_rows=[{"store": 1}, {"store": 2}]).to_dict()
    assert online["temperature"] == [2.0, 4.0]

    ranged = store.get_historical_features(features=["store_stats:temperature"], start_date=t0.to_pydatetime(),
                                           end_date=(t0 + pd.Timedelta(days=8)).to_pydatetime())
    assert isinstance(ranged, RayPostgreSQLRetrievalJob) and len(ranged.to_df()) == 3
    entities = pd.DataFrame({"store": [1], "event_timestamp": [t0 + pd.Timedelta(days=8)]})
    filtered = store.get_historical_features(entity_df=entities, features=["store_stats:temperature"],
                                             filter_by_created_timestamp=True)
    assert isinstance(filtered, RayPostgreSQLRetrievalJob) and filtered.to_df()["temperature"].tolist() == [2.0]


def test_every_request_runs_the_ray_join(hand_db: Settings) -> None:
    """No request reaches Feast's PostgreSQL join, which glues (1, 12) and (11, 2) together: a date range and
    created-timestamp filtering on a two-key view run on Ray too (their results: test_ray_store_contract.py)."""
    store = ray_store(hand_db)
    t0 = BASE.to_pydatetime()
    ranged = store.get_historical_features(features=["store_dept_stats:sales"], start_date=t0,
                                           end_date=t0 + pd.Timedelta(days=8))
    entities = pd.DataFrame({"store": [1, 11], "dept": [12, 2], "event_timestamp": [BASE, BASE]})
    filtered = store.get_historical_features(entity_df=entities, filter_by_created_timestamp=True,
                                             features=["store_dept_stats:sales", "store_stats:visitors"])
    plain = store.get_historical_features(entity_df=entities, features=["store_dept_stats:sales"])
    assert all(isinstance(job, RayPostgreSQLRetrievalJob) for job in (ranged, filtered, plain))
