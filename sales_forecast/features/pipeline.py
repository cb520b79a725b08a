"""Step 1: generate, derive features, bulk-load, ``feast apply``, materialize with Ray, verify."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from sales_forecast import stack
from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_TABLE, RAW_TABLE
from sales_forecast.features import store as fs_ops
from sales_forecast.features.append import record_dataset
from sales_forecast.features.generator import Shape
from sales_forecast.features.staging import OfflineLoad
from sales_forecast.timing import PhaseTimer


@dataclass(frozen=True)
class FeatureRunResult:
    rows: int
    series: int
    online_entities: int
    timer: PhaseTimer


def run_feature_pipeline(shape: Shape, settings: Settings, online: bool = True,
                         process: ProcessPoolExecutor | None = None) -> FeatureRunResult:
    """The whole step. ``online=False`` loads the offline store only (the weekly cycle's replay starts weeks in
    the past, older than the feature ttl: nothing of it could be materialized). ``process``: the child process the
    data is made in, if the caller started it already (``child.start``).

    The data is generated, derived and staged in a child process (``OfflineLoad``) while this one imports Feast
    and Ray workers start for the materialization (``WarmWorkers``); the staged tables are committed only after
    the repo's ttl has been checked, so data the Ray engine would not materialize is refused before anything is
    loaded.
    """
    with fs_ops.collecting_rarely():  # Feast's import and its millions of objects
        return _run(shape, settings, online, process)


def _run(shape: Shape, settings: Settings, online: bool, process: ProcessPoolExecutor | None) -> FeatureRunResult:
    shape = dataclasses.replace(shape, end_date=shape.resolved_end_date())  # one end date in both processes
    timer = PhaseTimer(f"step 1: {shape.stores} stores x {shape.depts} depts x {shape.weeks} weeks")
    with timer.phase("connect PostgreSQL and Ray"):
        settings = stack.ensure_services(settings, ray=True)
    with OfflineLoad(shape, settings.postgres, process=process) as offline:
        with timer.phase("start Ray workers, read the feature repo"):  # while the child makes the data
            workers = fs_ops.WarmWorkers(settings, shape.stores * shape.depts) if online else None
            objects = fs_ops.repo_objects(settings.feast_repo_path)  # Feast's import
            store = fs_ops.open_store(settings)
            ttl = fs_ops.defined_feature_ttl(objects, settings.feast_repo_path)
        with timer.phase("generate, derive, bulk load (COPY)"):
            staged = offline.staged()
            latest = staged.latest
            data_end = latest["event_timestamp"].max().to_pydatetime()
            if online:
                fs_ops.check_materializable(data_end, ttl)
            offline.commit()
            child = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in staged.seconds.items())
            kept = f" ({', '.join(staged.kept)} unchanged: kept)" if staged.kept else ""
            timer.note("generate, derive, bulk load (COPY)",
                       f"{RAW_TABLE} + {FEATURE_TABLE}, {staged.rows:,} rows each{kept}, ending {shape.end_date}; "
                       f"in a child process: {child}")
    record_dataset(settings, shape)
    with timer.phase("feast apply"):
        applied = fs_ops.apply_objects(store, objects)
        timer.note("feast apply", f"{len(applied)} objects")
    if not online:
        return FeatureRunResult(rows=staged.rows, series=len(latest), online_entities=0, timer=timer)
    with timer.phase("materialize (Ray engine), prune stale series"), ThreadPoolExecutor(1) as pool:
        # Pruning deletes the series the data no longer has, the materialization upserts the ones it has: other
        # rows, so the delete runs while this process waits for Ray.
        pruned = pool.submit(fs_ops.prune_online, settings, latest)
        workers.wait()
        fs_ops.materialize_latest(store, data_end)
        timer.note("materialize (Ray engine), prune stale series", f"{pruned.result():,} stale online rows deleted")
    with timer.phase("verify online store"):
        stats = fs_ops.verify_online(settings, store, latest)
        timer.note("verify online store", f"{stats.entities:,} series stamped {data_end:%Y-%m-%d}")
    return FeatureRunResult(rows=staged.rows, series=len(latest), online_entities=stats.entities, timer=timer)
