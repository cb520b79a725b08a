"""The InferenceService that ``03_inference.py --backend kubernetes`` submits, without a cluster: strict validation
against the pinned KServe v0.20.0 CRD and against the rendered manifests (ConfigMap, Secret keys, PVC,
NetworkPolicy label), and the create-or-replace / wait / URL logic against a fake KServeClient."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sales_forecast.config import load_settings
from sales_forecast.contract import MODEL_NAME, PROJECT_IMAGE
from sales_forecast.errors import PipelineError
from sales_forecast.serving.kserve_import import hidden_argv
from tools.manifests import validate as validation


@pytest.fixture(scope="module")
def isvc_ops():
    with hidden_argv():
        return importlib.import_module("sales_forecast.serving.kubernetes")


@pytest.fixture(scope="module")
def cluster_settings():
    settings = load_settings()
    return dataclasses.replace(settings, image=PROJECT_IMAGE, namespace="mlops")


@pytest.fixture(scope="module")
def body(isvc_ops, cluster_settings) -> dict[str, Any]:
    return isvc_ops.to_body(isvc_ops.build_inference_service(cluster_settings, model_version="3"))


def predictor(body: dict[str, Any]) -> dict[str, Any]:
    return body["spec"]["predictor"]


def container(body: dict[str, Any]) -> dict[str, Any]:
    (only,) = predictor(body)["containers"]
    return only


def test_validates_strictly_against_the_kserve_crd(body: dict[str, Any]) -> None:
    assert validation.validate_custom_resource(body) == []


def test_validates_with_the_rendered_manifests(body: dict[str, Any]) -> None:
    """References (pipeline-config, postgres-credentials keys, mlops-shared, feature-repo) exist, and the pods
    carry the label the PostgreSQL NetworkPolicy admits."""
    assert validation.validate(validation.render("manifests") + [body]) == []


def test_standard_mode_custom_container(body: dict[str, Any]) -> None:
    assert body["apiVersion"] == "serving.kserve.io/v1beta1" and body["kind"] == "InferenceService"
    assert body["metadata"]["name"] == "sales-model" and body["metadata"]["namespace"] == "mlops"
    assert body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    main = container(body)
    assert main["name"] == "kserve-container" and main["image"] == "sales-forecast:0.1.0"
    assert main["command"] == ["python", "-m", "sales_forecast.serving.server"]
    assert main["args"] == [f"--model_name={MODEL_NAME}", "--http_port=8080", "--host=0.0.0.0"]
    assert main["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert main["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{MODEL_NAME}", "port": 8080}
    assert {"cpu", "memory"} <= set(main["resources"]["requests"]) and {"cpu", "memory"} <= set(
        main["resources"]["limits"])
    assert predictor(body)["annotations"] == {"sales-forecast/model-version": "3"}


def test_postgres_and_mlflow_settings_and_the_shared_volume(body: dict[str, Any]) -> None:
    main = container(body)
    assert "envFrom" not in main  # only the ConfigMap keys a pod reads, not step 1's Ray job address
    refs = {env["name"]: env["valueFrom"] for env in main["env"]}
    for key in ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "MLFLOW_TRACKING_URI", "MODEL_DIR", "FEAST_REPO_PATH"):
        assert refs[key] == {"configMapKeyRef": {"name": "pipeline-config", "key": key}}
    assert "RAY_JOBS_ADDRESS" not in refs
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert refs[key] == {"secretKeyRef": {"name": "postgres-credentials", "key": key}}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the basic-auth overlay's Secret
        assert refs[key] == {"secretKeyRef": {"name": "mlflow-credentials", "key": key, "optional": True}}
    assert predictor(body)["labels"] == {"sales-forecast/postgres-client": "true",
                                         "sales-forecast/mlflow-client": "true"}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/mnt/shared"]["name"] == "shared"
    volumes = {v["name"]: v for v in predictor(body)["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "mlops-shared"
    assert mounts["/app/feature_repo/feature_store.yaml"]["subPath"] == "feature_store.yaml"


def test_runs_as_non_root(body: dict[str, Any]) -> None:
    pod = predictor(body)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    main = container(body)["securityContext"]
    assert main["allowPrivilegeEscalation"] is False and main["capabilities"] == {"drop": ["ALL"]}


def test_model_dir_and_model_uri_args(isvc_ops, cluster_settings) -> None:
    from_dir = isvc_ops.to_body(isvc_ops.build_inference_service(cluster_settings, model_dir="/mnt/shared/models"))
    assert container(from_dir)["args"][-1] == "--model-dir=/mnt/shared/models"
    assert "annotations" not in predictor(from_dir)
    from_uri = isvc_ops.to_body(isvc_ops.build_inference_service(cluster_settings, model_uri="models:/x@y"))
    assert container(from_uri)["args"][-1] == "--model-uri=models:/x@y"
    assert validation.validate_custom_resource(from_dir) == []


class FakeKServeClient:
    """Records calls; behaves like KServeClient 0.21 (RuntimeError wrapping the ApiException text)."""

    def __init__(self, existing: dict[str, Any] | None, ready: bool = True):
        self.existing = existing
        self.ready = ready
        self.calls: list[tuple[str, Any]] = []

    def get(self, name, namespace=None):
        self.calls.append(("get", name))
        if self.existing is None:
            raise RuntimeError("Exception when calling CustomObjectsApi->get_namespaced_custom_object: (404)\n"
                               "Reason: Not Found")
        return self.existing

    def create(self, isvc):
        self.calls.append(("create", isvc.metadata.resource_version))
        self.existing = {"metadata": {"name": isvc.metadata.name, "namespace": isvc.metadata.namespace,
                                      "generation": 1, "resourceVersion": "100"}}
        return self.existing

    def replace(self, name, isvc, namespace=None):
        version = isvc["metadata"].get("resourceVersion") if isinstance(isvc, dict) else isvc.metadata.resource_version
        self.calls.append(("replace", version))
        if isinstance(isvc, dict):
            self.existing = isvc
        self.existing["metadata"]["generation"] += 1
        return self.existing

    def wait_isvc_ready(self, name, namespace=None, timeout_seconds=600, polling_interval=10,
                        expected_generation=None):
        self.calls.append(("wait", expected_generation))
        if not self.ready:
            raise RuntimeError("Timeout to start the InferenceService")
        self.existing["status"] = {"address": {"url": "http://sales-model-predictor.mlops.svc.cluster.local"},
                                   "conditions": [{"type": "Ready", "status": "True"}]}


def test_create_then_replace_and_wait_for_the_new_generation(isvc_ops, cluster_settings) -> None:
    client = FakeKServeClient(existing=None)
    applied = isvc_ops.create_or_replace(client, isvc_ops.build_inference_service(cluster_settings))
    ready = isvc_ops.wait_ready(client, applied, 60)
    assert isvc_ops.cluster_url(ready) == "http://sales-model-predictor.mlops.svc.cluster.local"
    assert client.calls[:3] == [("get", "sales-model"), ("create", None), ("wait", 1)]

    client.calls.clear()
    applied = isvc_ops.create_or_replace(client, isvc_ops.build_inference_service(cluster_settings))
    isvc_ops.wait_ready(client, applied, 60)
    assert client.calls[:3] == [("get", "sales-model"), ("replace", "100"), ("wait", 2)]


def test_a_promotion_rolls_the_running_inference_service(isvc_ops, cluster_settings) -> None:
    """The weekly cycle's roll: only the model-version annotation changes, step 3's other choices stay, and the new
    generation is awaited; without an InferenceService there is nothing to roll (and nothing is created)."""
    assert isvc_ops.roll_to(FakeKServeClient(existing=None), "mlops", "9") is False
    body = isvc_ops.to_body(isvc_ops.build_inference_service(cluster_settings, model_dir="/mnt/shared/models",
                                                             model_version="3"))
    body["metadata"].update({"generation": 4, "resourceVersion": "200"})
    client = FakeKServeClient(existing=copy.deepcopy(body))
    assert isvc_ops.roll_to(client, "mlops", "9") is True
    assert [call[0] for call in client.calls] == ["get", "replace", "wait", "get"]  # the last: the ready object
    assert client.calls[2] == ("wait", 5)
    rolled = client.existing
    assert predictor(rolled)["annotations"] == {"sales-forecast/model-version": "9"}
    assert container(rolled)["args"] == container(body)["args"]  # still --model-dir
    client.calls.clear()
    assert isvc_ops.roll_to(client, "mlops", "9") is True and client.calls == [("get", "sales-model")]


def test_not_ready_reports_the_conditions(isvc_ops, cluster_settings) -> None:
    client = FakeKServeClient(existing=None, ready=False)
    applied = isvc_ops.create_or_replace(client, isvc_ops.build_inference_service(cluster_settings))
    client.existing["status"] = {"conditions": [{"type": "Ready", "status": "False",
                                                 "message": "ImagePullBackOff"}]}
    with pytest.raises(PipelineError, match="not ready after 60 s: Ready=False \\(ImagePullBackOff\\)"):
        isvc_ops.wait_ready(client, applied, 60)
    with pytest.raises(PipelineError, match="no status.address.url"):
        isvc_ops.cluster_url(client.existing)


def test_03_inference_without_a_cluster_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "03_inference.py", "--backend", "kubernetes", "--timeout", "5"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no Kubernetes configuration")
    assert "Traceback" not in result.stderr
