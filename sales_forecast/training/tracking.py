"""MLflow: reachability up front, then one run with params, per-epoch losses, metrics, the model (registered),
the Forecaster bundle, the plot and the data tags.

Serving contract: the network is logged with ``mlflow.pytorch.log_model(name="model")`` and registered; the
Forecaster bundle is logged under the artifact path ``forecaster`` (contract.FORECASTER_ARTIFACT).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sales_forecast.contract import FORECASTER_ARTIFACT, NETWORK_ARTIFACT
from sales_forecast.errors import PipelineError
from sales_forecast.forecaster import Forecaster
from sales_forecast.training.fit import FitResult

PLOT_ARTIFACT = "plots/forecast_vs_actual.png"
NETWORK_INPUTS = ("x", "store", "dept", "events")  # the network's forward arguments
BACKTEST_PLOT = "plots/backtest_wmae.png"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def pip_requirements() -> list[str]:
    # Explicit requirements: MLflow's inference imports the model in a subprocess (10 s here).
    torch_version = version("torch").split("+")[0]
    return [f"torch=={torch_version}", f"numpy=={version('numpy')}", f"cloudpickle=={version('cloudpickle')}"]


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    url: str
    model_version: str


@dataclass(frozen=True)
class RunContent:
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    fit: FitResult
    example: pd.DataFrame  # a few feature rows: the input example and signature come from them
    figure: Figure
    evaluation: dict
    figures: dict[str, Figure] = field(default_factory=dict)  # more plots, by artifact path


def _epoch_metrics(fit: FitResult, run_id: str):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for log in fit.history:
        metrics.append(Metric("train_loss", log.train_loss, now, log.epoch, run_id=run_id))
        metrics.append(Metric("val_wmae", log.validation_wmae, now, log.epoch, run_id=run_id))
        metrics.append(Metric("val_score", log.validation_score, now, log.epoch, run_id=run_id))
    return metrics


def network_signature(inputs: tuple[np.ndarray, ...], outputs: np.ndarray):
    """Tensor specs of the network's four inputs (by name) and its output, the batch dimension variable."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    specs = [TensorSpec(array.dtype, (-1, *array.shape[1:]), name) for name, array in zip(NETWORK_INPUTS, inputs,
                                                                                          strict=True)]
    return ModelSignature(inputs=Schema(specs), outputs=Schema([TensorSpec(outputs.dtype, (-1, outputs.shape[1]))]))


def log_network(forecaster: Forecaster, example: pd.DataFrame, registered_model: str):
    import mlflow.pytorch
    import torch

    prepared = forecaster.prepare(example)
    inputs = (prepared.x, prepared.store, prepared.dept, prepared.events)
    with torch.no_grad():
        outputs = forecaster.model(*prepared.tensors()).numpy()
    return mlflow.pytorch.log_model(
        forecaster.model, name=NETWORK_ARTIFACT, signature=network_signature(inputs, outputs), input_example=inputs,
        pip_requirements=pip_requirements(), registered_model_name=registered_model)


def log_training_run(uri: str, experiment: str, run_name: str | None, registered_model: str,
                     content: RunContent) -> LoggedRun:
    """One MLflow run holding everything; the network is registered as a new version of ``registered_model``."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.log_params(content.params)
        mlflow.set_tags(content.tags)
        client.log_batch(run_id, metrics=_epoch_metrics(content.fit, run_id))
        mlflow.log_metrics(content.metrics)
        mlflow.log_dict(content.evaluation, "evaluation.json")
        mlflow.log_figure(content.figure, PLOT_ARTIFACT)
        for path, figure in content.figures.items():
            mlflow.log_figure(figure, path)
        with tempfile.TemporaryDirectory() as bundle:
            content.fit.forecaster.save(Path(bundle))
            mlflow.log_artifacts(bundle, artifact_path=FORECASTER_ARTIFACT)
        info = log_network(content.fit.forecaster, content.example, registered_model)
    if info.registered_model_version is None:
        raise PipelineError(f"MLflow did not register run {run_id} as {registered_model!r}")
    return LoggedRun(run_id=run_id, experiment_id=experiment_id, url=run_url(uri, experiment_id, run_id),
                     model_version=str(info.registered_model_version))


def example_rows(frame: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    return frame.iloc[np.linspace(0, len(frame) - 1, num=min(rows, len(frame)), dtype=int)]
