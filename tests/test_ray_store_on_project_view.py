"""The Ray offline store on the project's own feature repo (feature_repo/), whose feature view is keyed by the
design's two entities, store and dept.

- The feature service's training set from the Ray join equals an independent pandas merge_asof oracle (multi-
  column ``by``), for a DataFrame and a SQL entity set, while Feast's own PostgreSQL join returns extra rows for
  the same request (it glues the join keys: store 1/dept 12 == store 11/dept 2), which is why that join must
  never serve this view (the Ray store never uses it, a date range included).
- End to end through step 1's real pipeline, the colliding pair (1, 12) / (11, 2) gets each series' own values
  in the offline training set, in the online store and in the model server's predictions.
"""

from __future__ import annotations

import asyncio
import importlib
from datetime import timedelta

import numpy as np
import pandas as pd
import psycopg
import pytest
from conftest import database_settings

from sales_forecast.config import REPO_ROOT, Settings
from sales_forecast.contract import FEATURE_SERVICE, FEATURE_TABLE, FEATURE_VIEW, MODEL_NAME, RAW_TABLE
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import MODEL_FEATURES, REQUIRED_FEATURES, build_features
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.load import load_table
from sales_forecast.features.store import repo_objects, repo_yaml
from sales_forecast.forecaster import Forecaster
from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob
from sales_forecast.serving.kserve_import import hidden_argv
from sales_forecast.serving.model_source import ModelSource
from sales_forecast.training.dataset import LABEL, TIMESTAMP, fetch_training_frame
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

SHAPE = Shape(stores=12, depts=13, weeks=20, seed=3)  # holds the (1, 12) / (11, 2) pair
RAY_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"
KEY = ["store", "dept"]
COLLIDING = [(1, 12), (11, 2)]  # "112" both, once Feast's PostgreSQL join concatenates the keys
WEEK = pd.Timedelta(days=7)

pytestmark = pytest.mark.usefixtures("own_ray")


def project_config(settings: Settings, offline_type: str):
    """feature_repo/feature_store.yaml for this database, with the given offline store and a local engine."""
    from feast import RepoConfig

    raw = repo_yaml(settings)
    raw["offline_store"]["type"] = offline_type
    if offline_type == RAY_TYPE:
        raw["offline_store"]["partitions"] = 3
    raw["batch_engine"] = {"type": "local"}
    return RepoConfig(repo_path=REPO_ROOT / "feature_repo", **raw)


def feature_store(settings: Settings, offline_type: str = RAY_TYPE):
    from feast import FeatureStore

    return FeatureStore(config=project_config(settings, offline_type))


@pytest.fixture(scope="module")
def project_db(stack_settings: Settings) -> tuple[Settings, pd.DataFrame, pd.DataFrame]:
    settings = database_settings(stack_settings, "ray_project")
    features = build_features(generate(SHAPE))
    load_table(settings.postgres, FEATURE_TABLE, features, [*KEY, "event_timestamp"])
    feature_store(settings).apply(repo_objects(REPO_ROOT / "feature_repo"))
    # prediction times at, between and more than a ttl after the weekly rows
    shifts = [pd.Timedelta(0), pd.Timedelta(days=3), pd.Timedelta(days=8)]
    entities = pd.concat([features[[*KEY, "event_timestamp"]].assign(
        event_timestamp=lambda f, s=shift: f["event_timestamp"] + s) for shift in shifts], ignore_index=True)
    entities = entities.sample(frac=1, random_state=0).reset_index(drop=True)
    load_table(settings.postgres, "entity_rows", entities, KEY)
    return settings, features, entities


