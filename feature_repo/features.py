"""Feast definitions: one entity (the combined store/dept key), the weekly feature view and its service.

A feature row stamped t describes the week that ended at t and the calendar of week t+1; its label is the
sales of week t+1 (see sales_forecast/features.py). The ttl of 7 days lets a prediction time between two
weekly rows find the earlier one, and nothing older.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, ValueType
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.types import Float64, Int64

# Feast entities have one join key, and its PostgreSQL point-in-time join mixes up (1, 12) and (11, 2)
# when a view has two, so the key is store * 1000 + dept and store/dept stay plain columns.
store_dept = Entity(
    name="store_dept",
    join_keys=["store_dept"],
    value_type=ValueType.INT64,
    description="store * 1000 + dept",
)

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
    entities=[store_dept],
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
    description="Features of the next-week sales model, in model order after store and dept.",
)
