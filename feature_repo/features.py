"""Feast definitions: the two entities store and dept, the weekly feature view keyed by both, and its service.

A feature row stamped t describes the week that ended at t and the calendar of week t+1; its label is the
sales of week t+1 (see sales_forecast/features.py). The ttl of 7 days lets a prediction time between two
weekly rows find the earlier one, and nothing older.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, ValueType
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.types import Float64, Int64

# A series is (store, dept). Feast's own PostgreSQL point-in-time join glues two join keys without a separator
# ((1, 12) and (11, 2) collide), but this project's offline store (sales_forecast.ray_offline_store, selected in
# feature_store.yaml) joins on Ray and encodes the keys column by column, and refuses to fall back to Feast's
# join for a view with several join keys; the online store serializes each key separately.
store = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64, description="store id")
dept = Entity(name="dept", join_keys=["dept"], value_type=ValueType.INT64, description="department id")

sales_features_source = PostgreSQLSource(
    name="sales_features_source",
    table="sales_features",
    timestamp_field="event_timestamp",
)

FEATURES = [
    "sales_lag_1",
    "sales_lag_2",
    "sales_lag_3",
    "sales_lag_4",
    "sales_mean_4",
    "sales_std_4",
    "lag_1_is_holiday",
    "target_is_holiday",
    "target_week_sin",
    "target_week_cos",
    "temperature",
    "fuel_price",
    "cpi",
    "unemployment",
]

sales_features = FeatureView(
    name="sales_features",
    entities=[store, dept],
    ttl=timedelta(days=7),
    schema=[Field(name="store", dtype=Int64), Field(name="dept", dtype=Int64)]
    + [Field(name=name, dtype=Float64) for name in FEATURES],
    source=sales_features_source,
    online=True,
    tags={"cadence": "weekly"},
)

sales_forecast_v1 = FeatureService(
    name="sales_forecast_v1",
    features=[sales_features],
    description="Features of the next-week sales model, in model order.",
)
