"""Serving the MLflow registry's champion, as training publishes it: the Forecaster bundle as run artifacts under
``forecaster``, the network logged with mlflow.pytorch, a registered version with the alias ``champion``.

A real MLflow server (``mlflow_uri``) under a test-only model name, so the training tests' ``sales-forecast``
is left alone. Ends with ``03_inference.py --backend local`` run as the user would, against that champion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from sales_forecast.config import Settings
from sales_forecast.contract import FORECASTER_ARTIFACT
from sales_forecast.errors import PipelineError
from sales_forecast.forecaster import Forecaster
from sales_forecast.serving.client import SAMPLE_REQUEST
from sales_forecast.serving.model_source import ModelSource, champion_version, load_forecaster
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from sales_forecast.training.tracking import example_rows, log_network
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_MODEL = "sales-forecast-serving-test"
TEST_URI = f"models:/{TEST_MODEL}@champion"


@pytest.fixture(scope="module")
def bundle(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    fit_quick_forecaster(labelled_rows(settings), seed=5).save(directory)
    return directory


@pytest.fixture(scope="module")
def champion(mlflow_uri: str, bundle: Path, settings: Settings) -> str:
    """Publish the bundle the way training does; returns the registered version."""
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("serving-tests")
    with mlflow.start_run():
        mlflow.log_artifacts(str(bundle), artifact_path=FORECASTER_ARTIFACT)
        info = log_network(Forecaster.load(bundle), example_rows(labelled_rows(settings)), TEST_MODEL)
    version = str(info.registered_model_version)
    MlflowClient(mlflow_uri).set_registered_model_alias(TEST_MODEL, "champion", version)
    return version


def test_champion_alias_loads_the_logged_bundle(mlflow_uri: str, champion: str, bundle: Path,
                                                latest_rows: pd.DataFrame) -> None:
    loaded = load_forecaster(ModelSource(model_uri=TEST_URI, tracking_uri=mlflow_uri))
    assert f"version {champion}" in loaded.origin
    np.testing.assert_array_equal(loaded.forecaster.predict(latest_rows),
                                  Forecaster.load(bundle).predict(latest_rows))
    assert champion_version(mlflow_uri, TEST_URI) == champion


def test_missing_champion_is_a_clear_error(mlflow_uri: str, champion: str) -> None:
    with pytest.raises(PipelineError, match="run 02_training.py"):
        load_forecaster(ModelSource(model_uri=f"models:/{TEST_MODEL}@no-such-alias", tracking_uri=mlflow_uri))
    with pytest.raises(PipelineError, match="models:/<name>@<alias>"):
        load_forecaster(ModelSource(model_uri="runs:/abc/model", tracking_uri=mlflow_uri))


def test_model_dir_without_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="holds no model bundle"):
        load_forecaster(ModelSource(model_dir=tmp_path))


def test_03_inference_local_serves_the_champion(settings: Settings, mlflow_uri: str, champion: str, bundle: Path,
                                                latest_rows: pd.DataFrame) -> None:
    port = free_port()
    env = {**os.environ, **settings.environment(), "COLUMNS": "200"}
    for name in ("POSTGRES_HOST", "POSTGRES_USER", "POSTGRES_PASSWORD"):
        env.pop(name)  # the embedded defaults, as a user runs it; only the database differs
    result = subprocess.run([sys.executable, "03_inference.py", "--port", str(port), "--model-uri", TEST_URI,
                             "--requests", "20", "--stop"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"predictions"')))
    keys = [(i["store"], i["dept"]) for i in SAMPLE_REQUEST["instances"]]
    np.testing.assert_allclose(answer["predictions"], Forecaster.load(bundle).predict(latest_rows.loc[keys]),
                               rtol=1e-6)
    assert "latency (2 instances, client side): p50" in result.stdout
    assert f"{TEST_URI} = version {champion}" in result.stderr
    assert not model_server.is_ready(model_server.url_of(port))  # --stop
