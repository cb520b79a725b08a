"""The RetrievalJob of a Ray point-in-time join: runs on first use, like Feast's PostgreSQL job."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import SavedDatasetPostgreSQLStorage
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.utils.postgres.connection_utils import df_to_postgres_table
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage, ValidationReference

from sales_forecast.ray_offline_store.connection import conninfo
from sales_forecast.ray_offline_store.entities import EntitySet, load_entities
from sales_forecast.ray_offline_store.execution import Parallelism, run_in_process, run_on_ray
from sales_forecast.ray_offline_store.plan import ViewPlan
from sales_forecast.ray_offline_store.runtime import cluster_cpus, ensure_ray


class RayPostgreSQLRetrievalJob(RetrievalJob):
    def __init__(self, config: RepoConfig, plans: list[ViewPlan], entity_df: pd.DataFrame | str,
                 feature_refs: list[str], full_feature_names: bool,
                 on_demand_feature_views: list[OnDemandFeatureView]):
        self.config = config
        self._plans = plans
        self._entity_df = entity_df
        self._feature_refs = feature_refs
        self._full_feature_names = full_feature_names
        self._on_demand_feature_views = on_demand_feature_views
        self._entities: EntitySet | None = None

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._on_demand_feature_views

    def entities(self) -> EntitySet:
        """The entity set, read once (a SQL entity set is a query on the offline store)."""
        if self._entities is None:
            join_keys = {key for plan in self._plans for key in plan.join_keys}
            self._entities = load_entities(self._entity_df, conninfo(self.config.offline_store), join_keys)
        return self._entities

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        store = self.config.offline_store
        entities, connection = self.entities(), conninfo(store, parallel_query=False)
        if entities.num_rows < store.ray_min_entity_rows:
            return run_in_process(self._plans, entities, connection)
        ensure_ray(store.ray_address, store.ray_conf)
        parallelism = Parallelism(store.partitions, store.rows_per_partition, store.min_rows_per_partition)
        return run_on_ray(self._plans, entities, connection, parallelism.partitions_for(entities.num_rows,
                                                                                        cluster_cpus()))

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas()

    def to_df(self, validation_reference: ValidationReference | None = None,
              timeout: int | None = None) -> pd.DataFrame:
        """Feast's to_df without its trailing reset_index(drop=True): to_pandas already gives a RangeIndex, and
        the reset copies every column (2 s at 6M rows)."""
        return self.to_arrow(validation_reference=validation_reference, timeout=timeout).to_pandas()

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
        assert isinstance(storage, SavedDatasetPostgreSQLStorage)
        df_to_postgres_table(config=self.config.offline_store, df=self.to_df(),
                             table_name=storage.postgres_options._table)
