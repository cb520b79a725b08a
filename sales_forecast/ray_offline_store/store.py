"""The offline store: Feast's PostgreSQL store with the point-in-time join of get_historical_features on Ray.

Selected in feature_store.yaml with ``offline_store: type: sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore``
and the PostgreSQL keys of ``type: postgres``. Feast finds the config class by appending ``Config`` to the type
and the store class by dropping it from the config's class name in the config's module, so both live here.

Everything but the entity-based point-in-time join is inherited from PostgreSQLOfflineStore: materialization
reads, pull_latest/pull_all, monitoring, and the cases this join does not cover (no entity set, i.e. a
start/end date range; filter_by_created_timestamp on a view with a created timestamp column).

Those fallbacks are refused for a view with several join keys (MultipleJoinKeysFallbackError): Feast's PostgreSQL
join builds its row id by concatenating the join keys without a separator, so (store 1, dept 12) and (store 11,
dept 2) would share feature rows. The Ray join encodes the keys column by column and has no such problem.
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
from feast.feature_view import FeatureView
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres import (
    PostgreSQLOfflineStore,
    PostgreSQLOfflineStoreConfig,
)
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from pydantic import NonNegativeInt, PositiveInt, StrictStr

from sales_forecast.ray_offline_store.job import RayPostgreSQLRetrievalJob
from sales_forecast.ray_offline_store.plan import plan_views

STORE_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"


class MultipleJoinKeysFallbackError(ValueError):
    """A request the Ray join does not cover, on a view with several join keys: Feast's PostgreSQL join would
    mix up their key pairs, so it is refused rather than silently delegated."""


def multi_key_views(feature_views: list[FeatureView]) -> list[str]:
    """Names of the views keyed by more than one join key."""
    return [view.name for view in feature_views
            if len([c.name for c in view.entity_columns] or view.entities) > 1]


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
            assert isinstance(view.batch_source, PostgreSQLSource)
        if entity_df is None or (filter_by_created_timestamp and any(
                view.batch_source.created_timestamp_column for view in feature_views)):
            if multi := multi_key_views(feature_views):
                case = ("a start/end date range (no entity set)" if entity_df is None
                        else "filter_by_created_timestamp on a view with a created timestamp column")
                raise MultipleJoinKeysFallbackError(
                    f"{case} is not covered by the Ray point-in-time join, and Feast's PostgreSQL join that would "
                    f"serve it glues several join keys together (store 1/dept 12 == store 11/dept 2); refused for "
                    f"feature views with several join keys: {', '.join(multi)}. Pass an entity set (DataFrame or "
                    "SQL) without filter_by_created_timestamp.")
            return PostgreSQLOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project, full_feature_names,
                filter_by_created_timestamp, **kwargs)
        return RayPostgreSQLRetrievalJob(
            config=config,
            plans=plan_views(feature_refs, feature_views, registry, project, full_feature_names),
            entity_df=entity_df,
            feature_refs=feature_refs,
            full_feature_names=full_feature_names,
            on_demand_feature_views=OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry),
        )
