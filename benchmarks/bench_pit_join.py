#!/usr/bin/env python
"""Feast's PostgreSQL offline store against the Ray offline store: get_historical_features(...).to_df() in cold
processes, side by side, plus warm calls and the whole machine's memory.

Shape: the default 143 stores x 81 depts x 52 weeks = 602,316 feature rows, times --scale (more stores), loaded
once into its own database and reused. The Ray store joins the project's feature service (two join keys, store
and dept) and attaches to the stack's Ray head (RAY_ADDRESS, or a head this benchmark starts on its own ports);
Feast's PostgreSQL store joins the single-key equivalent: the same rows keyed by store_dept = store * 1000 + dept,
since its join is wrong on two keys. The entity set is SQL: every feature row's key and time (--entity features),
or the training step's entity set with its labels (--entity training).

Each cold measurement is a fresh Python process (python -m benchmarks.bench_pit_join --child ...). Its figures:
- process: from just before the process is spawned to the DataFrame in hand: Python start-up, every import
  (Feast, the store, Ray), FeatureStore and registry, then the call;
- call: get_historical_features(...).to_df() alone in that fresh process: for Ray, importing Ray, attaching to
  the head, the entity set, the join on the cluster's workers, the DataFrame;
- exit: the process's shutdown after the DataFrame (Ray disconnect, interpreter teardown), not in the above;
- CPU seconds of the whole child process's run, by group: the driver process, the Ray head's processes and
  workers, PostgreSQL's (a busy machine stretches the wall times, much less these).
Warm: the same call repeated in one process that has made it once (imports done, Ray attached).
Memory: in separate runs (sampling costs CPU), every process on the machine is sampled (PSS, so shared pages
count once) every --memory-interval seconds; the peak is reported for the machine and for what this benchmark
runs (the driver process, the Ray head's processes and workers, PostgreSQL), with the baseline before the call.

Use a stack of its own so nothing else is touched, e.g.:
    SALES_STACK_DIR=/tmp/raybench-stack POSTGRES_PORT=54420 python -m benchmarks.bench_pit_join [--scale 10]
and stop it afterwards with the same variables: python -m sales_forecast.stack down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.memory import MachineMemory

if __name__ == "__main__" and "--child" in sys.argv:  # a cold process: nothing imported before the clock starts
    CHILD_START = time.perf_counter()

RAY_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"
SINGLE_KEY_TABLE = "sales_features_by_series"
SINGLE_KEY_VIEW = "sales_features_by_series"
SINGLE_KEY_SERVICE = "sales_forecast_by_series"
BENCH_RAY_PORT, BENCH_RAY_DASHBOARD_PORT = 24430, 24431  # below the ephemeral range, not the demo's 6389 / 8265


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="multiply the default shape's stores (rows)")
    parser.add_argument("--entity", choices=["features", "training"], default="features",
                        help="the entity set: every feature row's key and time, or the training step's")
    parser.add_argument("--cold", type=int, default=3, help="cold processes per store")
    parser.add_argument("--warm", type=int, default=3, help="warm calls (after one cold call) per store")
    parser.add_argument("--stores", default="ray,postgres", help="which stores to run (ray, postgres)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--memory-interval", type=float, default=0.25)
    parser.add_argument("--check", action="store_true",
                        help="also compare the Ray store's result with Feast's on the single-key view")
    parser.add_argument("--partitions", type=int, default=None, help="Ray tasks per view (default: auto)")
    parser.add_argument("--work-mem", default="64MB",
                        help="PostgreSQL work_mem for the bench database's sessions (ALTER DATABASE; PGOPTIONS "
                             "does not reach Feast's connections, which set their own options)")
    parser.add_argument("--child", choices=["ray", "postgres"], help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--single-key", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# --- what a store is asked ----------------------------------------------------------------------------------------

def entity_sql(kind: str, single_key: bool) -> str:
    from sales_forecast.contract import FEATURE_TABLE
    from sales_forecast.training.dataset import entity_sql as training_sql

    if kind == "training":
        query = training_sql()
        return f"SELECT store * 1000 + dept AS store_dept, * FROM ({query}) AS t" if single_key else query
    if single_key:
        return f'SELECT store_dept, event_timestamp FROM "{SINGLE_KEY_TABLE}"'
    return f'SELECT store, dept, event_timestamp FROM "{FEATURE_TABLE}"'


def single_key_objects() -> list:
    """The project's feature view keyed by one combined key (Feast's PostgreSQL join is right on one key)."""
    from datetime import timedelta

    from feast import Entity, FeatureService, FeatureView, Field, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.types import Float64, Int64

    from sales_forecast.features.derive import MODEL_FEATURES

    series = Entity(name="store_dept", join_keys=["store_dept"], value_type=ValueType.INT64)
    view = FeatureView(name=SINGLE_KEY_VIEW, entities=[series], ttl=timedelta(days=7),
                       schema=[Field(name="store_dept", dtype=Int64)]
                       + [Field(name=name, dtype=Float64) for name in MODEL_FEATURES],
                       source=PostgreSQLSource(name=SINGLE_KEY_TABLE, table=SINGLE_KEY_TABLE,
                                               timestamp_field="event_timestamp"))
    return [series, view, FeatureService(name=SINGLE_KEY_SERVICE, features=[view])]


def feature_store(settings, offline: dict):
    """The project's feature_store.yaml for the bench database, with the given offline store keys."""
    from feast import FeatureStore, RepoConfig

    from sales_forecast.config import REPO_ROOT
    from sales_forecast.features.store import repo_yaml

    raw = repo_yaml(settings)
    raw["offline_store"].update(offline)
    raw["batch_engine"] = {"type": "local"}  # apply must not start Feast's Ray engine
    return FeatureStore(config=RepoConfig(repo_path=REPO_ROOT / "feature_repo", **raw))


