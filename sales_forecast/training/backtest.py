"""The rolling-origin backtest: K cutoffs ``backtest_weeks`` apart, ending with the last week; origin k holds out
the ``backtest_weeks`` prediction weeks before its cutoff, steers early stopping on the ``validation_weeks``
before them and trains a fresh model on everything earlier: nothing at or after its holdout. The model and every
baseline are scored per origin on the same rows, and in total (every origin's rows together)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sales_forecast.errors import PipelineError
from sales_forecast.training.dataset import LABEL_IS_HOLIDAY, TIMESTAMP, Split, week_range
from sales_forecast.training.fit import Distributed, fit_forecaster
from sales_forecast.training.metrics import Evaluation, evaluate, holiday_weights, skill
from sales_forecast.training.params import TrainingParams


@dataclass(frozen=True)
class Origin:
    cutoff: str  # the first prediction week held out
    test_range: str
    evaluation: Evaluation
    weight: float  # the holdout's summed holiday weights: the origin's share of the total WMAE
    best_epoch: int


@dataclass(frozen=True)
class Backtest:
    origins: list[Origin]

    def total_wmae(self) -> dict[str, float]:
        """WMAE of the model and of each baseline scored at every origin, over all origins' rows."""
        weights = np.array([origin.weight for origin in self.origins])
        names = set.intersection(*(set(origin.evaluation.baselines) for origin in self.origins))
        totals = {"model": [origin.evaluation.model.wmae for origin in self.origins]}
        totals.update({name: [origin.evaluation.baselines[name].wmae for origin in self.origins]
                       for name in sorted(names)})
        return {name: float(np.dot(values, weights) / weights.sum()) for name, values in totals.items()}

    @property
    def skill(self) -> float:
        totals = self.total_wmae()
        return skill(totals["model"], min(value for name, value in totals.items() if name != "model"))

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for k, origin in enumerate(self.origins, start=1):
            values[f"backtest_{k}_model_wmae"] = origin.evaluation.model.wmae
            values.update({f"backtest_{k}_{name}_wmae": scores.wmae
                           for name, scores in origin.evaluation.baselines.items()})
            values[f"backtest_{k}_skill"] = origin.evaluation.skill
            if origin.evaluation.coverage is not None:
                values[f"backtest_{k}_coverage_p10_p90"] = origin.evaluation.coverage
        values.update({f"backtest_total_{name}_wmae": value for name, value in self.total_wmae().items()})
        values["backtest_skill"] = self.skill
        return values

    def figure(self) -> Figure:
        figure = Figure(figsize=(9, 4), layout="constrained")
        axis = figure.subplots()
        cutoffs = [origin.cutoff for origin in reversed(self.origins)]
        names = ["model", *sorted(set.union(*(set(o.evaluation.baselines) for o in self.origins)))]
        for name in names:
            values = [o.evaluation.model.wmae if name == "model" else
                      (o.evaluation.baselines[name].wmae if name in o.evaluation.baselines else np.nan)
                      for o in reversed(self.origins)]
            axis.plot(cutoffs, values, marker="o", linewidth=2.2 if name == "model" else 1.0,
                      linestyle="-" if name == "model" else "--", label=name)
        axis.set_xlabel("origin (first held-out prediction week)")
        axis.set_ylabel("WMAE")
        axis.set_title(f"Rolling-origin backtest: {len(self.origins)} origins, skill {self.skill:+.3f} in total")
        axis.legend(fontsize=8)
        return figure


def _origin_weeks(frame: pd.DataFrame, offset: int, test_weeks: int, validation_weeks: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(validation weeks, holdout weeks) of the origin ``offset`` weeks before the last week."""
    weeks = np.sort(frame[TIMESTAMP].unique())
    end = len(weeks) - offset
    if end - test_weeks - validation_weeks < 1:
        raise PipelineError(f"the backtest origin {offset} weeks before the last week leaves no training weeks: "
                            "lower --backtest or load more weeks")
    return weeks[end - test_weeks - validation_weeks:end - test_weeks], weeks[end - test_weeks:end]


def origin_split(frame: pd.DataFrame, offset: int, test_weeks: int, validation_weeks: int) -> Split:
    """The split whose holdout is the ``test_weeks`` prediction weeks ending ``offset`` weeks before the last."""
    validation, test = _origin_weeks(frame, offset, test_weeks, validation_weeks)
    stamps = frame[TIMESTAMP]
    return Split(train=frame[stamps < validation[0]].reset_index(drop=True),
                 validation=frame[stamps.isin(validation)].reset_index(drop=True),
                 test=frame[stamps.isin(test)].reset_index(drop=True))


def origin_holdouts(frame: pd.DataFrame, params: TrainingParams) -> list[pd.DataFrame]:
    """Each origin's holdout rows (store, dept, event timestamp), in ``run_backtest``'s order."""
    holdouts = []
    for k in range(params.backtest):
        test = _origin_weeks(frame, k * params.backtest_weeks, params.backtest_weeks, params.validation_weeks)[1]
        holdouts.append(frame.loc[frame[TIMESTAMP].isin(test), ["store", "dept", TIMESTAMP]].reset_index(drop=True))
    return holdouts


def run_backtest(frame: pd.DataFrame, extra: Callable[[int], dict[str, np.ndarray]] | None,
                 params: TrainingParams, dist: Distributed) -> Backtest | None:
    """Every rank fits (DDP); rank 0 scores and returns the backtest, the others None. ``extra(k)``: the
    statsforecast forecasts of origin k's holdout rows."""
    origins = []
    for k in range(params.backtest):
        split = origin_split(frame, k * params.backtest_weeks, params.backtest_weeks, params.validation_weeks)
        fit = fit_forecaster(split, params, dist)
        if not dist.is_main:
            continue
        quantiles = fit.forecaster.predict_quantiles(split.test)
        point = fit.forecaster.model.point
        evaluation = evaluate(split.test, quantiles[:, point], extra(k) if extra else {},
                              (quantiles[:, 0], quantiles[:, -1]))
        origins.append(Origin(cutoff=f"{split.test[TIMESTAMP].min():%Y-%m-%d}", test_range=week_range(split.test),
                              evaluation=evaluation, best_epoch=fit.best_epoch,
                              weight=float(holiday_weights(split.test[LABEL_IS_HOLIDAY].to_numpy()).sum())))
    return Backtest(origins) if dist.is_main else None
