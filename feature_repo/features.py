"""Feast definitions: the two entities store and dept, the weekly feature view keyed by both, and its service.

A feature row stamped t describes the week that ended at t and the calendar of week t+1; its label is the
sales of week t+1 (see sales_forecast/features/derive.py). The ttl of 7 days lets a prediction time between two
weekly rows find the earlier one, and nothing older.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, ValueType
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.types import Float64, Int64

from sales_forecast.contract import FEATURE_SERVICE, FEATURE_TABLE, FEATURE_VIEW
from sales_forecast.features.derive import MODEL_FEATURES

# A series is (store, dept). Feast's own PostgreSQL point-in-time join glues two join keys without a separator
# ((1, 12) and (11, 2) collide), but this project's offline store (sales_forecast.ray_offline_store, selected in
# feature_store.yaml) joins on Ray and encodes the keys column by column, and refuses to fall back to Feast's
# join for a view with several join keys; the online store serializes each key separately.
store = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64, description="store id")
dept = Entity(name="dept", join_keys=["dept"], value_type=ValueType.INT64, description="department id")

sales_features_source = PostgreSQLSource(
    name="sales_features_source",
    table=FEATURE_TABLE,
    timestamp_field="event_timestamp",
)

sales_features = FeatureView(
    name=FEATURE_VIEW,
    entities=[store, dept],
    ttl=timedelta(days=7),
    schema=[Field(name="store", dtype=Int64), Field(name="dept", dtype=Int64)]
    + [Field(name=name, dtype=Float64) for name in MODEL_FEATURES],
    source=sales_features_source,
    online=True,
    tags={"cadence": "weekly"},
)

sales_forecast_v1 = FeatureService(
    name=FEATURE_SERVICE,
    features=[sales_features],
    description="Features of the next-week sales model, in model order.",
)
