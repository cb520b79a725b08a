"""Holdout metrics and the baselines every model must beat.

WMAE (holiday weeks weighted 5, as in Walmart's competition) is the headline; WAPE and RMSE are reported too, and
the share of actuals inside the P10-P90 interval (coverage; 0.8 when calibrated). R^2 is not (the between-series
variance makes it near 1 for any forecast that knows the series level), nor MAPE (zero and negative sales break
it). Every baseline is scored on exactly the model's rows, or not at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY, SEASONAL_NAIVE

HOLIDAY_WEIGHT = 5.0


def holiday_weights(is_holiday: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(is_holiday, dtype=bool), HOLIDAY_WEIGHT, 1.0)


def wmae(actual: np.ndarray, forecast: np.ndarray, is_holiday: np.ndarray) -> float:
    weights = holiday_weights(is_holiday)
    return float(np.sum(weights * np.abs(actual - forecast)) / np.sum(weights))


def wape(actual: np.ndarray, forecast: np.ndarray) -> float:
    return float(np.sum(np.abs(actual - forecast)) / np.sum(np.abs(actual)))


def rmse(actual: np.ndarray, forecast: np.ndarray) -> float:
    return float(np.sqrt(np.mean((actual - forecast) ** 2)))


@dataclass(frozen=True)
class Scores:
    wmae: float
    wape: float
    rmse: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{name}": value for name, value in asdict(self).items()}


def score(frame: pd.DataFrame, forecast: np.ndarray) -> Scores:
    actual = frame[LABEL].to_numpy(dtype="float64")
    forecast = np.asarray(forecast, dtype="float64")
    return Scores(wmae(actual, forecast, frame[LABEL_IS_HOLIDAY].to_numpy()), wape(actual, forecast),
                  rmse(actual, forecast))


def baseline_forecasts(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Naive forecasts of next week's sales from the same rows: last week's sales, the mean of the last four
    weeks, and (only when every row has 52 weeks of history before its target week) the same week last year."""
    forecasts = {
        "naive_lag_1": frame["sales_lag_1"].to_numpy(dtype="float64"),
        "mean_last_4": frame["sales_mean_4"].to_numpy(dtype="float64"),
    }
    seasonal = frame[SEASONAL_NAIVE].to_numpy(dtype="float64")
    if len(seasonal) and np.isfinite(seasonal).all():
        forecasts["seasonal_lag_52"] = seasonal
    return forecasts


def baseline_scores(frame: pd.DataFrame, extra: dict[str, np.ndarray] | None = None) -> dict[str, Scores]:
    """The naive baselines and ``extra`` ones (statsforecast's), each only when it forecasts every row."""
    forecasts = {**baseline_forecasts(frame), **(extra or {})}
    return {name: score(frame, forecast) for name, forecast in forecasts.items()
            if len(forecast) and np.isfinite(forecast).all()}


def coverage(frame: pd.DataFrame, low: np.ndarray, high: np.ndarray) -> float:
    actual = frame[LABEL].to_numpy(dtype="float64")
    return float(np.mean((actual >= low) & (actual <= high)))


def best_baseline(baselines: dict[str, Scores]) -> tuple[str, Scores]:
    return min(baselines.items(), key=lambda item: item[1].wmae)


def skill(model_wmae: float, baseline_wmae: float) -> float:
    """1 - WMAE(model) / WMAE(best baseline): above 0 means the model beats every naive forecast."""
    return 1.0 - model_wmae / baseline_wmae


@dataclass(frozen=True)
class Evaluation:
    """The model and every baseline scored on the same holdout rows."""

    model: Scores
    baselines: dict[str, Scores]
    rows: int
    coverage: float | None = None  # P10-P90

    @property
    def best_baseline(self) -> tuple[str, Scores]:
        return best_baseline(self.baselines)

    @property
    def skill(self) -> float:
        return skill(self.model.wmae, self.best_baseline[1].wmae)

    def metrics(self) -> dict[str, float]:
        values = self.model.as_dict("test_")
        for name, scores in self.baselines.items():
            values.update(scores.as_dict(f"baseline_{name}_"))
        values["best_baseline_wmae"] = self.best_baseline[1].wmae
        values["skill"] = self.skill
        if self.coverage is not None:
            values["coverage_p10_p90"] = self.coverage
        return values


def evaluate(frame: pd.DataFrame, forecast: np.ndarray, extra: dict[str, np.ndarray] | None = None,
             interval: tuple[np.ndarray, np.ndarray] | None = None) -> Evaluation:
    """The model's point ``forecast`` and every baseline on ``frame``'s rows; ``interval``: its (P10, P90)."""
    return Evaluation(model=score(frame, forecast), baselines=baseline_scores(frame, extra), rows=len(frame),
                      coverage=coverage(frame, *interval) if interval is not None else None)
