"""A Feast offline store that runs get_historical_features' point-in-time join on Ray, reading PostgreSQL.

feature_store.yaml: ``offline_store: type: sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore`` with
the keys of ``type: postgres`` (see store.py for the Ray keys).

- store.py: everything that speaks Feast (config, store, retrieval job, per-view plans, the entity set);
- driver.py: partitioning, the pushed-down SQL, Ray, reassembly (the process that calls Feast);
- worker.py: the read and the as-of join of one partition (what Ray workers import: no Feast, no pandas).

The classes are loaded on first access so that Ray workers, which import worker.py through this package,
do not pay for importing Feast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayPostgreSQLOfflineStore", "RayPostgreSQLOfflineStoreConfig", "RayPostgreSQLRetrievalJob"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sales_forecast.ray_offline_store import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
