#!/usr/bin/env python
"""The weekly cycle: new actuals -> incremental features -> last week's forecasts scored -> drift -> retraining
when the policy says so -> the champion gate -> next week's forecast for every series.

--weeks N (default 8), the local demo: load the history ending N weeks before the latest Friday, train the first
champion, start the model server on it, then let the N weeks up to the latest Friday arrive one by one (the server
picks up every new champion by itself), printing a table at the end.
--catch-up, what the Kubernetes CronJob runs weekly: the weeks between the offline store's latest week and the
latest Friday arrive (normally one); with INFERENCE_BACKEND=kubernetes a promotion rolls the InferenceService.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from sales_forecast.cli import add_shape_arguments, from_environment, positive_float, positive_int, run_cli
from sales_forecast.config import EMBEDDED_MODEL_SERVER_PORT, load_settings, load_shape_defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sales_forecast.operations.cycle import RETRAIN_MODES, RetrainPolicy

    policy = RetrainPolicy()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(settings=from_environment(parser, load_settings))
    shape = from_environment(parser, load_shape_defaults)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--weeks", type=positive_int, default=8, help="replay this many weeks (default 8)")
    mode.add_argument("--catch-up", action="store_true", help="only the weeks the offline store lacks (CronJob)")
    parser.add_argument("--retrain", choices=RETRAIN_MODES, default=policy.mode,
                        help="train a challenger every week, only on an alert, or never (default weekly)")
    parser.add_argument("--max-wmae-ratio", type=positive_float, default=policy.max_wmae_ratio,
                        help="alert when the served model's realized WMAE exceeds this x the naive forecast's")
    parser.add_argument("--max-psi", type=positive_float, default=policy.max_psi,
                        help="alert when a feature's PSI against the champion's training window exceeds this")
    add_shape_arguments(parser, shape, "--history-weeks", "weeks of history before the first replayed week",
                        scope="replay: ")
    parser.add_argument("--port", type=positive_int, default=EMBEDDED_MODEL_SERVER_PORT,
                        help="replay: loopback port of the model server it starts (it keeps running)")
    parser.add_argument("--no-server", action="store_true", help="replay: do not start the model server")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sales_forecast.features.generator import Shape
    from sales_forecast.operations.cycle import RetrainPolicy, WeeklyCycle, report_table
    from sales_forecast.operations.serving import follow_local_server, roll_inference_service
    from sales_forecast.timing import PhaseTimer
    from sales_forecast.training.params import TrainingParams

    policy = RetrainPolicy(args.retrain, args.max_wmae_ratio, args.max_psi)
    settings = args.settings
    kubernetes = settings.inference_backend == "kubernetes"
    cycle = WeeklyCycle(settings, policy, TrainingParams(),
                        on_promotion=roll_inference_service(settings) if kubernetes else None)
    timer = PhaseTimer("weekly cycle")
    try:
        if args.catch_up:
            with timer.phase("catch up"):
                reports = cycle.catch_up()
        else:
            with timer.phase("history and first champion"):
                start = cycle.prepare_replay(Shape(args.stores, args.depts, args.history_weeks, args.seed),
                                             args.weeks)
            if not (args.no_server or kubernetes):
                with timer.phase("start model server"):
                    cycle.on_promotion, cycle.served_version = follow_local_server(cycle.settings, args.port)
            with timer.phase(f"{args.weeks} weeks"):
                reports = cycle.replay(start, args.weeks)
    finally:
        cycle.finish()
    Console(highlight=False, width=140).print(report_table(reports))
    timer.print_summary()
    if not reports:
        print("the offline store already holds the latest week: nothing to do")


if __name__ == "__main__":
    run_cli(main)
