#!/usr/bin/env python
"""Feast's PostgreSQL point-in-time join vs the Ray offline store's, on the project's feature service.

Generates the default shape (143 stores x 81 depts x 52 weeks = 602,316 feature rows) times --scale (more
stores), loads it into its own database (reused when already loaded), applies the project's definitions, and
times get_historical_features(...).to_df() for the same SQL entity set (every feature row's key and time) with
both stores. Ray start-up (ray.init plus one warm-up task per CPU) is timed separately. Results are compared;
the feature view has two join keys (store, dept), which Feast's PostgreSQL join glues together, so it returns
extra rows for colliding pairs such as (1, 12) / (11, 2): its timing is a reference, its result is not.

Use a stack of its own so nothing else is touched, e.g.:
    SALES_STACK_DIR=/tmp/pit-stack POSTGRES_PORT=54404 .venv/bin/python benchmarks/bench_pit_join.py --scale 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import psutil
import psycopg

from sales_forecast.config import REPO_ROOT, Settings, load_settings
from sales_forecast.contract import FEATURE_SERVICE, FEATURE_TABLE, RAW_TABLE
from sales_forecast.features.derive import build_features
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.load import load_table
from sales_forecast.features.store import repo_objects, repo_yaml
from sales_forecast.stack import postgres

RAY_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"
ENTITY_SQL = f'SELECT store, dept, event_timestamp FROM "{FEATURE_TABLE}"'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="multiply the default shape's stores (rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the Ray join")
    parser.add_argument("--postgres-repeats", type=int, default=1, help="timed runs of the PostgreSQL join")
    parser.add_argument("--skip-postgres", action="store_true", help="time the Ray join only")
    parser.add_argument("--partitions", type=int, default=None, help="Ray tasks per view (default: auto)")
    parser.add_argument("--entity-sql", default=ENTITY_SQL,
                        help=f"the entity set (SQL over {FEATURE_TABLE} or {RAW_TABLE}), e.g. the training step's")
    parser.add_argument("--work-mem", default="64MB",
                        help="PostgreSQL work_mem for the bench database's sessions (ALTER DATABASE; PGOPTIONS "
                             "does not reach Feast's connections, which set their own options)")
    return parser.parse_args()


class PeakMemory:
    """Peak memory of this process and its descendants (local Ray's raylet, workers, object store), sampled.

    PSS, not RSS: the object store's shared memory is mapped by every worker and would be counted each time.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker may exit while sampled
                total += proc.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._total())

    def __enter__(self) -> PeakMemory:
        self.peak = self._total()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def load_shape(settings: Settings, shape: Shape) -> None:
    raw = generate(shape)
    seconds, features = timed(lambda: build_features(raw))
    print(f"generated {len(features):,} feature rows in {seconds:.1f} s")
    start = time.perf_counter()
    load_table(settings.postgres, RAW_TABLE, raw, ["store", "dept", "date"])
    load_table(settings.postgres, FEATURE_TABLE, features, ["store", "dept", "event_timestamp"])
    print(f"loaded {RAW_TABLE} and {FEATURE_TABLE} in {time.perf_counter() - start:.1f} s")


def prepare_database(settings: Settings, shape: Shape) -> Settings:
    """A database holding this shape's raw and feature tables (loaded once, then reused)."""
    name = f"pit_bench_{shape.stores}x{shape.depts}x{shape.weeks}"
    postgres.start(settings.postgres, settings.stack_dir / "postgres")
    with psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    bench = dataclasses.replace(settings, postgres=dataclasses.replace(settings.postgres, database=name))
    with psycopg.connect(bench.postgres.libpq_url()) as conn:
        exists = all(conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
                     for table in (RAW_TABLE, FEATURE_TABLE))
        rows = conn.execute(f'SELECT count(*) FROM "{FEATURE_TABLE}"').fetchone()[0] if exists else 0
    if rows != shape.rows:
        load_shape(bench, shape)
    return bench


def feature_store(settings: Settings, offline: dict[str, Any]):
    """The project's feature_store.yaml for the bench database, with the given offline store keys."""
    from feast import FeatureStore, RepoConfig

    raw = repo_yaml(settings)
    raw["offline_store"].update(offline)
    raw["batch_engine"] = {"type": "local"}  # apply must not start Feast's Ray engine: Ray start-up is timed below
    return FeatureStore(config=RepoConfig(repo_path=REPO_ROOT / "feature_repo", **raw))


