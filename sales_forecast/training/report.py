"""What step 2 shows: the holdout metrics of the model and the baselines, the MLflow run and the timings (printed),
and the forecast-vs-actual plot of a few series (logged to MLflow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from sales_forecast.training.backtest import Backtest
from sales_forecast.training.dataset import LABEL, TIMESTAMP
from sales_forecast.training.metrics import Evaluation

stdout = Console(highlight=False, width=110)
WEEK = pd.Timedelta(days=7)


def metrics_table(evaluation: Evaluation, title: str) -> Table:
    table = Table(title=title)
    for column in ("forecast", "WMAE", "WAPE", "RMSE"):
        table.add_column(column, justify="left" if column == "forecast" else "right")
    best = evaluation.best_baseline[0]
    table.add_row("[bold]model[/]", f"[bold]{evaluation.model.wmae:,.1f}[/]", f"{evaluation.model.wape:.2%}",
                  f"{evaluation.model.rmse:,.1f}")
    for name, scores in evaluation.baselines.items():
        marker = " (best baseline)" if name == best else ""
        table.add_row(f"{name}{marker}", f"{scores.wmae:,.1f}", f"{scores.wape:.2%}", f"{scores.rmse:,.1f}")
    return table


def backtest_table(backtest: Backtest) -> Table:
    totals = backtest.total_wmae()
    names = [name for name in totals if name != "model"]
    table = Table(title=f"rolling-origin backtest: WMAE per origin and in total (skill {backtest.skill:+.4f})")
    for column in ("origin (prediction weeks)", "model", *names, "skill", "coverage"):
        table.add_column(column, justify="left" if column.startswith("origin") else "right")
    for origin in backtest.origins:
        e = origin.evaluation
        table.add_row(origin.test_range, f"[bold]{e.model.wmae:,.1f}[/]",
                      *(f"{e.baselines[n].wmae:,.1f}" if n in e.baselines else "-" for n in names),
                      f"{e.skill:+.4f}", f"{e.coverage:.3f}" if e.coverage is not None else "-")
    table.add_row("total", f"[bold]{totals['model']:,.1f}[/]", *(f"{totals[n]:,.1f}" for n in names),
                  f"{backtest.skill:+.4f}", "")
    return table


def print_report(result) -> None:
    """``result`` is a pipeline.TrainingResult."""
    evaluation = result.evaluation
    test_range = result.ranges["test_range"]
    stdout.print(metrics_table(evaluation, f"holdout: {evaluation.rows:,} rows, prediction weeks {test_range}"))
    stdout.print(f"skill = 1 - WMAE(model) / WMAE({evaluation.best_baseline[0]}) = {evaluation.skill:+.4f}")
    if evaluation.coverage is not None:
        stdout.print(f"P10-P90 interval coverage on the holdout: {evaluation.coverage:.3f} (calibrated: 0.80)")
    if result.backtest is not None:
        stdout.print(backtest_table(result.backtest))
    stdout.print(f"MLflow run {result.run.run_id}: {result.run.url}")
    verdict = "promoted to @champion" if result.decision.promote else "not promoted"
    stdout.print(f"registered {result.registered_model} v{result.run.model_version}, {verdict}: "
                 f"{result.decision.reason}")
    if result.published:
        stdout.print(f"model bundle published to {result.published}")
    result.timer.print_summary()


def largest_series(test: pd.DataFrame, count: int) -> list[tuple[int, int]]:
    """The (store, dept) of the ``count`` series with the largest holdout sales."""
    totals = test.groupby(["store", "dept"])[LABEL].sum().sort_values(ascending=False, kind="stable")
    return [(int(store), int(dept)) for store, dept in totals.index[:count]]


def forecast_figure(history: pd.DataFrame, test: pd.DataFrame, model: np.ndarray, baseline_name: str,
                    baseline: np.ndarray, count: int) -> Figure:
    """One panel per series (the ``count`` largest in the holdout), x = the week each label belongs to."""
    series = largest_series(test, count)
    forecasts = test.assign(model=model, baseline=baseline)
    figure = Figure(figsize=(11, 2.6 * max(len(series), 1)), layout="constrained")
    axes = figure.subplots(max(len(series), 1), 1, squeeze=False)[:, 0]
    for axis, (store, dept) in zip(axes, series, strict=False):
        actual = history[(history["store"] == store) & (history["dept"] == dept)].sort_values(TIMESTAMP)
        predicted = forecasts[(forecasts["store"] == store) & (forecasts["dept"] == dept)].sort_values(TIMESTAMP)
        axis.plot(actual[TIMESTAMP] + WEEK, actual[LABEL], color="black", linewidth=1.2, label="actual")
        axis.plot(predicted[TIMESTAMP] + WEEK, predicted["model"], marker="o", markersize=3, label="model")
        axis.plot(predicted[TIMESTAMP] + WEEK, predicted["baseline"], linestyle="--", label=baseline_name)
        axis.axvline(predicted[TIMESTAMP].min() + WEEK, color="grey", linewidth=0.8, linestyle=":")
        axis.set_title(f"store {store}, dept {dept}", fontsize=9)
        axis.set_ylabel("weekly sales")
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle("Next-week forecasts on the holdout (right of the dotted line) vs actual sales")
    return figure