def offline_keys(store: str, partitions: int | None) -> dict:
    if store == "postgres":
        return {"type": "postgres"}
    return {"type": RAY_TYPE, **({"partitions": partitions} if partitions else {})}


# --- the cold process ---------------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    """One fresh process: imports, FeatureStore, then ``--repeat`` calls; one JSON line on stdout."""
    from sales_forecast.config import load_settings
    from sales_forecast.contract import FEATURE_SERVICE

    settings = load_settings()
    store = feature_store(settings, offline_keys(args.child, args.partitions))
    service = store.get_feature_service(SINGLE_KEY_SERVICE if args.single_key else FEATURE_SERVICE)
    ready = time.perf_counter()
    query = entity_sql(args.entity, args.single_key)
    calls, rows, phases = [], 0, []
    for _ in range(args.repeat):
        start = time.perf_counter()
        job = store.get_historical_features(entity_df=query, features=service)
        frame = job.to_df()
        calls.append(time.perf_counter() - start)
        rows = len(frame)
        phases.append(dict(getattr(job, "timings", {})))
        del frame, job
    print(json.dumps({"done_at": time.time(), "imports_and_store": ready - CHILD_START, "calls": calls,
                      "rows": rows, "pid": os.getpid(), "phases": phases}), flush=True)


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process tree: every live process's own time plus what it reaped from exited children (a
    PostgreSQL backend whose connection closed, a Ray worker that exited)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            continue
    return total


def cpu_snapshot(roots: dict[str, int | None]) -> dict[str, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the benchmark's finished child processes
    return {"driver": usage.ru_utime + usage.ru_stime, **{name: tree_cpu(pid) for name, pid in roots.items()}}


@dataclass
class Cold:
    process: float  # spawn to DataFrame
    call: float
    exit: float
    imports_and_store: float
    rows: int
    warm: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)  # the Ray job's timings, per call
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per group, the whole child process


CPU_ROOTS: dict[str, int | None] = {}  # "ray head" and "postgresql" pids, set by main


def run_child(store: str, args: argparse.Namespace, env: dict[str, str], repeat: int = 1,
              memory: MachineMemory | None = None, single_key: bool | None = None) -> Cold:
    command = [sys.executable, "-m", "benchmarks.bench_pit_join", "--child", store, "--entity", args.entity,
               "--repeat", str(repeat)]
    if args.partitions:
        command += ["--partitions", str(args.partitions)]
    if store == "postgres" if single_key is None else single_key:
        command.append("--single-key")
    before = cpu_snapshot(CPU_ROOTS)
    spawned = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    if memory:
        memory.watch(process.pid)
    out, _ = process.communicate()
    ended = time.time()
    after = cpu_snapshot(CPU_ROOTS)
    if process.returncode != 0:
        raise SystemExit(f"the {store} child failed (exit {process.returncode})")
    report = json.loads(out.strip().splitlines()[-1])
    return Cold(process=report["done_at"] - spawned, call=report["calls"][0], exit=ended - report["done_at"],
                imports_and_store=report["imports_and_store"], rows=report["rows"], warm=report["calls"][1:],
                phases=report["phases"], cpu={name: after[name] - before[name] for name in after})


