"""Faults stop step 2 with one clear message before anything is logged or registered: an empty training set,
an unreachable MLflow server, a diverging (NaN) loss; and 02_training.py turns them into exit code 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest
from conftest import database_settings

from sales_forecast.config import REPO_ROOT
from sales_forecast.contract import FEATURE_INDEX, FEATURE_TABLE, RAW_INDEX, RAW_TABLE
from sales_forecast.errors import PipelineError
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import build_features
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.load import load_table
from sales_forecast.stack.processes import free_port
from sales_forecast.training.pipeline import train_sales_model

MODEL = "sales-forecast-faults"
EXPERIMENT = "training-faults"


@pytest.fixture(scope="module")
def empty_tables(stack_settings):
    """Step 1's tables and Feast definitions, with no rows."""
    settings = database_settings(stack_settings, "training_empty")
    raw = generate(Shape(stores=1, depts=1, weeks=6, seed=1)).iloc[0:0]
    load_table(settings.postgres, RAW_TABLE, raw, RAW_INDEX)
    load_table(settings.postgres, FEATURE_TABLE, build_features(raw), FEATURE_INDEX)
    fs_ops.apply_definitions(fs_ops.open_store(settings), settings.feast_repo_path)
    return settings


@pytest.fixture
def job_env(monkeypatch, mlflow_uri, tmp_path):
    """Point train_sales_model (which reads its settings from the environment) at a database."""
    def use(settings) -> None:
        monkeypatch.setenv("POSTGRES_DB", settings.postgres.database)
        monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    return use


def assert_nothing_logged(uri: str, tmp_path) -> None:
    client = mlflow.MlflowClient(uri)
    assert client.search_model_versions(f"name = '{MODEL}'") == []
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "models").exists()


def test_empty_training_set(empty_tables, job_env, mlflow_uri, tmp_path) -> None:
    job_env(empty_tables)
    with pytest.raises(PipelineError, match="the training set is empty: 0 entity rows"):
        train_sales_model(registered_model=MODEL)
    assert_nothing_logged(mlflow_uri, tmp_path)


def test_holdout_that_leaves_no_training_weeks(small_features, job_env, mlflow_uri, tmp_path) -> None:
    job_env(small_features[0])
    with pytest.raises(PipelineError, match="the training set is empty: 56 prediction weeks"):
        train_sales_model({"registered_model": MODEL, "test_weeks": 52, "validation_weeks": 4})
    assert_nothing_logged(mlflow_uri, tmp_path)


def test_unreachable_mlflow_fails_fast(small_features, job_env, mlflow_uri, monkeypatch, tmp_path) -> None:
    job_env(small_features[0])
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=f"the MLflow tracking server at {dead} is unreachable"):
        train_sales_model(registered_model=MODEL)
    assert time.perf_counter() - start < 15  # not MLflow's minutes of retries
    assert_nothing_logged(mlflow_uri, tmp_path)


def test_nan_loss(small_features, job_env, mlflow_uri, tmp_path) -> None:
    job_env(small_features[0])
    with pytest.raises(PipelineError, match=r"the training loss became nan in epoch 1 .*lower --lr"):
        train_sales_model({"registered_model": MODEL, "learning_rate": 1e6, "batch_size": 256})
    assert_nothing_logged(mlflow_uri, tmp_path)


def test_unknown_parameter_is_rejected() -> None:
    with pytest.raises(PipelineError, match=r"unknown training parameter\(s\) \['epoch'\]"):
        train_sales_model(epoch=3)


def test_cli_prints_one_line_and_exits_1(small_features, mlflow_uri, tmp_path) -> None:
    env = {**os.environ, "POSTGRES_DB": small_features[0].postgres.database, "MODEL_DIR": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "02_training.py"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is unreachable" in errors[0]
    assert "Traceback" not in done.stderr


def test_cli_rejects_bad_arguments() -> None:
    done = subprocess.run([sys.executable, "02_training.py", "--lr", "0"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and "must be > 0" in done.stderr


def test_an_embedded_mlflow_that_cannot_start_is_reported_when_its_process_ends(tmp_path) -> None:
    """Step 2 launches the embedded MLflow server and reads the training set while it starts; before the first use
    it waits for it (wait_ready; the test session's server is started through it). A server that cannot start, its
    port taken, is reported with its log as soon as its process ends; before, its unreaped process still counted as
    running and the wait lasted until the timeout."""
    from sales_forecast.stack import mlflow_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        mlflow_server.start(tmp_path, busy, wait=False)
        with pytest.raises(PipelineError, match=f"(?s)did not start on port {busy}; log tail:.*in use"):
            mlflow_server.wait_ready(tmp_path, busy, timeout=300)
