"""A Feast offline store that runs get_historical_features' point-in-time join on Ray, reading PostgreSQL.

feature_store.yaml: ``offline_store: type: sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore`` with
the keys of ``type: postgres`` (see store.py for the Ray keys).

The classes are loaded on first access so that Ray workers, which import the worker modules of this package,
do not pay for importing Feast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayPostgreSQLOfflineStore", "RayPostgreSQLOfflineStoreConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sales_forecast.ray_offline_store import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