# --- set-up -------------------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace):
    """The bench database (loaded once per shape), the single-key table, the definitions, the Ray head."""
    import dataclasses

    import psycopg

    from sales_forecast.config import REPO_ROOT, load_settings
    from sales_forecast.contract import FEATURE_INDEX, FEATURE_TABLE, RAW_INDEX, RAW_TABLE
    from sales_forecast.features.derive import FEATURE_COLUMNS, build_features
    from sales_forecast.features.generator import Shape, generate
    from sales_forecast.features.load import load_table
    from sales_forecast.features.store import repo_objects
    from sales_forecast.stack import postgres, ray_head

    base = Shape()
    shape = Shape(stores=base.stores * args.scale, depts=base.depts, weeks=base.weeks, seed=base.seed)
    settings = load_settings()
    postgres.start(settings.postgres, settings.stack_dir / "postgres")
    name = f"pit_bench_{shape.stores}x{shape.depts}x{shape.weeks}"
    with psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'ALTER DATABASE "{name}" SET work_mem = {psycopg.sql.quote(args.work_mem)}')
    settings = settings.with_database(name)
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        def rows(table: str) -> int:
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                return 0
            return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]

        def columns(table: str) -> list[str]:
            return [row[0] for row in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum", (table,)).fetchall()]

        stale = columns(FEATURE_TABLE) != FEATURE_COLUMNS  # the data of another version of the features
        if stale or rows(FEATURE_TABLE) != shape.rows or rows(RAW_TABLE) != shape.rows:
            raw = generate(shape)
            features = build_features(raw)
            load_table(settings.postgres, RAW_TABLE, raw, RAW_INDEX)
            load_table(settings.postgres, FEATURE_TABLE, features, FEATURE_INDEX)
            print(f"loaded {shape.rows:,} rows into {RAW_TABLE} and {FEATURE_TABLE}")
            conn.execute(f'DROP TABLE IF EXISTS "{SINGLE_KEY_TABLE}"')
        if stale or rows(SINGLE_KEY_TABLE) != shape.rows:
            conn.execute(f'DROP TABLE IF EXISTS "{SINGLE_KEY_TABLE}"')
            conn.execute(f'CREATE TABLE "{SINGLE_KEY_TABLE}" AS SELECT store * 1000 + dept AS store_dept, * '
                         f'FROM "{FEATURE_TABLE}"')
            conn.execute(f'CREATE INDEX ON "{SINGLE_KEY_TABLE}" (store_dept, event_timestamp)')
            conn.execute(f'ANALYZE "{SINGLE_KEY_TABLE}"')
    feature_store(settings, offline_keys("ray", None)).apply(
        [*repo_objects(REPO_ROOT / "feature_repo"), *single_key_objects()])

    if not settings.ray_address:
        head = ray_head.start(settings.stack_dir, BENCH_RAY_PORT, BENCH_RAY_DASHBOARD_PORT)
        settings = dataclasses.replace(settings, ray_address=head)
    return shape, settings


# --- the run ------------------------------------------------------------------------------------------------------

def phases(timings: dict[str, float]) -> str:
    """The Ray job's phases (seconds from the start of the join), when it reports them."""
    return ("\n    Ray call: " + ", ".join(f"{phase} at {seconds:.2f} s" for phase, seconds in timings.items())
            if timings else "")


def describe(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{min(seconds):.2f} / {statistics.median(seconds):.2f}"


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    from sales_forecast.config import process_environment
    from sales_forecast.stack import postgres, ray_head

    shape, settings = prepare(args)
    env = {**os.environ, **process_environment(), **settings.environment(), "RAY_DISABLE_USAGE_STATS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("FEAST_RAY_EXECUTION_MODE", None)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    CPU_ROOTS.update({"ray head": ray_head.head_pid(settings.stack_dir),
                      "postgresql": postgres.server_pid(settings.stack_dir / "postgres")})
    print(f"shape {shape.stores} x {shape.depts} x {shape.weeks} = {shape.rows:,} feature rows; entity set: "
          f"{args.entity}; Ray head {settings.ray_address}; load average {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)")

    cold: dict[str, list[Cold]] = {store: [] for store in stores}
    warm: dict[str, list[float]] = {store: [] for store in stores}
    for round_ in range(args.cold):
        for store in stores:
            result = run_child(store, args, env)
            cold[store].append(result)
            print(f"cold {store:<8} #{round_ + 1}: process {result.process:6.2f} s = imports and FeatureStore "
                  f"{result.imports_and_store:5.2f} s + call {result.call:6.2f} s (+ exit {result.exit:.2f} s); "
                  f"{result.rows:,} rows; load {os.getloadavg()[0]:.1f}\n    CPU seconds (whole process): "
                  + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.cpu.items())
                  + phases(result.phases[0]))
    for store in stores if args.warm else []:
        result = run_child(store, args, env, repeat=args.warm + 1)
        warm[store] = result.warm
        print(f"warm {store:<8}: {', '.join(f'{s:.2f}' for s in result.warm)} s (after a cold call of "
              f"{result.call:.2f} s); load {os.getloadavg()[0]:.1f}{phases(result.phases[-1])}")

    if not args.no_memory:
        head_pid = ray_head.head_pid(settings.stack_dir)
        postmaster = postgres.server_pid(settings.stack_dir / "postgres")
        for store in stores:
            with MachineMemory(head_pid, postmaster, args.memory_interval) as memory:
                result = run_child(store, args, env, memory=memory)
            memory.report(f"{store}, one cold process ({result.process:.2f} s while sampled)")

    if args.check and "ray" in stores and "postgres" in stores:
        check(args, env)

    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print(f"\n| {shape.rows:,} rows, min / median | cold process | cold call | warm call |")
    print("|---|---:|---:|---:|")
    for store in stores:
        label = "Ray store, two keys" if store == "ray" else "Feast PostgreSQL, one key"
        print(f"| {label} | {describe([c.process for c in cold[store]])} s | "
              f"{describe([c.call for c in cold[store]])} s | {describe(warm[store])} s |")
    if "ray" in stores and "postgres" in stores and cold["ray"] and cold["postgres"]:
        def ratio(pick) -> str:
            ours, theirs = [pick(c) for c in cold["ray"]], [pick(c) for c in cold["postgres"]]
            return f"{min(theirs) / min(ours):.1f}x / {statistics.median(theirs) / statistics.median(ours):.1f}x"
        warm_ratio = (f"{min(warm['postgres']) / min(warm['ray']):.1f}x / "
                      f"{statistics.median(warm['postgres']) / statistics.median(warm['ray']):.1f}x"
                      if warm["ray"] and warm["postgres"] else "-")
        print(f"| speed-up | {ratio(lambda c: c.process)} | {ratio(lambda c: c.call)} | {warm_ratio} |")


