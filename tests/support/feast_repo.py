"""Feast stores on a test database for the Ray offline store's tests: the fixture repo's feature_store.yaml with
the offline store swapped (the Ray store or Feast's own ``postgres``), and the objects of a definitions file."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sales_forecast.config import REPO_ROOT, Settings
from sales_forecast.features.load import load_table

RAY_REPO = REPO_ROOT / "tests" / "fixtures" / "ray_repo"
RAY_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"


def ray_only_keys() -> set[str]:
    """The Ray store's own options, which Feast's PostgreSQL store refuses."""
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres import PostgreSQLOfflineStoreConfig

    from sales_forecast.ray_offline_store.store import RayPostgreSQLOfflineStoreConfig

    return set(RayPostgreSQLOfflineStoreConfig.model_fields) - set(PostgreSQLOfflineStoreConfig.model_fields)


@contextmanager
def feast_env(settings: Settings) -> Iterator[None]:
    """os.environ with ``settings``' variables (Feast expands ${VAR} in feature_store.yaml), restored after."""
    saved = dict(os.environ)
    os.environ.update(settings.environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def repo_config(settings: Settings, project: str | None = None, coerce_tz_aware: bool | None = None,
                sections: dict[str, Any] | None = None, **offline: Any):
    """The fixture repo's feature_store.yaml for ``settings``' database, with offline_store keys overridden (e.g.
    ``type="postgres"``: Feast's own store, which rejects the Ray keys, so they are dropped for it) and the keys
    of other top-level sections (``sections``: e.g. online_store, batch_engine, materialization)."""
    from feast import RepoConfig

    with feast_env(settings):
        raw = yaml.safe_load(os.path.expandvars((RAY_REPO / "feature_store.yaml").read_text()))
    raw["offline_store"].update(offline)
    if raw["offline_store"]["type"] == "postgres":
        for key in ray_only_keys():
            raw["offline_store"].pop(key, None)
    for name, keys in (sections or {}).items():
        raw[name] = {**(raw.get(name) or {}), **keys}
    if project:
        raw["project"] = project
    if coerce_tz_aware is not None:
        raw["coerce_tz_aware"] = coerce_tz_aware
    return RepoConfig(repo_path=RAY_REPO, **raw)


def feature_store(settings: Settings, **options: Any):
    from feast import FeatureStore

    return FeatureStore(config=repo_config(settings, **options))


def postgres_store(settings: Settings, **options: Any):
    """Feast's own PostgreSQL offline store on the same registry and database."""
    return feature_store(settings, type="postgres", **options)


def definitions(path: Path) -> list:
    """The Feast objects a definitions file defines (what ``feast apply`` would apply)."""
    from feast import Entity, FeatureService
    from feast.base_feature_view import BaseFeatureView
    from feast.data_source import DataSource

    spec = importlib.util.spec_from_file_location(f"definitions_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, DataSource, BaseFeatureView, FeatureService)
    return [value for value in vars(module).values() if isinstance(value, kinds)]


def load_tables(settings: Settings, tables: dict[str, pd.DataFrame]) -> None:
    """Replace each table with its frame, indexed on its key columns and event timestamp when it has them."""
    for name, frame in tables.items():
        keys = [c for c in ("store", "dept", "region") if c in frame.columns]
        index = [*keys, "event_timestamp"] if "event_timestamp" in frame.columns else keys or list(frame.columns[:1])
        load_table(settings.postgres, name, frame, index)