def merge_asof_oracle(entities: pd.DataFrame, features: pd.DataFrame, ttl: timedelta) -> pd.DataFrame:
    """Backward as-of join by (store, dept) within the ttl, inclusive; written independently of the store."""
    left = entities.assign(event_timestamp=pd.to_datetime(entities["event_timestamp"], utc=True).dt.as_unit("ns"))
    right = features[[*KEY, "event_timestamp", *MODEL_FEATURES]].assign(
        event_timestamp=lambda f: f["event_timestamp"].dt.as_unit("ns"))
    joined = pd.merge_asof(left.sort_values("event_timestamp"), right.sort_values("event_timestamp"),
                           on="event_timestamp", by=KEY, direction="backward", tolerance=pd.Timedelta(ttl),
                           allow_exact_matches=True)
    return joined.sort_values([*KEY, "event_timestamp"], ignore_index=True)


def in_key_order(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(event_timestamp=pd.to_datetime(frame["event_timestamp"], utc=True).dt.as_unit("ns"))
    return frame.sort_values([*KEY, "event_timestamp"], ignore_index=True)


@pytest.mark.parametrize("entity_kind", ["frame", "sql"])
def test_feature_service_equals_a_merge_asof_oracle(project_db, entity_kind: str) -> None:
    settings, features, entities = project_db
    entity_df = "SELECT store, dept, event_timestamp FROM entity_rows" if entity_kind == "sql" else entities
    store = feature_store(settings)
    view = store.get_feature_view(FEATURE_VIEW)
    assert sorted(view.entities) == ["dept", "store"] and [c.name for c in view.entity_columns] == KEY
    job = store.get_historical_features(entity_df=entity_df, features=store.get_feature_service(FEATURE_SERVICE))
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    got = in_key_order(job.to_df())
    want = merge_asof_oracle(entities, features, view.ttl)

    assert list(got.columns) == [*KEY, "event_timestamp", *MODEL_FEATURES]
    assert len(got) == len(entities)
    pd.testing.assert_frame_equal(got[[*KEY, "event_timestamp"]], want[[*KEY, "event_timestamp"]],
                                  check_dtype=False)
    for column in MODEL_FEATURES:
        a, b = got[column].to_numpy(dtype="float64"), want[column].to_numpy(dtype="float64")
        same = np.isclose(a, b, rtol=1e-12, atol=0.0) | (np.isnan(a) & np.isnan(b))
        assert same.all(), f"{column} differs at rows {np.flatnonzero(~same)[:5].tolist()}"
    # found rows, lags that are NULL in a series' first weeks, and nothing found a ttl after the last row
    assert got[REQUIRED_FEATURES].notna().all(axis=1).any() and got["sales_lag_4"].isna().any()
    assert got.loc[got["event_timestamp"] > features["event_timestamp"].max() + view.ttl, "sales_lag_1"].isna().all()


def test_feast_postgres_join_would_return_extra_rows(project_db) -> None:
    """Why the project's view must never reach Feast's PostgreSQL join: on the same request it returns more rows
    than entity rows (the glued key matches (1, 12) with (11, 2)). The Ray store never uses it: a date range is
    the Ray join too, one row per series and week."""
    settings, features, entities = project_db
    pg_store = feature_store(settings, "postgres")
    # the colliding pair's rows only: Feast's join of all 9,360 rows takes about 45 s
    pair = entities[pd.MultiIndex.from_frame(entities[KEY]).isin(COLLIDING)]
    theirs = pg_store.get_historical_features(
        entity_df=pair, features=pg_store.get_feature_service(FEATURE_SERVICE)).to_df()
    assert len(theirs) > len(pair), "Feast's PostgreSQL join no longer glues (1, 12) and (11, 2): recheck"

    ray_store = feature_store(settings)
    last = features["event_timestamp"].max()
    job = ray_store.get_historical_features(features=ray_store.get_feature_service(FEATURE_SERVICE),
                                            start_date=(last - timedelta(days=28)).to_pydatetime(),
                                            end_date=last.to_pydatetime())
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    ranged = job.to_df()
    in_range = features[features["event_timestamp"] >= last - timedelta(days=28)]
    assert len(ranged) == len(in_range) and not ranged.duplicated(["store", "dept", "event_timestamp"]).any()
    got = ranged.set_index(["store", "dept", "event_timestamp"]).sort_index()["sales_lag_1"]
    want = in_range.assign(event_timestamp=in_range["event_timestamp"].dt.tz_convert(None)).set_index(
        ["store", "dept", "event_timestamp"]).sort_index()["sales_lag_1"]
    np.testing.assert_allclose(got.to_numpy(dtype="float64"), want.to_numpy(dtype="float64"))


def _raw_sales(settings: Settings) -> pd.Series:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        rows = conn.execute(f'SELECT store, dept, date, weekly_sales FROM "{RAW_TABLE}"').fetchall()
    raw = pd.DataFrame(rows, columns=[*KEY, "date", "weekly_sales"])
    raw["date"] = pd.to_datetime(raw["date"]).dt.tz_localize("UTC")
    return raw.set_index([*KEY, "date"])["weekly_sales"].astype("float64")


def test_colliding_pair_gets_its_own_values_end_to_end(small_features, tmp_path) -> None:
    """Step 1's real pipeline (two entities): the pair (1, 12) / (11, 2) keeps apart in the offline training
    set, the online store and the model server's predictions."""
    settings, _ = small_features
    sales = _raw_sales(settings)
    store = fs_ops.open_store(settings)

    # offline training set: each row's lag and label are its own series' sales of weeks t and t+1
    frame, _ = fetch_training_frame(store, settings.postgres)
    pair = frame[pd.MultiIndex.from_frame(frame[KEY]).isin(COLLIDING)]
    assert {tuple(k) for k in pair[KEY].drop_duplicates().itertuples(index=False)} == set(COLLIDING)
    assert not pair.duplicated([*KEY, TIMESTAMP]).any()
    own_lag = sales.loc[list(zip(pair["store"], pair["dept"], pair[TIMESTAMP], strict=True))].to_numpy()
    own_label = sales.loc[list(zip(pair["store"], pair["dept"], pair[TIMESTAMP] + WEEK, strict=True))].to_numpy()
    np.testing.assert_allclose(pair["sales_lag_1"], own_lag, rtol=1e-12)
    np.testing.assert_allclose(pair[LABEL], own_label, rtol=1e-12)
    lag_1 = pair.pivot(index=TIMESTAMP, columns=KEY, values="sales_lag_1")
    assert len(lag_1) >= 4 and (lag_1.iloc[:, 0] != lag_1.iloc[:, 1]).all()

    # online store: the latest offline row of each series
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{FEATURE_TABLE}" WHERE event_timestamp = '
                    f'(SELECT max(event_timestamp) FROM "{FEATURE_TABLE}")')
        latest = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
    latest[MODEL_FEATURES] = latest[MODEL_FEATURES].astype("float64")
    latest = latest.set_index(KEY, drop=False).loc[COLLIDING]
    online = fs_ops.online_features(store, COLLIDING)
    assert list(zip(online["store"], online["dept"], strict=True)) == COLLIDING
    np.testing.assert_allclose(online[MODEL_FEATURES].to_numpy(dtype="float64"),
                               latest[MODEL_FEATURES].to_numpy(), rtol=1e-12)
    assert online.loc[0, "sales_lag_1"] != online.loc[1, "sales_lag_1"]

    # model server (its own code path in-process): each series is predicted from its own online row
    forecaster = fit_quick_forecaster(labelled_rows(settings), epochs=5)
    bundle = tmp_path / "bundle"
    forecaster.save(bundle)
    with hidden_argv():
        serving_model = importlib.import_module("sales_forecast.serving.model")
    model = serving_model.SalesModel(MODEL_NAME, settings, ModelSource(model_dir=bundle))
    assert model.load() and model.ready
    payload = asyncio.run(model.preprocess({"instances": [{"store": s, "dept": d} for s, d in COLLIDING]}))
    served = model.predict(payload)["predictions"]
    np.testing.assert_allclose(served, Forecaster.load(bundle).predict(latest.reset_index(drop=True)), rtol=1e-6)
    assert served[0] != pytest.approx(served[1], rel=1e-3)
