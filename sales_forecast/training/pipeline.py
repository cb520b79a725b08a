"""Step 2 from end to end, the same on every backend: check MLflow, retrieve, split, fit, (backtest,) evaluate
against the baselines, log, register, promote. Faults (MLflow unreachable, an empty training set, a diverging
loss) stop it before anything is logged or registered.

``run_training(params, settings)`` is the typed entry point (02_training.py's local backend calls it);
``train_sales_model(dict)`` is the Kubeflow boundary, the function LocalProcess and TrainJob pods run.

Under torchrun with WORLD_SIZE > 1 rank 0 retrieves the data and shares it, every rank trains its shard with
DDP (the backtest's models too), and only rank 0 evaluates, logs and registers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sales_forecast import model_dir, stack
from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_SERVICE
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.features import store as fs_ops
from sales_forecast.forecaster import BundleFormatError, Forecaster
from sales_forecast.timing import PhaseTimer
from sales_forecast.training import champion as registry
from sales_forecast.training import tracking
from sales_forecast.training.backtest import Backtest, origin_holdouts, run_backtest
from sales_forecast.training.baselines import BaselineProcess
from sales_forecast.training.dataset import (
    LABEL,
    TIMESTAMP,
    Split,
    chronological_split,
    fetch_training_frame,
    week_range,
)
from sales_forecast.training.fit import (
    Distributed,
    FitResult,
    can_start_from,
    cpu_threads,
    distributed_context,
    fit_forecaster,
)
from sales_forecast.training.metrics import Evaluation, baseline_forecasts, evaluate
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.report import forecast_figure


@dataclass(frozen=True)
class TrainingResult:
    run: tracking.LoggedRun
    evaluation: Evaluation
    champion: registry.Champion
    decision: registry.Decision
    fit: FitResult
    rows: dict[str, int]
    ranges: dict[str, str]
    published: Path | None  # the bundle folder ``current`` now points at, when promoted
    timer: PhaseTimer
    registered_model: str
    backtest: Backtest | None = None


class _Silent:
    """The phase timer of ranks other than 0: same interface, no output."""

    @contextlib.contextmanager
    def phase(self, name: str):
        yield

    def note(self, name: str, text: str) -> None:
        pass


def _retrieve(settings: Settings, timer) -> tuple[pd.DataFrame, int]:
    with timer.phase("open the Feast feature store"):
        store = fs_ops.open_store(settings)
    with timer.phase("retrieve training set (Feast point-in-time join)"):
        frame, returned = fetch_training_frame(store, settings.postgres)
        timer.note("retrieve training set (Feast point-in-time join)",
                   f"{returned:,} entity rows, {len(frame):,} with complete features")
    with timer.phase("wait for MLflow"):  # on rank 0 (in dist.share): a failure reaches every rank
        stack.wait_for_mlflow(settings)
    return frame, returned


@dataclass(frozen=True)
class _Holdout:
    predictions: np.ndarray
    extra: dict[str, np.ndarray]  # the statsforecast baselines' forecasts of the holdout rows
    evaluation: Evaluation
    champion: registry.Champion
    decision: registry.Decision


def _evaluate(fit: FitResult, split: Split, uri: str, params: TrainingParams, extra: dict[str, np.ndarray]
              ) -> _Holdout:
    quantiles = fit.forecaster.predict_quantiles(split.test)
    predictions = quantiles[:, fit.forecaster.model.point]
    evaluation = evaluate(split.test, predictions, extra, (quantiles[:, 0], quantiles[:, -1]))
    champion = registry.current_champion(uri, params.registered_model, split.test)
    return _Holdout(predictions, extra, evaluation, champion, registry.decide(evaluation, champion))


def _run_content(params: TrainingParams, frame: pd.DataFrame, split: Split, returned: int, fit: FitResult,
                 holdout: _Holdout, dist: Distributed, backtest: Backtest | None) -> tracking.RunContent:
    evaluation, champion, decision = holdout.evaluation, holdout.champion, holdout.decision
    metrics = {**evaluation.metrics(), "best_epoch": float(fit.best_epoch), "epochs_run": float(fit.epochs_run),
               "train_cpu_seconds": fit.cpu_seconds, **(backtest.metrics() if backtest else {})}
    if champion.holdout_wmae is not None:
        metrics["champion_wmae"] = champion.holdout_wmae
    run_params = {**params.loggable(), "world_size": str(dist.world_size), "entity_rows": str(returned),
                  "train_rows": str(len(split.train)), "validation_rows": str(len(split.validation)),
                  "test_rows": str(len(split.test)), "feature_service": FEATURE_SERVICE}
    tags = {"feature_service": FEATURE_SERVICE, "data_range": week_range(frame),
            "data_start": f"{frame[TIMESTAMP].min():%Y-%m-%d}", "data_end": f"{frame[TIMESTAMP].max():%Y-%m-%d}",
            "world_size": str(dist.world_size), "champion_comparison": champion.note, "promotion": decision.reason,
            **split.describe(), **params.tags}
    if params.trainjob:
        tags["trainjob"] = params.trainjob
    if fit.stopped_by:
        tags["stopped_by"] = fit.stopped_by
    baseline = evaluation.best_baseline[0]
    figure = forecast_figure(frame, split.test, holdout.predictions, baseline,
                             {**baseline_forecasts(split.test), **holdout.extra}[baseline], params.plot_series)
    return tracking.RunContent(
        params=run_params, metrics=metrics, tags=tags, fit=fit, example=tracking.example_rows(split.test),
        figure=figure, evaluation={"metrics": metrics, "decision": decision.reason, "champion": champion.note},
        figures={tracking.BACKTEST_PLOT: backtest.figure()} if backtest else {})


def _promote(fit: FitResult, run: tracking.LoggedRun, holdout: _Holdout, uri: str, params: TrainingParams,
             settings: Settings, split: Split) -> Path:
    """Point ``champion`` at the new version and put its bundle in the shared model directory."""
    registry.promote(uri, params.registered_model, run.model_version)
    return model_dir.publish(fit.forecaster, settings.model_dir, {
        "registered_model": params.registered_model, "version": run.model_version, "run_id": run.run_id,
        "tracking_uri": uri, "test_wmae": f"{holdout.evaluation.model.wmae:.4f}", **split.describe()})


def _warm_start(params: TrainingParams, settings: Settings) -> tuple[Forecaster | None, str]:
    """The champion's Forecaster in the shared model directory to continue from, if it fits ``params``."""
    try:
        bundle = model_dir.load(settings.model_dir)
    except (PipelineError, BundleFormatError) as exc:
        return None, f", from scratch (no champion to start from: {first_line(exc)})"
    version = bundle.info.get("version", "?")
    if not can_start_from(bundle.forecaster, params):
        return None, f", from scratch (champion v{version} has other features or another network)"
    return bundle.forecaster, f", continued from champion v{version}"


