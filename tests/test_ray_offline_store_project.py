"""The Ray offline store on the project's own feature repo (feature_repo/): same training set as Feast's
PostgreSQL join through the feature service, and the same features through a (store, dept) two-entity view,
where Feast's PostgreSQL join returns extra rows."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, database_settings
from feast import Entity, FeatureStore, FeatureView, Field, RepoConfig, ValueType
from feast.types import Float64

from sales_forecast.config import FEATURE_SERVICE, FEATURE_TABLE, Settings
from sales_forecast.data import Shape, generate
from sales_forecast.feature_store import repo_objects
from sales_forecast.features import MODEL_FEATURES, build_features
from sales_forecast.loading import load_table
from sales_forecast.ray_offline_store.job import RayPostgreSQLRetrievalJob

SHAPE = Shape(stores=12, depts=13, weeks=20, seed=3)  # holds the (1, 12) / (11, 2) pair
RAY_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"


def project_config(settings: Settings, offline_type: str) -> RepoConfig:
    """feature_repo/feature_store.yaml for this database, with the given offline store and a local engine."""
    saved = dict(os.environ)
    os.environ.update(settings.postgres.feast_env())
    try:
        raw = yaml.safe_load(os.path.expandvars((REPO_ROOT / "feature_repo" / "feature_store.yaml").read_text()))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    raw["offline_store"]["type"] = offline_type
    if offline_type == RAY_TYPE:
        raw["offline_store"]["partitions"] = 3
    raw["batch_engine"] = {"type": "local"}
    return RepoConfig(repo_path=REPO_ROOT / "feature_repo", **raw)


def two_entity_view(source) -> list:
    store = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64)
    dept = Entity(name="dept", join_keys=["dept"], value_type=ValueType.INT64)
    view = FeatureView(name="sales_by_store_dept", entities=[store, dept], ttl=timedelta(days=7),
                       schema=[Field(name=name, dtype=Float64) for name in MODEL_FEATURES], source=source)
    return [store, dept, view]


@pytest.fixture(scope="module", autouse=True)
def own_ray() -> Iterator[None]:
    """Stop the local Ray these tests start, so it does not idle beside later tests in the session."""
    import ray

    started_here = not ray.is_initialized()
    yield
    if started_here and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def project_db(stack_settings: Settings) -> tuple[Settings, pd.DataFrame]:
    settings = database_settings(stack_settings, "ray_project")
    features = build_features(generate(SHAPE))
    load_table(settings.postgres, FEATURE_TABLE, features, ["store_dept", "event_timestamp"])
    objects = repo_objects(REPO_ROOT / "feature_repo")
    source = next(obj for obj in objects if obj.name == "sales_features_source")
    FeatureStore(config=project_config(settings, RAY_TYPE)).apply(objects + two_entity_view(source))
    # prediction times at, between and more than a ttl after the weekly rows
    shifts = [pd.Timedelta(0), pd.Timedelta(days=3), pd.Timedelta(days=8)]
    entities = pd.concat([features[["store_dept", "store", "dept", "event_timestamp"]].assign(
        event_timestamp=lambda f, s=shift: f["event_timestamp"] + s) for shift in shifts], ignore_index=True)
    entities = entities.sample(frac=1, random_state=0).reset_index(drop=True)
    load_table(settings.postgres, "entity_rows", entities, ["store_dept"])
    return settings, entities


@pytest.mark.parametrize("entity_kind", ["frame", "sql"])
def test_feature_service_equals_feast_postgres(project_db, entity_kind: str) -> None:
    settings, entities = project_db
    entity_df = "SELECT store_dept, event_timestamp FROM entity_rows" if entity_kind == "sql" \
        else entities[["store_dept", "event_timestamp"]]
    ray_store = FeatureStore(config=project_config(settings, RAY_TYPE))
    service = ray_store.get_feature_service(FEATURE_SERVICE)
    job = ray_store.get_historical_features(entity_df=entity_df, features=service)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    ours = job.to_df()
    pg_store = FeatureStore(config=project_config(settings, "postgres"))
    theirs = pg_store.get_historical_features(entity_df=entity_df,
                                              features=pg_store.get_feature_service(FEATURE_SERVICE)).to_df()
    assert len(ours) == len(entities) and ours.notna().all(axis=1).any() and ours["sales_lag_1"].isna().any()
    by = ["store_dept", "event_timestamp"]
    pd.testing.assert_frame_equal(ours.sort_values(by).reset_index(drop=True),
                                  theirs.sort_values(by).reset_index(drop=True))


def test_two_entity_view_gives_the_single_key_features(project_db) -> None:
    settings, entities = project_db
    store = FeatureStore(config=project_config(settings, RAY_TYPE))
    single = store.get_historical_features(
        entity_df=entities, features=[f"sales_features:{name}" for name in MODEL_FEATURES]).to_df()
    pair = store.get_historical_features(
        entity_df=entities, features=[f"sales_by_store_dept:{name}" for name in MODEL_FEATURES]).to_df()
    pd.testing.assert_frame_equal(single, pair)

    pg_store = FeatureStore(config=project_config(settings, "postgres"))
    theirs = pg_store.get_historical_features(
        entity_df=entities, features=[f"sales_by_store_dept:{name}" for name in MODEL_FEATURES]).to_df()
    assert len(theirs) > len(entities), "Feast's PostgreSQL join no longer glues (1, 12) and (11, 2): recheck"
