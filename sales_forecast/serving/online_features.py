"""The online feature lookup: Feast ``get_online_features`` through the training feature service.

Feature rows come back in request order as a DataFrame with the model's feature columns, which
``Forecaster.inputs`` turns into the network's matrix exactly as in training. Instances without a complete row
fresher than the feature view's ttl are refused (404), never filled in.

Faults: Feast's PostgreSQL online store caches its connection (``conn_type: singleton``, which the server
always uses) or a pool, and never replaces a broken one: after a PostgreSQL restart every read fails, and in pool
mode each failed read also leaks a connection until reads hang. So on a database error the lookup drops the
store's cached connection (and pool), retries once when the failure came from a cached connection (a restart
while we were idle), and otherwise answers 503; the next request connects afresh, so the server heals once
PostgreSQL is back.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import sqlalchemy.exc

from sales_forecast.config import Settings, apply_to_environment
from sales_forecast.contract import FEATURE_SERVICE, FEATURE_VIEW
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.serving.http_errors import FeaturesUnavailable, UnknownEntities
from sales_forecast.serving.instances import Instance
from sales_forecast.serving.metrics import FEATURE_STORE_RECONNECTS

TIMESTAMP_SUFFIX = "__ts"  # feast.online_response.TIMESTAMP_POSTFIX
DATABASE_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, sqlalchemy.exc.SQLAlchemyError)
LISTED_KEYS = 20  # instances named in a 404 message; the body lists them all


def open_serving_store(settings: Settings) -> Any:
    """The feature repo's FeatureStore, with the PostgreSQL online store in singleton mode whatever the yaml says.

    In pool mode an outage costs more than the leak: each read waits for the pool's 30 s getconn timeout instead
    of failing at once. One connection, reset after errors, answers an outage immediately and serializes reads of
    about a millisecond, which is plenty for this server.
    """
    from feast import FeatureStore
    from feast.infra.utils.postgres.postgres_config import ConnectionType
    from feast.repo_config import load_repo_config

    apply_to_environment(settings)
    repo = settings.feast_repo_path
    config = load_repo_config(repo, repo / "feature_store.yaml")
    if config.online_store.type == "postgres":
        config.online_store.conn_type = ConnectionType.singleton
    return FeatureStore(repo_path=str(repo), config=config)


class OnlineFeatureLookup:
    def __init__(self, store: Any, features: Sequence[str], where: str):
        self.store = store
        self.service = store.get_feature_service(FEATURE_SERVICE)
        self.ttl: dt.timedelta | None = store.get_feature_view(FEATURE_VIEW).ttl or None
        self.features = list(features)
        self.where = where
        self._reset_lock = threading.Lock()
        served = {f.name for projection in self.service.feature_view_projections for f in projection.features}
        missing = [name for name in self.features if name not in served]
        if missing:
            raise PipelineError(f"the model needs features that feature service {FEATURE_SERVICE} lacks: {missing}")

    @classmethod
    def open(cls, settings: Settings, features: Sequence[str]) -> OnlineFeatureLookup:
        pg = settings.postgres
        return cls(open_serving_store(settings), features, where=f"{pg.host}:{pg.port}/{pg.database}")

    def rows(self, instances: Sequence[Instance]) -> pd.DataFrame:
        """The model's features (columns) of each instance (rows, in order); UnknownEntities unless all are
        complete and fresher than the ttl."""
        values = self._read([instance.as_dict() for instance in instances])  # entity rows {"store", "dept"}
        columns = {name: np.asarray([np.nan if v is None else v for v in values[name]], dtype="float64")
                   for name in self.features}
        frame = pd.DataFrame(columns)
        self._check_complete(instances, frame, values)
        return frame

    def _read(self, entity_rows: list[dict[str, int]]) -> dict[str, list]:
        for attempt in (1, 2):
            had_connection = self._has_cached_connection()
            try:
                response = self.store.get_online_features(features=self.service, entity_rows=entity_rows)
                return response.to_dict(include_event_timestamps=True)
            except DATABASE_ERRORS as exc:
                self.reset_connection()
                if attempt == 2 or not had_connection:
                    raise FeaturesUnavailable(
                        f"the online feature store (PostgreSQL at {self.where}) is unavailable: {first_line(exc)}; "
                        "retry shortly") from exc
        raise AssertionError("unreachable")

    def _check_complete(self, instances: Sequence[Instance], frame: pd.DataFrame, values: dict[str, list]) -> None:
        incomplete = ~np.isfinite(frame.to_numpy()).all(axis=1)
        stamps = np.asarray(values[f"{self.features[0]}{TIMESTAMP_SUFFIX}"], dtype="float64")
        stale = ~incomplete & self._too_old(stamps)
        if not (incomplete.any() or stale.any()):
            return
        missing = [{**instances[i].as_dict(), "index": int(i), "reason": "older than the ttl" if stale[i]
                    else "no online features"} for i in np.flatnonzero(incomplete | stale)]
        named = ", ".join(f"store {m['store']} dept {m['dept']}" for m in missing[:LISTED_KEYS])
        more = f" and {len(missing) - LISTED_KEYS} more" if len(missing) > LISTED_KEYS else ""
        ttl = f"; rows older than the feature ttl ({_duration(self.ttl)}) count as missing" if self.ttl else ""
        raise UnknownEntities(f"no current online features for {len(missing)} of {len(instances)} instances: "
                              f"{named}{more}{ttl}", missing=missing)

    def _too_old(self, stamps: np.ndarray) -> np.ndarray:
        if self.ttl is None:
            return np.zeros(len(stamps), dtype=bool)
        return stamps < time.time() - self.ttl.total_seconds()

    def _online_store(self) -> Any:
        return self.store._get_provider().online_store

    def _has_cached_connection(self) -> bool:
        online = self._online_store()
        return getattr(online, "_conn", None) is not None or getattr(online, "_conn_pool", None) is not None

    def reset_connection(self) -> None:
        """Drop the online store's cached connection and pool (private attributes of Feast 0.67's
        PostgreSQLOnlineStore); its next read connects afresh."""
        with self._reset_lock:
            online = self._online_store()
            conn, pool = getattr(online, "_conn", None), getattr(online, "_conn_pool", None)
            online._conn, online._conn_pool = None, None
        if conn is not None:
            FEATURE_STORE_RECONNECTS.inc()
            conn.close()
        if pool is not None:
            FEATURE_STORE_RECONNECTS.inc()
            pool.close(timeout=0)


def _duration(delta: dt.timedelta) -> str:
    return f"{delta.days} days" if delta == dt.timedelta(days=delta.days) else str(delta)
