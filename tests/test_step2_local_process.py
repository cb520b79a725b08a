"""`02_training.py --backend local-process` end to end: TrainerClient with LocalProcessBackendConfig runs
train_sales_model under torchrun in a fresh venv, against the test PostgreSQL and MLflow server."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from sales_forecast.config import REPO_ROOT

EXPERIMENT = "training-local-process"
MODEL = "sales-forecast-local-process"


@pytest.mark.slow
def test_local_process_backend_trains_logs_and_registers(small_features, mlflow_uri, tmp_path) -> None:
    settings, _ = small_features
    env = {**os.environ, "POSTGRES_DB": settings.postgres.database, "MODEL_DIR": str(tmp_path / "models"),
           "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    done = subprocess.run([sys.executable, "02_training.py", "--backend", "local-process", "--epochs", "3",
                           "--batch-size", "256", "--registered-model", MODEL], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    job = re.search(r"MLflow run (\w+) \(TrainJob (sales-train-\w+)\)", done.stdout)
    assert job, output[-4000:]
    run_id, name = job.groups()
    assert "Successfully installed sales_forecast_torchrun" in output  # only the torchrun script was installed
    assert "done train in" in output and "holdout:" in output  # the job's own log was streamed

    run = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags["trainjob"] == name
    assert run.data.params["epochs"] == "3" and run.data.params["world_size"] == "1"
    (version,) = mlflow.MlflowClient(mlflow_uri).search_model_versions(f"name = '{MODEL}'")
    assert version.run_id == run_id

    # The job's venv is gone, and nothing was installed into this environment.
    assert not list(Path(tempfile.gettempdir()).glob(f"{name}*"))
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("sales_forecast_torchrun")
