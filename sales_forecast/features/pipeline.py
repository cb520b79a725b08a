"""Step 1: generate, derive features, bulk-load, ``feast apply``, materialize with Ray, verify."""

from __future__ import annotations

from dataclasses import dataclass

from sales_forecast import stack
from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_TABLE, RAW_TABLE
from sales_forecast.features import store as fs_ops
from sales_forecast.features.append import record_dataset
from sales_forecast.features.derive import build_features
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.load import load_table
from sales_forecast.timing import PhaseTimer


@dataclass(frozen=True)
class FeatureRunResult:
    rows: int
    series: int
    online_entities: int
    timer: PhaseTimer


def run_feature_pipeline(shape: Shape, settings: Settings, online: bool = True) -> FeatureRunResult:
    """The whole step. ``online=False`` loads the offline store only (the weekly cycle's replay starts weeks in
    the past, older than the feature ttl: nothing of it could be materialized)."""
    timer = PhaseTimer(f"step 1: {shape.stores} stores x {shape.depts} depts x {shape.weeks} weeks")
    with timer.phase("connect PostgreSQL and Ray"):
        settings = stack.ensure_services(settings, ray=True)
        workers = fs_ops.WarmWorkers(settings) if online else None
    with timer.phase("generate data"):
        raw = generate(shape)
        timer.note("generate data", f"{len(raw):,} rows, ending {shape.resolved_end_date()}")
    with timer.phase("derive features"):
        features = build_features(raw)
    latest = features[features["event_timestamp"] == features["event_timestamp"].max()]
    data_end = latest["event_timestamp"].max().to_pydatetime()
    if online:  # before anything is loaded
        with timer.phase("read the feature repo"):
            fs_ops.check_materializable(data_end, fs_ops.repo_feature_ttl(settings.feast_repo_path))
    with timer.phase("bulk load (ADBC)"):
        load_table(settings.postgres, RAW_TABLE, raw, ["store", "dept", "date"])
        count = load_table(settings.postgres, FEATURE_TABLE, features, ["store", "dept", "event_timestamp"])
        record_dataset(settings, shape)
        timer.note("bulk load (ADBC)", f"{RAW_TABLE} + {FEATURE_TABLE}, {count:,} rows each")
    with timer.phase("feast apply"):
        store = fs_ops.open_store(settings)
        applied = fs_ops.apply_definitions(store, settings.feast_repo_path)
        timer.note("feast apply", f"{len(applied)} objects")
    if not online:
        return FeatureRunResult(rows=len(raw), series=len(latest), online_entities=0, timer=timer)
    with timer.phase("materialize (Ray engine)"):
        workers.wait()
        fs_ops.materialize_latest(store, data_end)
    with timer.phase("prune stale series"):
        timer.note("prune stale series", f"{fs_ops.prune_online(settings, latest):,} online rows deleted")
    with timer.phase("verify online store"):
        stats = fs_ops.verify_online(settings, store, latest)
        timer.note("verify online store", f"{stats.entities:,} series stamped {data_end:%Y-%m-%d}")
    return FeatureRunResult(rows=len(raw), series=len(latest), online_entities=stats.entities, timer=timer)
