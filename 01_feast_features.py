#!/usr/bin/env python
"""Step 1: synthetic Walmart-like weekly sales -> PostgreSQL -> feast apply -> Ray materialization.

A full load by default; --append-week adds only the week that just ended (the history stays) and moves the
online store to it. Runs on the embedded local stack by default. With RAY_JOBS_ADDRESS (or --ray-jobs-address)
set, the same command is submitted as a Ray job to that cluster (how the Kubernetes Job runs it) and its logs
streamed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sales_forecast.cli import add_shape_arguments, from_environment, run_cli
from sales_forecast.config import load_settings, load_shape_defaults
from sales_forecast.stack import disconnect_ray

if TYPE_CHECKING:
    from sales_forecast.features.generator import Shape


def week_end_date(text: str) -> dt.date:
    from sales_forecast.features.generator import latest_friday

    try:
        day = dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from exc
    if day > dt.datetime.now(dt.UTC).date():
        raise argparse.ArgumentTypeError(f"{day} is in the future")
    return latest_friday(day)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = from_environment(parser, load_shape_defaults)
    settings = from_environment(parser, load_settings)
    add_shape_arguments(parser, defaults, "--weeks", "weeks per series, at least 6: four lags, a label, a test week")
    parser.add_argument("--end-date", type=week_end_date, default=None,
                        help="the series end on the Friday on or before this date (default: the latest Friday)")
    parser.add_argument("--append-week", nargs="?", const="latest", default=None, metavar="YYYY-MM-DD",
                        help="add one week to the loaded history instead of a full load: by default the week after "
                             "the latest loaded one (a repeat replaces it); the shape flags do not apply")
    parser.add_argument("--ray-jobs-address", default=settings.ray_jobs_address,
                        help="Ray dashboard URL (http://host:8265): run this step as a Ray job there")
    parser.set_defaults(settings=settings)
    args = parser.parse_args(argv)
    if args.weeks < 6:
        parser.error("--weeks must be at least 6")
    if args.append_week not in (None, "latest"):
        try:
            args.append_week = week_end_date(args.append_week)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --append-week: {exc}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = args.settings
    if args.ray_jobs_address:
        from sales_forecast.features.ray_job import job_environment, run_ray_job

        if args.append_week:
            chosen = [] if args.append_week == "latest" else [args.append_week.isoformat()]
            step = ["--append-week", *chosen]
        else:
            step = ["--stores", str(args.stores), "--depts", str(args.depts), "--weeks", str(args.weeks),
                    "--seed", str(args.seed), "--end-date", shape_of(args).resolved_end_date().isoformat()]
        command = [sys.executable, str(Path(__file__).resolve()), *step, "--ray-jobs-address", ""]
        run_ray_job(args.ray_jobs_address, shlex.join(command), job_environment(settings))
        return

    if args.append_week:
        from sales_forecast.features.append import append_week

        appended = append_week(settings, None if args.append_week == "latest" else args.append_week)
        disconnect_ray()
        appended.timer.print_summary()
        where = "offline and online stores" if appended.materialized else "offline store only (older than the ttl)"
        print(f"appended the week ending {appended.week}: {appended.rows:,} series, {where}")
        return

    from sales_forecast.features import child

    process = child.start()  # before this process imports pandas, Feast and Ray, so the child's imports overlap them
    try:
        from sales_forecast.features.pipeline import run_feature_pipeline

        result = run_feature_pipeline(shape_of(args), settings, process=process)
    finally:
        process.shutdown(cancel_futures=True)
    disconnect_ray()
    result.timer.print_summary()
    print(f"online store: {result.online_entities:,} series with next-week features "
          f"({result.rows:,} rows loaded)")


def shape_of(args: argparse.Namespace) -> Shape:
    from sales_forecast.features.generator import Shape

    return Shape(args.stores, args.depts, args.weeks, args.seed, args.end_date)


if __name__ == "__main__":
    run_cli(main)
