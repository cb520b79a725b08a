"""Configuration: every variable is validated like its flag, and Settings.environment() reproduces the settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sales_forecast import contract
from sales_forecast.config import (
    DEFAULT_MAX_INSTANCES,
    DEFAULT_POSTGRES_PASSWORD,
    REPO_ROOT,
    load_settings,
    load_shape_defaults,
)
from sales_forecast.errors import ConfigError


def test_defaults_are_the_embedded_stack() -> None:
    settings = load_settings({})
    assert settings.postgres.embedded and settings.postgres.host == "127.0.0.1"
    assert (settings.postgres.user, settings.postgres.password) == ("postgres", "postgres")
    assert settings.max_instances == DEFAULT_MAX_INSTANCES == 1000
    assert settings.namespace == contract.NAMESPACE and settings.image == contract.PROJECT_IMAGE
    assert load_shape_defaults({}) == load_shape_defaults({"SALES_STORES": ""})


def test_password_default_is_the_same_with_an_external_host() -> None:
    """The README's table: POSTGRES_PASSWORD defaults to postgres whether or not POSTGRES_HOST is set."""
    assert load_settings({"POSTGRES_HOST": "db.example"}).postgres.password == DEFAULT_POSTGRES_PASSWORD
    assert load_settings({}).postgres.password == DEFAULT_POSTGRES_PASSWORD
    assert not load_settings({"POSTGRES_HOST": "db.example"}).postgres.embedded


@pytest.mark.parametrize(("env", "message"), [
    ({"SALES_STORES": "0"}, "SALES_STORES must be at least 1, got 0"),
    ({"SALES_DEPTS": "-5"}, "SALES_DEPTS must be at least 1, got -5"),
    ({"SALES_WEEKS": "5"}, "SALES_WEEKS must be at least 6, got 5"),
    ({"SALES_SEED": "abc"}, "SALES_SEED must be an integer, got 'abc'"),
])
def test_shape_variables_follow_the_flags_rules(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_shape_defaults(env)


@pytest.mark.parametrize(("env", "message"), [
    ({"POSTGRES_PORT": "abc"}, "POSTGRES_PORT must be an integer"),
    ({"POSTGRES_PORT": "70000"}, "POSTGRES_PORT must be between 1 and 65535"),
    ({"SERVING_MAX_INSTANCES": "0"}, "SERVING_MAX_INSTANCES must be at least 1"),
    ({"FEAST_RAY_EXECUTION_MODE": "kuberay"}, "FEAST_RAY_EXECUTION_MODE must be one of local, remote"),
    ({"INFERENCE_BACKEND": "docker"}, "INFERENCE_BACKEND must be one of local, kubernetes"),
    ({"RAY_ADDRESS": "ray://head:10001"}, "Ray Client"),
    ({"POSTGRES_PASSWORD": 'se"cret'}, "POSTGRES_PASSWORD must not contain a double quote"),
    ({"POSTGRES_USER": "me@corp"}, "POSTGRES_USER must not contain @"),
    ({"POSTGRES_DB": "a/b"}, "POSTGRES_DB must not contain"),
])
def test_bad_variables_are_refused_in_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_environment_reproduces_the_settings() -> None:
    settings = load_settings({"POSTGRES_HOST": "db", "POSTGRES_PASSWORD": "p@ss: #word", "RAY_ADDRESS": "10.0.0.1:6379",
                              "MLFLOW_TRACKING_URI": "http://mlflow:5000", "SERVING_MAX_INSTANCES": "25",
                              "FEAST_RAY_EXECUTION_MODE": "remote"})
    assert load_settings(settings.environment()) == settings
    public = settings.environment(secrets=False)
    assert not set(contract.POSTGRES_SECRET_KEYS) & set(public)
    assert set(public) | set(contract.POSTGRES_SECRET_KEYS) == set(settings.environment())


def test_cluster_config_keys_are_settings_variables() -> None:
    """Every key of ConfigMap pipeline-config is a variable config.py reads, and the pods' settings are the
    cluster's services."""
    settings = load_settings(contract.CLUSTER_CONFIG)
    assert set(contract.CLUSTER_CONFIG) - {"RAY_JOBS_ADDRESS"} <= set(settings.environment())
    assert (settings.postgres.host, settings.postgres.port) == (contract.POSTGRES_SERVICE, contract.POSTGRES_PORT)
    assert settings.mlflow_tracking_uri == f"http://{contract.MLFLOW_SERVICE}:{contract.MLFLOW_PORT}"
    assert str(settings.model_dir) == contract.CLUSTER_MODEL_DIR
    assert str(settings.feast_repo_path) == contract.FEATURE_REPO_MOUNT
    assert settings.ray_jobs_address == contract.CLUSTER_CONFIG["RAY_JOBS_ADDRESS"]


@pytest.mark.parametrize("script", ["01_feast_features.py", "02_training.py", "03_inference.py"])
def test_scripts_refuse_a_bad_variable_with_exit_2(script: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "SALES_STORES": "0", "POSTGRES_PORT": "x"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    assert ("POSTGRES_PORT must be an integer, got 'x'" in done.stderr
            or "SALES_STORES must be at least 1" in done.stderr)
    assert "Traceback" not in done.stderr
