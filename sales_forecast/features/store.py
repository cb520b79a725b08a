"""Feast operations on the project's feature repo: open, apply, materialize, verify the online store."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import importlib.util
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psycopg
import yaml

from sales_forecast.config import Settings, apply_to_environment
from sales_forecast.contract import ENTITY_KEYS, FEAST_PROJECT, FEATURE_SERVICE, FEATURE_VIEW
from sales_forecast.errors import PipelineError
from sales_forecast.features.child import RARE_COLLECTIONS


@contextlib.contextmanager
def collecting_rarely() -> Iterator[None]:
    """Python's cyclic garbage collector, run rarely for a while: importing Feast creates millions of objects that
    live as long as the process (typeguard recompiles its classes' methods, torch loads), and every full collection
    walks all of them again (1.1-1.5 s of the import's 5.5-6.5 s of CPU). The usual pace returns afterwards."""
    thresholds = gc.get_threshold()
    gc.set_threshold(*RARE_COLLECTIONS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def open_store(settings: Settings):
    """The feature repo's FeatureStore, with ``settings`` put into os.environ for Feast's ${VAR} expansion."""
    from feast import FeatureStore

    apply_to_environment(settings)
    return FeatureStore(repo_path=str(settings.feast_repo_path))


def repo_yaml(settings: Settings) -> dict:
    """feature_store.yaml as a dict, its ${VAR}s expanded for ``settings`` (os.environ is left alone)."""
    text = (settings.feast_repo_path / "feature_store.yaml").read_text()
    return yaml.safe_load(string.Template(text).safe_substitute({**os.environ, **settings.environment()}))


def repo_objects(repo_path: Path) -> list:
    """The Feast objects defined in the repo's Python files (``feast apply`` reads them the same way,
    but only from the current directory)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, FeatureService)
    found: dict[tuple[str, str], object] = {}
    for path in sorted(repo_path.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"feature_repo_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, kinds):
                found[(type(value).__name__, value.name)] = value
    return list(found.values())


def apply_objects(store, objects: list) -> list[str]:
    """Apply Feast objects (``feast apply`` without deletes); returns their kinds and names."""
    store.apply(objects)
    return sorted(f"{type(obj).__name__}:{obj.name}" for obj in objects)


def apply_definitions(store, repo_path: Path) -> list[str]:
    """Apply every Feast object defined in the feature repo."""
    return apply_objects(store, repo_objects(repo_path))


def feature_ttl(store) -> dt.timedelta:
    return store.get_feature_view(FEATURE_VIEW).ttl


def defined_feature_ttl(objects: list, repo_path: Path) -> dt.timedelta:
    """The ttl of the feature view among the repo's objects, known before anything is applied."""
    from feast import FeatureView

    views = [obj for obj in objects if isinstance(obj, FeatureView) and obj.name == FEATURE_VIEW]
    if not views:
        raise PipelineError(f"feature view {FEATURE_VIEW!r} is not defined in {repo_path}")
    return views[0].ttl


def repo_feature_ttl(repo_path: Path) -> dt.timedelta:
    """The ttl the feature repo defines, read before anything is applied."""
    return defined_feature_ttl(repo_objects(repo_path), repo_path)


def store_classes(settings: Settings) -> list[str]:
    """The repo's plugin stores (``type: package.module.Class``), which Feast imports wherever it builds the stores
    from the repo config (the engine's write task does, in a Ray worker)."""
    config = repo_yaml(settings)
    return [name for name in (config.get(kind, {}).get("type", "") for kind in ("offline_store", "online_store"))
            if "." in name]


def _import_materialization_modules(store_types: list[str]) -> int:
    with collecting_rarely():
        import feast.infra.compute_engines.ray.nodes  # noqa: F401  what the engine's Ray tasks import first

        for store_type in store_types:
            module, name = store_type.rsplit(".", 1)
            getattr(importlib.import_module(module), name)
    # This worker lives for this driver's materialization: later collections need not walk what the import made
    # (measured on Feast's conversion of 370K values to protos in the write, which a batch ArrowRows does not encode
    # still takes: 1.1 s with, 0.55 s without).
    gc.freeze()
    return os.getpid()


def write_tasks(settings: Settings, series: int) -> int:
    """How many of the Ray engine's online writes run at once for ``series`` latest rows (the offline store's
    ``LatestRowsJob`` blocks)."""
    from sales_forecast.ray_offline_store.driver import write_blocks, write_concurrency

    config = repo_yaml(settings)
    engine = config.get("batch_engine")
    return write_blocks(series, (config.get("materialization") or {}).get("online_write_batch_size"),
                        write_concurrency(engine if isinstance(engine, dict) else {}))


class WarmWorkers:
    """Ray workers of this driver started, with Feast imported, while the data is still being generated and
    loaded. Ray reuses an idle worker of the same job for the engine's tasks, so materialization does not wait for
    a worker process to start and import Feast (about 10 s of a 17 s materialization on a busy 2-CPU machine).

    One per write task that will run at once (``write_tasks``): the default shape's 11,583 series are one block,
    whose filter, dedup and write run as one task after another; a second worker would only import Feast (5-6 s
    of CPU) for nothing.
    """

    def __init__(self, settings: Settings, series: int):
        self.pending: list = []
        if not settings.ray_address:  # a Ray inside the process (FEAST_RAY_EXECUTION_MODE=local): nothing to warm
            return
        import ray

        # Feast's engine initializes Ray with ignore_reinit_error, so it keeps this connection.
        ray.init(address=settings.ray_address, ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        # Submitted before this process imports Feast (write_tasks does not), so the workers' imports overlap this
        # one's. After it, a worker was still importing when the materialization began: 8 s of a 14 s one.
        warm, stores = ray.remote(num_cpus=1)(_import_materialization_modules), store_classes(settings)
        self.pending = [warm.remote(stores) for _ in range(write_tasks(settings, series))]

    def wait(self, timeout: float = 60.0) -> None:
        """Until the workers are up (a failure here is the engine's to report, with its own message)."""
        if self.pending:
            import ray

            ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout)
            self.pending = []


def materialize_latest(store, data_end: dt.datetime) -> None:
    """Materialize the latest row of every series into the online store.

    Feast's Ray engine keeps only rows newer than (now - ttl), whatever the window, so the data must end
    within ttl of now; ``check_materializable`` says so before any work starts.
    """
    now = dt.datetime.now(dt.UTC)
    start = data_end - feature_ttl(store)
    store.materialize(start_date=start, end_date=max(now, data_end + dt.timedelta(seconds=1)),
                      feature_views=[FEATURE_VIEW])


def check_materializable(data_end: dt.datetime, ttl: dt.timedelta) -> None:
    now = dt.datetime.now(dt.UTC)
    if data_end < now - ttl:
        raise PipelineError(
            f"the data ends {data_end:%Y-%m-%d}, more than the feature ttl ({ttl.days} days) before now; "
            "Feast's Ray engine would materialize nothing. End the data on a recent week (the default).")


def online_table() -> str:
    return f"{FEAST_PROJECT}_{FEATURE_VIEW}"


@dataclass(frozen=True)
class OnlineStats:
    entities: int
    rows: int
    oldest: dt.datetime | None
    newest: dt.datetime | None


def online_stats(settings: Settings) -> OnlineStats:
    query = (f'SELECT count(DISTINCT entity_key), count(*), min(event_ts), max(event_ts) '
             f'FROM "{online_table()}"')
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        entities, rows, oldest, newest = conn.execute(query).fetchone()
    return OnlineStats(entities, rows, oldest, newest)


def online_features(store, series: list[tuple[int, int]]) -> pd.DataFrame:
    """The feature service's online values of each (store, dept), in order, with store and dept columns."""
    service = store.get_feature_service(FEATURE_SERVICE)
    rows = [{"store": int(s), "dept": int(d)} for s, d in series]
    return store.get_online_features(features=service, entity_rows=rows).to_df()


def series_key(store: int, dept: int) -> bytes:
    """A series' key as Feast's PostgreSQL online store writes it (entity_key_serialization_version 3)."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    values = [Value(int64_val=int(store)), Value(int64_val=int(dept))]
    key = EntityKey(join_keys=list(ENTITY_KEYS), entity_values=values)
    return serialize_entity_key(key, entity_key_serialization_version=3)


def prune_online(settings: Settings, latest: pd.DataFrame) -> int:
    """Delete online rows of series the data no longer has (a smaller shape, an older key layout).

    Materialization only upserts, so without this a re-run with fewer series would keep serving the others.
    Returns the number of rows deleted.
    """
    keys = [series_key(s, d) for s, d in latest[["store", "dept"]].drop_duplicates().itertuples(index=False)]
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        deleted = conn.execute(f'DELETE FROM "{online_table()}" WHERE NOT (entity_key = ANY(%s))', [keys]).rowcount
    return deleted


def verify_online(settings: Settings, store, latest: pd.DataFrame, sample: int = 200) -> OnlineStats:
    """Fail unless the online store holds exactly one current row per series, with the expected values.

    The Ray engine drops old rows and swallows write errors while reporting success, so this is the check
    that materialization really happened.
    """
    stats = online_stats(settings)
    expected_entities = len(latest[["store", "dept"]].drop_duplicates())
    data_end = latest["event_timestamp"].max().to_pydatetime()
    if stats.entities != expected_entities:
        raise PipelineError(f"online store holds {stats.entities} series, expected {expected_entities}: "
                            "materialization lost rows (Ray engine ttl filter or a swallowed write error)")
    if stats.oldest != data_end or stats.newest != data_end:
        raise PipelineError(f"online rows are stamped {stats.oldest} to {stats.newest}, expected {data_end}")
    picked = latest.sample(n=min(sample, len(latest)), random_state=0)
    online = online_features(store, list(zip(picked["store"], picked["dept"], strict=True)))
    columns = [c for c in picked.columns if c != "event_timestamp"]
    got = online[columns].reset_index(drop=True).astype("float64")
    want = picked[columns].reset_index(drop=True).astype("float64")
    mismatched = ~(((got - want).abs() <= 1e-9 * want.abs().clip(lower=1.0)) | (got.isna() & want.isna()))
    if mismatched.to_numpy().any():
        keys = picked[["store", "dept"]].reset_index(drop=True)[mismatched.any(axis=1)].head(5)
        bad = ", ".join(f"store {s} dept {d}" for s, d in keys.itertuples(index=False))
        raise PipelineError(f"online values differ from the latest feature rows for {bad}")
    return stats