def _train(params: TrainingParams, settings: Settings, dist: Distributed) -> TrainingResult | None:
    """The whole step; returns the result on rank 0 and None on the other ranks."""
    timer = PhaseTimer("step 2: training") if dist.is_main else _Silent()
    if dist.is_main:
        with timer.phase("connect PostgreSQL, MLflow and Ray"):
            # an embedded MLflow server starts while the training set is read: its first use is after that
            settings = stack.ensure_services(settings, mlflow=True, ray=True, wait_for_mlflow=False)
    frame, returned = dist.share(lambda: _retrieve(settings, timer))
    split = chronological_split(frame, params.test_weeks, params.validation_weeks)
    baselines = None
    if params.statsforecast and dist.is_main:
        with timer.phase("start the statsforecast baselines (a child process, beside training)"):
            baselines = BaselineProcess(settings, [split.test, *(origin_holdouts(frame, params)
                                                                 if params.backtest else [])])
    if not params.backtest:  # the rows live on in the split; the report plots the labels (at 10x: 2 GiB less)
        frame = frame[["store", "dept", TIMESTAMP, LABEL]]
    with baselines or contextlib.nullcontext():
        return _fit_and_log(params, settings, dist, timer, frame, returned, split, baselines)


def _fit_and_log(params: TrainingParams, settings: Settings, dist: Distributed, timer, frame: pd.DataFrame,
                 returned: int, split: Split, baselines: BaselineProcess | None) -> TrainingResult | None:
    uri = settings.tracking_uri
    start, start_note = _warm_start(params, settings) if params.warm_start else (None, "")
    with timer.phase("train"):
        fit = fit_forecaster(split, params, dist, start)
        timer.note("train", f"{fit.epochs_run} epochs, best {fit.best_epoch}, {len(split.train):,} rows, "
                            f"{dist.world_size} process(es), {fit.cpu_seconds:.1f} CPU s"
                            + (f", stopped by {fit.stopped_by}" if fit.stopped_by else "") + start_note)
    extra: dict[str, np.ndarray] = {}
    if baselines:
        with timer.phase("wait for the statsforecast baselines"):
            extra = baselines.forecasts(0)
    backtest = None
    if params.backtest:
        with timer.phase(f"backtest: {params.backtest} rolling origins"):
            backtest = run_backtest(frame, (lambda k: baselines.forecasts(k + 1)) if baselines else None, params,
                                    dist)
    if not dist.is_main:
        return None
    with timer.phase("evaluate the model and the baselines on the holdout"):
        holdout = _evaluate(fit, split, uri, params, extra)
    content = _run_content(params, frame, split, returned, fit, holdout, dist, backtest)
    with timer.phase("log to MLflow + register"):
        run = tracking.log_training_run(uri, params.experiment or settings.mlflow_experiment, params.run_name,
                                        params.registered_model, content)
        registry.tag_version(uri, params.registered_model, run.model_version, {
            "test_wmae": f"{holdout.evaluation.model.wmae:.4f}", "skill": f"{holdout.evaluation.skill:.4f}",
            "test_range": week_range(split.test)})
    published: Path | None = None
    if holdout.decision.promote:
        with timer.phase("promote to champion"):
            published = _promote(fit, run, holdout, uri, params, settings, split)
    return TrainingResult(
        run=run, evaluation=holdout.evaluation, champion=holdout.champion, decision=holdout.decision, fit=fit,
        rows={"entity": returned, "train": len(split.train), "validation": len(split.validation),
              "test": len(split.test)},
        ranges=split.describe(), published=published, timer=timer, registered_model=params.registered_model,
        backtest=backtest)


def run_training(params: TrainingParams, settings: Settings) -> TrainingResult | None:
    """Step 2 in this process (DDP when torchrun started it); rank 0 prints the report and returns the result."""
    from sales_forecast.training.report import print_report

    with distributed_context() as dist, cpu_threads(params.threads):
        result = _train(params, settings, dist)
    if result is not None:
        print_report(result)
    return result


def train_sales_model(params: dict | None = None, **kwargs):
    """Train, evaluate, log and register the weekly sales model; returns the result on rank 0 (None elsewhere).

    The Kubeflow boundary: LocalProcess and TrainJob pods run this function's source, not this module. Kubeflow
    writes that source into a bash heredoc that is not quoted, so the function imports inside and contains no
    dollar sign, backtick or backslash (tests check this). LocalProcess passes func_args as one positional
    dict, the Kubernetes backend as keyword arguments: both work. Settings come from the environment.
    """
    from sales_forecast.config import load_settings
    from sales_forecast.training.params import TrainingParams
    from sales_forecast.training.pipeline import run_training

    return run_training(TrainingParams.from_dict({**(params or {}), **kwargs}), load_settings())

