"""What every pipeline pod that code creates (the TrainJob's trainer, the InferenceService's predictor) gets from
the cluster: its settings from ConfigMap pipeline-config by key, the PostgreSQL credentials, MLflow's credentials
when the basic-auth overlay provides them, and the labels the NetworkPolicies admit. Plain dicts, as the API
takes them (both SDKs serialize dicts unchanged)."""

from __future__ import annotations

from typing import Any

from sales_forecast.contract import (
    IN_POD_CONFIG_KEYS,
    MLFLOW_CLIENT_LABEL,
    MLFLOW_CREDENTIAL_KEYS,
    MLFLOW_CREDENTIALS_SECRET,
    PIPELINE_CONFIG,
    POSTGRES_CLIENT_LABEL,
    POSTGRES_SECRET,
    POSTGRES_SECRET_KEYS,
)

POD_LABELS = {POSTGRES_CLIENT_LABEL: "true", MLFLOW_CLIENT_LABEL: "true"}


def pod_env() -> list[dict[str, Any]]:
    """The ConfigMap's in-pod settings, the PostgreSQL credentials, and MLflow's (optional: only the basic-auth
    overlay creates their Secret)."""
    config = [{"name": key, "valueFrom": {"configMapKeyRef": {"name": PIPELINE_CONFIG, "key": key}}}
              for key in IN_POD_CONFIG_KEYS]
    postgres = [{"name": key, "valueFrom": {"secretKeyRef": {"name": POSTGRES_SECRET, "key": key}}}
                for key in POSTGRES_SECRET_KEYS]
    mlflow = [{"name": key, "valueFrom": {"secretKeyRef": {"name": MLFLOW_CREDENTIALS_SECRET, "key": key,
                                                            "optional": True}}}
              for key in MLFLOW_CREDENTIAL_KEYS]
    return config + postgres + mlflow
