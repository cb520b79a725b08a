"""What step 2 prints: the MLflow run, the holdout metrics of the model and the baselines, and the timings."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sales_forecast.training.metrics import Evaluation

stdout = Console(highlight=False, width=110)


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


def print_report(result) -> None:
    """``result`` is a pipeline.TrainingResult."""
    evaluation = result.evaluation
    test_range = result.ranges["test_range"]
    stdout.print(metrics_table(evaluation, f"holdout: {evaluation.rows:,} rows, prediction weeks {test_range}"))
    stdout.print(f"skill = 1 - WMAE(model) / WMAE({evaluation.best_baseline[0]}) = {evaluation.skill:+.4f}")
    stdout.print(f"MLflow run {result.run.run_id}: {result.run.url}")
    verdict = "promoted to @champion" if result.decision.promote else "not promoted"
    stdout.print(f"registered {result.registered_model} v{result.run.model_version}, {verdict}: "
                 f"{result.decision.reason}")
    if result.published:
        stdout.print(f"model bundle written to {result.published[0].parent}")
    result.timer.print_summary()
