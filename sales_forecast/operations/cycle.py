"""The weekly cycle: new actuals arrive, features move forward, last week's forecasts are scored, drift is
measured, a challenger is trained when the policy says so, the champion gate decides, and every series gets its
next-week forecast from the (possibly new) champion.

Two ways to run it (04_weekly_cycle.py):
- replay (``--weeks N``, the local demo): step 1 loads the history ending N weeks before the latest Friday, the
  first champion is trained, then the N weeks up to the latest Friday arrive one by one;
- catch-up (``--catch-up``, the Kubernetes CronJob): the weeks between the offline store's latest week and the
  latest Friday arrive (normally one).
Only a week within the feature ttl of now reaches the online store (see features/append.py): the replay's past
weeks are forecast through the offline point-in-time join, its last week (the current one) online as well.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from rich.table import Table

from sales_forecast import model_dir, stack
from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError
from sales_forecast.features.append import append_week, read_dataset
from sales_forecast.features.generator import Shape, latest_friday
from sales_forecast.features.pipeline import run_feature_pipeline
from sales_forecast.operations import monitoring
from sales_forecast.operations.forecasts import batch_forecast, made_as_of
from sales_forecast.timing import console
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import TrainingResult, run_training

WEEK = dt.timedelta(days=7)
RETRAIN_MODES = ("weekly", "on-alert", "never")


@dataclass(frozen=True)
class RetrainPolicy:
    """When to train a challenger: every week, or only when realized accuracy or drift crosses a threshold."""

    mode: str = "weekly"
    max_wmae_ratio: float = 1.0  # alert when the served model's realized WMAE exceeds this x the naive forecast's
    max_psi: float = 0.25  # alert when any feature's PSI exceeds this (0.25: a large shift, by the usual rule)

    def alerts(self, accuracy: monitoring.WeekAccuracy | None, drift: pd.Series) -> list[str]:
        found = []
        if accuracy is not None and accuracy.ratio > self.max_wmae_ratio:
            found.append(f"WMAE {accuracy.wmae:,.0f} is {accuracy.ratio:.2f}x the naive forecast's")
        worst = drift.dropna()
        if not worst.empty and worst.max() > self.max_psi:
            found.append(f"PSI of {worst.idxmax()} is {worst.max():.2f}")
        return found

    def retrain(self, alerts: list[str]) -> bool:
        return self.mode == "weekly" or (self.mode == "on-alert" and bool(alerts))


@dataclass(frozen=True)
class WeekReport:
    week: dt.date
    accuracy: monitoring.WeekAccuracy | None  # None: no forecasts had been made for this week
    psi_max: float
    psi_feature: str
    retrained: bool
    promoted: bool
    decision: str
    champion_version: str
    online: bool  # the week reached the online store (it is current)
    seconds: float
    served_version: str | None = None  # what the model server answered with after the week (when one is followed)


class WeeklyCycle:
    """One cycle's state: resolved settings, the policy, the training parameters and the MLflow monitoring run."""

    def __init__(self, settings: Settings, policy: RetrainPolicy, params: TrainingParams,
                 on_promotion: Callable[[str], None] | None = None,
                 served_version: Callable[[], str | None] | None = None):
        self.settings = stack.ensure_services(settings, mlflow=True, ray=True)
        self.policy = policy
        self.params = params
        self.on_promotion = on_promotion  # e.g. roll the InferenceService, wait for the local server to switch
        self.served_version = served_version  # asks the model server what it serves, for the week's report
        self.run_id: str | None = None

    # ------------------------------------------------------------------ the pieces
    def train(self, run_name: str, week: dt.date | None) -> TrainingResult:
        """The first champion (``week`` None) from scratch; a week's challenger continues the champion."""
        tags = {**self.params.tags, **({"cycle_week": week.isoformat()} if week else {})}
        params = dataclasses.replace(self.params, run_name=run_name, tags=tags)
        if week is not None:
            params = dataclasses.replace(params, warm_start=True)
        result = run_training(params, self.settings)
        assert result is not None  # this process is rank 0
        if result.decision.promote and self.on_promotion:
            self.on_promotion(result.run.model_version)
        return result

    def champion(self) -> model_dir.Bundle:
        try:
            return model_dir.load(self.settings.model_dir)
        except PipelineError as exc:
            raise PipelineError(f"no champion to forecast with in {self.settings.model_dir}: {exc}") from exc

    def reference_window(self, bundle: model_dir.Bundle, week: dt.date) -> tuple[dt.date, dt.date]:
        """The champion's training weeks (from its bundle's info), else the year before ``week``."""
        train_range = bundle.info.get("train_range", "")
        if ".." in train_range:
            start, end = (dt.date.fromisoformat(part) for part in train_range.split(".."))
            return start, end
        return week - 52 * WEEK, week - WEEK

    def forecast(self, as_of: dt.date) -> model_dir.Bundle:
        bundle = self.champion()
        result = batch_forecast(self.settings, bundle, as_of)
        console.print(f"  forecast {len(result.forecasts):,} series for the week ending {as_of + WEEK} with "
                      f"v{bundle.info.get('version', '?')}" + (f" ({result.skipped} without history)"
                                                              if result.skipped else ""))
        return bundle

    # ------------------------------------------------------------------ one week
    def run_week(self, week: dt.date) -> WeekReport:
        started = time.perf_counter()
        console.rule(f"[bold]week ending {week}")
        appended = append_week(self.settings, week)
        accuracy = monitoring.score_week(self.settings, week)
        bundle = self.champion()
        drift = monitoring.feature_drift(self.settings, week, self.reference_window(bundle, week))
        alerts = self.policy.alerts(accuracy, drift)
        retrained = self.policy.retrain(alerts)
        promoted, decision = False, "; ".join(alerts) or "no alert"
        if retrained:
            result = self.train(f"weekly {week}", week)
            promoted, decision = result.decision.promote, result.decision.reason
        bundle = self.forecast(week)
        worst = drift.dropna()
        report = WeekReport(
            week=week, accuracy=accuracy, psi_max=float(worst.max()) if not worst.empty else float("nan"),
            psi_feature=str(worst.idxmax()) if not worst.empty else "", retrained=retrained, promoted=promoted,
            decision=decision, champion_version=str(bundle.info.get("version", "?")), online=appended.materialized,
            seconds=time.perf_counter() - started,
            served_version=self.served_version() if self.served_version else None)
        self.log(report)
        return report

    # ------------------------------------------------------------------ MLflow
    def log(self, report: WeekReport) -> None:
        """The week's figures as metrics of the cycle's monitoring run (step: the week's number), and the
        accuracy-per-week plot rebuilt from the table."""
        import mlflow

        mlflow.set_tracking_uri(self.settings.tracking_uri)
        experiment = mlflow.set_experiment(f"{self.settings.mlflow_experiment}-monitoring").experiment_id
        client = mlflow.MlflowClient(self.settings.tracking_uri)
        if self.run_id is None:
            self.run_id = client.create_run(experiment, run_name=f"weekly cycle from {report.week}").info.run_id
        step = (report.week - dt.date(1970, 1, 2)).days // 7
        metrics = {"psi_max": report.psi_max, "retrained": float(report.retrained),
                   "promoted": float(report.promoted), "champion_version": float(report.champion_version)
                   if report.champion_version.isdigit() else float("nan")}
        if report.accuracy is not None:
            metrics.update({"realized_wmae": report.accuracy.wmae, "naive_wmae": report.accuracy.naive_wmae,
                            "realized_wape": report.accuracy.wape})
            if report.accuracy.coverage is not None:
                metrics["interval_coverage"] = report.accuracy.coverage
        for key, value in metrics.items():
            if value == value:  # not NaN
                client.log_metric(self.run_id, key, value, step=step)
        history = monitoring.accuracy_history(self.settings)
        if not history.empty:
            client.log_figure(self.run_id, monitoring.accuracy_figure(history), "monitoring/accuracy_per_week.png")

    def finish(self) -> None:
        if self.run_id is not None:
            import mlflow

            mlflow.MlflowClient(self.settings.tracking_uri).set_terminated(self.run_id)

    # ------------------------------------------------------------------ the two modes
    def prepare_replay(self, shape: Shape, weeks: int) -> dt.date:
        """The replay's start: the history ending ``weeks`` before the latest Friday (offline only), a first
        champion, and its forecasts; returns the history's last week."""
        latest = latest_friday(dt.datetime.now(dt.UTC).date())
        start = latest - weeks * WEEK
        console.rule(f"[bold]history up to {start}")
        run_feature_pipeline(dataclasses.replace(shape, end_date=start), self.settings,
                             online=False).timer.print_summary()
        first = self.train(f"first champion {start}", None)
        console.print(f"first model: {'promoted' if first.decision.promote else 'not promoted'}: "
                      f"{first.decision.reason}")
        self.forecast(start)  # fails in one line when no champion exists at all
        return start

    def replay(self, start: dt.date, weeks: int) -> list[WeekReport]:
        """The ``weeks`` after ``start`` (prepare_replay's), one by one."""
        return [self.run_week(start + k * WEEK) for k in range(1, weeks + 1)]

    def catch_up(self) -> list[WeekReport]:
        """Every week between the offline store's latest and the latest Friday (none when it is current); the latest
        loaded week again first when its forecasts are missing (a run that failed after appending it)."""
        latest = latest_friday(dt.datetime.now(dt.UTC).date())
        last = read_dataset(self.settings).last_week
        weeks = [] if made_as_of(self.settings, last) else [self.run_week(last)]
        while last + WEEK <= latest:
            last += WEEK
            weeks.append(self.run_week(last))
        return weeks


def report_table(reports: list[WeekReport]) -> Table:
    """week, the served model's realized WMAE, the naive WMAE, drift, retrained?, promoted?, champion version."""
    table = Table(title="weekly cycle")
    for column in ("week", "served WMAE", "naive WMAE", "coverage", "drift (max PSI)", "retrained", "promoted",
                   "champion", "serving", "online", "seconds"):
        table.add_column(column, justify="left" if column in ("week", "drift (max PSI)") else "right")
    for report in reports:
        accuracy = report.accuracy
        table.add_row(
            str(report.week), f"{accuracy.wmae:,.0f}" if accuracy else "-",
            f"{accuracy.naive_wmae:,.0f}" if accuracy else "-",
            f"{accuracy.coverage:.0%}" if accuracy and accuracy.coverage is not None else "-",
            f"{report.psi_max:.3f} ({report.psi_feature})", "yes" if report.retrained else "no",
            "yes" if report.promoted else "no", f"v{report.champion_version}",
            f"v{report.served_version}" if report.served_version else "-", "yes" if report.online else "no",
            f"{report.seconds:.1f}")
    return table
