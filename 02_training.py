#!/usr/bin/env python
"""Step 2: point-in-time training set from Feast -> PyTorch model -> holdout metrics vs naive baselines ->
MLflow run, registered model `sales-forecast`, alias `champion` when it wins.

Backends (all run the same training, sales_forecast.training.pipeline):
  local          in this process, against the local stack (default)
  local-process  through Kubeflow's TrainerClient with LocalProcessBackendConfig (torchrun in a fresh venv)
  kubernetes     as a Kubeflow TrainJob (runtime torch-distributed) in namespace K8S_NAMESPACE

MLflow: MLFLOW_TRACKING_URI when set; otherwise (local backends) the local stack's MLflow server, started if
needed. On Kubernetes the pods read it from ConfigMap pipeline-config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sales_forecast.cli import from_environment, positive_float, positive_int, run_cli
from sales_forecast.config import Settings, load_settings
from sales_forecast.training.params import TrainingParams


def layer_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1: {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainingParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(settings=from_environment(parser, load_settings))
    parser.add_argument("--backend", choices=["local", "local-process", "kubernetes"], default="local")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="maximum epochs")
    parser.add_argument("--patience", type=positive_int, default=defaults.patience,
                        help="stop after this many epochs without a better validation score")
    parser.add_argument("--lr", type=positive_float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--hidden", type=layer_sizes, default=defaults.hidden, help="hidden layer sizes, e.g. 128,64")
    parser.add_argument("--test-weeks", type=positive_int, default=defaults.test_weeks,
                        help="the last weeks held out for the metrics")
    parser.add_argument("--validation-weeks", type=positive_int, default=defaults.validation_weeks,
                        help="the weeks before the holdout that steer early stopping")
    parser.add_argument("--time-budget", type=positive_float, default=defaults.time_budget,
                        help="CPU seconds of training; no new epoch starts after them")
    parser.add_argument("--backtest", type=positive_int, default=None, metavar="K",
                        help="also a rolling-origin backtest: K origins, each a model trained on the weeks before it")
    parser.add_argument("--backtest-weeks", type=positive_int, default=defaults.backtest_weeks,
                        help="holdout weeks per backtest origin (and the distance between origins)")
    parser.add_argument("--no-statsforecast", action="store_true",
                        help="skip the statsforecast baselines (SES; MSTL + AutoETS with two years of history)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=positive_int, default=defaults.threads, help="CPU threads per process")
    parser.add_argument("--run-name", default=None, help="MLflow run name")
    parser.add_argument("--registered-model", default=defaults.registered_model,
                        help="MLflow registered model name (the alias `champion` is set on it)")
    parser.add_argument("--num-nodes", type=positive_int, default=1, help="TrainJob nodes (kubernetes)")
    parser.add_argument("--cpu", default="2", help="CPU per node (kubernetes)")
    parser.add_argument("--memory", default="4Gi", help="memory per node (kubernetes)")
    parser.add_argument("--timeout", type=positive_int, default=3600, help="seconds to wait for a TrainJob")
    return parser.parse_args(argv)


def training_params(args: argparse.Namespace) -> TrainingParams:
    params = TrainingParams(
        epochs=args.epochs, patience=args.patience, learning_rate=args.lr, batch_size=args.batch_size,
        hidden=args.hidden, test_weeks=args.test_weeks, validation_weeks=args.validation_weeks, seed=args.seed,
        time_budget=args.time_budget, backtest=args.backtest or 0, backtest_weeks=args.backtest_weeks,
        statsforecast=not args.no_statsforecast,
        threads=args.threads, run_name=args.run_name, registered_model=args.registered_model)
    params.check()
    return params


def print_run(settings: Settings, experiment: str, trainjob: str) -> None:
    from sales_forecast.training.trainjob import find_run

    found = find_run(settings.tracking_uri, experiment, trainjob) if settings.mlflow_tracking_uri else None
    if found:
        print(f"MLflow run {found[0]} (TrainJob {trainjob}): {found[1]}")
    else:
        print(f"TrainJob {trainjob} completed; its log above names the MLflow run")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params, settings = training_params(args), args.settings
    experiment = params.experiment or settings.mlflow_experiment

    if args.backend == "local":
        from sales_forecast.training.pipeline import run_training

        run_training(params, settings)
        return

    from sales_forecast.training.trainjob import new_job_name

    params = dataclasses.replace(params, trainjob=new_job_name())
    if args.backend == "kubernetes":
        from sales_forecast.training.trainjob import run_on_kubernetes

        name = run_on_kubernetes(params, settings, args.num_nodes, {"cpu": args.cpu, "memory": args.memory},
                                 args.timeout)
    else:
        from sales_forecast import stack
        from sales_forecast.training.local_process import run_local_process

        settings = stack.ensure_services(settings, mlflow=True, ray=True)
        name = run_local_process(params, settings, args.timeout)
    print_run(settings, experiment, name)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
