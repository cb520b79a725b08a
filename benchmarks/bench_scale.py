#!/usr/bin/env python
"""Steps 1 and 2 at a multiple of the default rows, with the whole machine's memory sampled:
`python -m benchmarks.bench_scale --scale 10` (make bench-scale).

--scale S runs `01_feast_features.py --stores 143*S` (81 depts, 52 weeks: 602,316 x S rows) and then
`02_training.py`, each as its own process exactly as a user runs them, on the configured or embedded stack (use a
stack of its own: SALES_STACK_DIR, POSTGRES_PORT, SALES_*_PORT, as for bench_pit_join). Figures per step:
- wall: from spawning the process to its exit (Python start-up, imports, the work, teardown);
- the step's own phase table (printed by the step: its retrieval, load, materialization... times);
- memory: peak PSS of the step's process tree, of the Ray head's processes (workers included), of PostgreSQL, and
  the machine's used memory (total - available), each with its baseline before the step, sampled every
  --memory-interval seconds.
--steps 1 or 2 runs one step only (2 needs step 1's data at the same scale); --steps persist runs step 2's
training-set retrieval alone in a process of its own, written to a saved dataset (a PostgreSQL table, dropped
afterwards) with get_historical_features(...).persist instead of returned with to_df: the store writes a one-view
result partition by partition, so the set never has to fit in the process; --steps floor measures the read floor
of step 2's retrieval: PostgreSQL sending the whole feature table (what the point-in-time join reads) to one ADBC
reader per CPU, each a range of stores, in parallel; no join, nothing sent to a driver. What breaks first at 100x
is part of the report, so a step is stopped, and reported with the phase it was in, when it passes --timeout or when
the machine's used memory passes --stop-above GiB (before the kernel's OOM killer picks a victim among the stack's
processes).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.memory import MachineMemory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORES = 143
PERSIST_TABLE = "bench_scale_training_set"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--steps", default="1,2", help="which steps to run: 1, 2, 1,2, persist or floor")
    parser.add_argument("--memory-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--stop-above", type=float, default=20.0, help="GiB of machine memory used")
    parser.add_argument("--persist-child", metavar="TABLE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.persist_child:
        persist_training_set(args.persist_child)
        return

    from sales_forecast import stack
    from sales_forecast.config import load_settings
    from sales_forecast.stack import postgres, ray_head

    settings = stack.ensure_services(load_settings(), mlflow=True, ray=True)
    stores = DEFAULT_STORES * args.scale
    commands = {"1": [sys.executable, "01_feast_features.py", "--stores", str(stores)],
                "2": [sys.executable, "02_training.py", "--run-name", f"bench-scale x{args.scale}"],
                "persist": [sys.executable, "-m", "benchmarks.bench_scale", "--persist-child", PERSIST_TABLE]}
    print(f"scale {args.scale}: {stores} stores x 81 depts x 52 weeks = {stores * 81 * 52:,} rows; "
          f"load average {os.getloadavg()[0]:.1f} (2 CPUs)", flush=True)
    if args.steps == "floor":
        read_floor(settings, os.cpu_count() or 1)
        return
    summary = []
    for step in args.steps.split(","):
        head = ray_head.head_pid(settings.stack_dir)
        postmaster = postgres.server_pid(settings.stack_dir / "postgres")
        with MachineMemory(head, postmaster, args.memory_interval) as memory:
            started = time.perf_counter()
            process = subprocess.Popen(commands[step], cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            memory.watch(process.pid)
            phase = Phase(process.stdout)
            code = watch(process, memory, args.timeout, args.stop_above * 2**30)
            wall = time.perf_counter() - started
            phase.thread.join()
        print(f"\nstep {step}: wall {wall:.1f} s, exit {code}" + (f" in phase {phase.last!r}" if code != 0 else "")
              + f", load average after {os.getloadavg()[0]:.1f}")
        memory.report(f"step {step}")
        summary.append((step, wall, code, memory.peak))
        if step == "persist":
            drop_table(settings, PERSIST_TABLE)
        if code != 0:
            break
    print(f"\n| scale {args.scale} | wall | exit | peak driver | peak Ray | peak PostgreSQL | peak machine used |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for step, wall, code, peak in summary:
        gib = {name: value / 2**30 for name, value in peak.items()}
        print(f"| step {step} | {wall:.1f} s | {code} | {gib['driver']:.2f} GiB | {gib['ray head']:.2f} GiB | "
              f"{gib['postgresql']:.2f} GiB | {gib['machine used (total - available)']:.2f} GiB |")


def read_floor(settings, readers: int) -> None:
    import adbc_driver_postgresql.dbapi as adbc
    import psycopg

    from sales_forecast.contract import FEATURE_TABLE

    url = settings.postgres.libpq_url()
    with psycopg.connect(url) as conn:
        low, high = conn.execute(f'SELECT min(store), max(store) FROM "{FEATURE_TABLE}"').fetchone()
    bounds = [low + (high + 1 - low) * k // readers for k in range(readers + 1)]
    sizes: list[tuple[int, int]] = []

    def read(start: int, end: int) -> None:
        with adbc.connect(url) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT * FROM "{FEATURE_TABLE}" WHERE store >= {start} AND store < {end}')
            table = cur.fetch_arrow_table()
            sizes.append((table.num_rows, table.nbytes))

    started = time.perf_counter()
    threads = [threading.Thread(target=read, args=bounds[k:k + 2]) for k in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    rows, size = sum(r for r, _ in sizes), sum(b for _, b in sizes)
    print(f"read floor: {rows:,} rows ({size / 2**30:.2f} GiB as Arrow) of {FEATURE_TABLE} in {seconds:.1f} s by "
          f"{readers} parallel ADBC readers (store ranges); load average after {os.getloadavg()[0]:.1f}")


def persist_training_set(table: str) -> None:
    """--steps persist's child: step 2's retrieval persisted to ``table``; prints what it wrote and its phases."""
    started = time.perf_counter()
    import psycopg
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
        SavedDatasetPostgreSQLStorage,
    )

    from sales_forecast.config import load_settings
    from sales_forecast.contract import FEATURE_SERVICE
    from sales_forecast.features.store import open_store
    from sales_forecast.training.dataset import entity_sql

    settings = load_settings()
    store = open_store(settings)
    ready = time.perf_counter()
    print("> get_historical_features(...).persist ...", file=sys.stderr, flush=True)
    job = store.get_historical_features(entity_df=entity_sql(), features=store.get_feature_service(FEATURE_SERVICE))
    job.persist(SavedDatasetPostgreSQLStorage(table_ref=table), allow_overwrite=True)
    done = time.perf_counter()
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        rows, size = conn.execute(f'SELECT (SELECT count(*) FROM "{table}"), pg_total_relation_size(%s)',
                                  (table,)).fetchone()
    phases = ", ".join(f"{phase} at {seconds:.1f} s" for phase, seconds in job.timings.items())
    print(f"training set persisted: {rows:,} rows, {size / 2**30:.1f} GiB in PostgreSQL; imports and "
          f"FeatureStore {ready - started:.1f} s; get_historical_features(...).persist {done - ready:.1f} s "
          f"({phases})", flush=True)


def drop_table(settings, table: str) -> None:
    import psycopg

    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


class Phase:
    """Echoes a step's output (stdout and stderr) and remembers the phase it is in (PhaseTimer's "> phase ..."
    progress lines, which go to stderr)."""

    def __init__(self, stream):
        self.last = "start-up"
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            sys.stdout.write(line)
            if line.startswith("> "):
                self.last = line[2:].strip(" .\n")


def watch(process: subprocess.Popen, memory: MachineMemory, timeout: float, limit: float) -> int | str:
    """The step's exit code, or why it was stopped (its whole process group)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        used = memory.peak.get("machine used (total - available)", 0.0)
        reason = ("timeout" if time.monotonic() > deadline
                  else f"stopped: machine memory used {used / 2**30:.1f} GiB" if used > limit else None)
        if reason:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return reason
        time.sleep(0.2)
    return process.returncode


if __name__ == "__main__":
    main()