def start_ray() -> tuple[float, float]:
    """(ray.init seconds, warm-up seconds): the warm-up runs one task per CPU importing the worker modules."""
    import ray

    from sales_forecast.ray_offline_store.driver import cluster_cpus, ensure_ray

    init, _ = timed(lambda: ensure_ray(None, None))

    def warm() -> None:
        @ray.remote
        def touch() -> None:
            import sales_forecast.ray_offline_store.worker  # noqa: F401

        ray.get([touch.remote() for _ in range(cluster_cpus())])

    warm_up, _ = timed(warm)
    return init, warm_up


def retrieve(store, entity_sql: str) -> pd.DataFrame:
    service = store.get_feature_service(FEATURE_SERVICE)
    return store.get_historical_features(entity_df=entity_sql, features=service).to_df()


def same_result(ours: pd.DataFrame, theirs: pd.DataFrame) -> bool:
    by = ["store", "dept", "event_timestamp"]
    if len(theirs) != len(ours):
        print(f"Feast's PostgreSQL join returned {len(theirs):,} rows for {len(ours):,} entity rows "
              "(it glues the two join keys together)")
        return False
    try:
        pd.testing.assert_frame_equal(ours.sort_values(by).reset_index(drop=True),
                                      theirs.sort_values(by).reset_index(drop=True))
    except AssertionError as exc:
        print(f"results differ: {exc}")
        return False
    return True


def main() -> None:
    args = parse_args()
    os.environ.setdefault("FEAST_RAY_EXECUTION_MODE", "local")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    base = Shape()
    shape = Shape(stores=base.stores * args.scale, depts=base.depts, weeks=base.weeks, seed=base.seed)
    settings = prepare_database(load_settings(), shape)
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{settings.postgres.database}" SET work_mem = {psycopg.sql.quote(args.work_mem)}')
    connection = {"type": "postgres"}
    ray_offline = {"type": RAY_TYPE, **({"partitions": args.partitions} if args.partitions else {})}
    ray_store = feature_store(settings, ray_offline)
    ray_store.apply(repo_objects(REPO_ROOT / "feature_repo"))
    print(f"shape {shape.stores} x {shape.depts} x {shape.weeks} = {shape.rows:,} feature rows; "
          f"entity set: {args.entity_sql}; work_mem {args.work_mem}; "
          f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")

    pg_times: list[float] = []
    theirs = None
    if not args.skip_postgres:
        pg_store = feature_store(settings, connection)
        with PeakMemory() as pg_memory:
            for _ in range(args.postgres_repeats):
                seconds, theirs = timed(lambda: retrieve(pg_store, args.entity_sql))
                pg_times.append(seconds)
                print(f"Feast PostgreSQL join: {seconds:.2f} s ({len(theirs):,} rows)")
        print(f"  peak memory (this process): {pg_memory.peak / 2**30:.2f} GiB")

    init, warm_up = start_ray()
    print(f"Ray start-up: ray.init {init:.2f} s + worker warm-up {warm_up:.2f} s")
    ray_times: list[float] = []
    for _ in range(args.repeats):
        seconds, ours = timed(lambda: retrieve(ray_store, args.entity_sql))
        ray_times.append(seconds)
        print(f"Ray join: {seconds:.2f} s ({len(ours):,} rows)")
    del ours
    with PeakMemory() as ray_memory:  # a separate run: sampling the workers costs CPU
        seconds, ours = timed(lambda: retrieve(ray_store, args.entity_sql))
    print(f"  peak memory (this process + local Ray, PSS), in one more run ({seconds:.2f} s): "
          f"{ray_memory.peak / 2**30:.2f} GiB")

    print(f"load average after: {os.getloadavg()[0]:.1f}")
    best, median = min(ray_times), statistics.median(ray_times)
    print("\n| rows | PostgreSQL join | Ray join best / median | speedup (best / median) | Ray start-up |")
    print("|---:|---:|---:|---:|---:|")
    pg = f"{min(pg_times):.2f} s" if pg_times else "skipped"
    speedup = f"{min(pg_times) / best:.1f}x / {min(pg_times) / median:.1f}x" if pg_times else "-"
    print(f"| {shape.rows:,} | {pg} | {best:.2f} / {median:.2f} s | {speedup} | {init + warm_up:.1f} s |")
    if theirs is not None:
        print("results identical: " + ("yes" if same_result(ours, theirs) else "NO"))


if __name__ == "__main__":
    main()