def check(args: argparse.Namespace, env: dict[str, str]) -> None:
    """The Ray store and Feast's on the single-key view must return the same frame."""
    import pandas as pd

    code = ("import sys, pandas as pd\n"
            "from benchmarks.bench_pit_join import feature_store, offline_keys, entity_sql, SINGLE_KEY_SERVICE\n"
            "from sales_forecast.config import load_settings\n"
            "store = feature_store(load_settings(), offline_keys(sys.argv[1], None))\n"
            "store.get_historical_features(entity_df=entity_sql(sys.argv[2], True), features=store."
            "get_feature_service(SINGLE_KEY_SERVICE)).to_df().to_parquet(sys.argv[3])\n")
    frames = []
    for store in ("ray", "postgres"):
        path = Path(f"/tmp/bench_pit_check_{store}.parquet")
        subprocess.run([sys.executable, "-c", code, store, args.entity, str(path)], env=env, check=True,
                       cwd=Path(__file__).parents[1])
        frames.append(pd.read_parquet(path).sort_values(["store_dept", "event_timestamp"]).reset_index(drop=True))
        path.unlink()
    try:
        pd.testing.assert_frame_equal(*frames)
        print("check: the Ray store's result equals Feast's on the single-key view")
    except AssertionError as exc:
        print(f"check: results DIFFER: {exc}")


if __name__ == "__main__":
    main()
