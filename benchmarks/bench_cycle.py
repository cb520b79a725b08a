#!/usr/bin/env python
"""Benchmark of the weekly cycle: `python -m benchmarks.bench_cycle [--weeks 8]` (make bench-cycle).

Replays the last N weeks at the default shape (143 stores x 81 depts, 52 weeks of history before the first
replayed week) exactly as `04_weekly_cycle.py --weeks N` does (a model server follows every promotion), in a
database, model directory, registered model and MLflow experiments of its own (the demo's champion never moves),
on the configured or embedded stack.
Prints the cycle's table, the set-up time (step 1 and the first champion), the time per week and in all,
against the goal: 8 weeks in under 6 minutes, every week's forecasts scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from rich.console import Console

GOAL_SECONDS = 360.0
BENCH = "cycle-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weeks", type=int, default=8)
    args = parser.parse_args()

    started = time.perf_counter()  # includes imports
    from sales_forecast import stack
    from sales_forecast.config import load_settings
    from sales_forecast.features.generator import Shape
    from sales_forecast.operations.cycle import RetrainPolicy, WeeklyCycle, report_table
    from sales_forecast.operations.serving import follow_local_server
    from sales_forecast.stack import model_server
    from sales_forecast.stack.processes import free_port
    from sales_forecast.training.params import TrainingParams

    settings = load_settings()
    stack.ensure_postgres(settings)
    settings = dataclasses.replace(settings.with_database(BENCH.replace("-", "_")),
                                   model_dir=settings.stack_dir / f"models-{BENCH}",
                                   mlflow_experiment=f"sales-forecast-{BENCH}")
    _create_database(settings)
    cycle = WeeklyCycle(settings, RetrainPolicy(), TrainingParams(registered_model=f"sales-forecast-{BENCH}"))
    try:
        start = cycle.prepare_replay(Shape(), args.weeks)
        cycle.on_promotion, cycle.served_version = follow_local_server(cycle.settings, free_port(), BENCH)
        reports = cycle.replay(start, args.weeks)
    finally:
        cycle.finish()
        model_server.stop(settings.stack_dir, BENCH)
    total = time.perf_counter() - started
    weeks = sum(report.seconds for report in reports)
    console = Console(highlight=False, width=140)
    console.print(report_table(reports))
    scored = sum(report.accuracy is not None for report in reports)
    console.print(f"set-up (imports, step 1 offline, first champion, first forecasts): {total - weeks:.1f} s; "
                  f"{len(reports)} weeks: {weeks:.1f} s ({weeks / max(1, len(reports)):.1f} s per week); "
                  f"in all {total:.1f} s (goal for 8 weeks: < {GOAL_SECONDS:.0f} s: "
                  f"{'met' if total < GOAL_SECONDS else 'NOT met'}); weeks scored: {scored} of {len(reports)}")


def _create_database(settings) -> None:
    import psycopg

    with psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.postgres.database,)).fetchone():
            conn.execute(f'CREATE DATABASE "{settings.postgres.database}"')


if __name__ == "__main__":
    from sales_forecast.cli import run_cli

    run_cli(main)
