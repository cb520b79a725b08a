"""Forecast vs actual for a few series: the whole label history, and the holdout forecasts of the model and the
best baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sales_forecast.training.dataset import LABEL, TIMESTAMP

WEEK = pd.Timedelta(days=7)


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
