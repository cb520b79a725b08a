"""The TrainJob that `02_training.py --backend kubernetes` POSTs, built without a cluster through the real
TrainerClient Kubernetes backend (only the custom-objects API is replaced), validated strictly against the
pinned Trainer v2.3.0 CRD and, with the rendered manifests, against the cluster wiring."""

from __future__ import annotations

import copy
import inspect
import subprocess
import textwrap
from pathlib import Path

import pytest

from sales_forecast.config import load_settings
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import train_sales_model
from tests.support.trainer_api import build_trainjob_body
from tools.manifests import validate as validation

JOB = "sales-train-test0001"


@pytest.fixture(scope="module")
def body() -> dict:
    params = TrainingParams(trainjob=JOB, epochs=12, hidden=(64, 32))
    return build_trainjob_body(params, load_settings(), num_nodes=2, resources={"cpu": "2", "memory": "4Gi"})


def node_patch(body: dict) -> dict:
    (patch,) = body["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    return job["template"]["spec"]["template"]


def test_body_validates_strictly_against_the_trainjob_crd(body) -> None:
    assert validation.validate_custom_resource(body) == []


def test_body_passes_the_cluster_checks_with_the_manifests(body) -> None:
    """References (ConfigMap keys, Secret keys, PVC), non-root security, resources, the PostgreSQL label."""
    stored = copy.deepcopy(body)
    stored["metadata"]["namespace"] = load_settings().namespace  # what the API server adds from the URL
    assert validation.validate(validation.render("manifests") + [stored]) == []


def test_body_runs_the_project_image_on_the_torch_runtime(body) -> None:
    spec = body["spec"]
    assert (body["apiVersion"], body["kind"], body["metadata"]["name"]) == ("trainer.kubeflow.org/v1alpha1",
                                                                           "TrainJob", JOB)
    assert spec["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["image"] == "sales-forecast:0.1.0" and trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"] == {"limits": {"cpu": "2", "memory": "4Gi"},
                                           "requests": {"cpu": "2", "memory": "4Gi"}}
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in trainer["env"]
    assert spec["runtimePatches"][0]["manager"] == "trainer.kubeflow.org/kubeflow-sdk"


def test_patch_mounts_the_pvc_and_wires_config_secret_and_label(body) -> None:
    template = node_patch(body)
    assert template["metadata"]["labels"] == {"sales-forecast/postgres-client": "true"}
    pod = template["spec"]
    assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "mlops-shared"}},
                              {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/mnt/shared"},
                                         {"name": "dshm", "mountPath": "/dev/shm"}]
    refs = {env["name"]: env["valueFrom"] for env in container["env"]}
    for key in ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "MLFLOW_TRACKING_URI", "MODEL_DIR"):
        assert refs[key] == {"configMapKeyRef": {"name": "pipeline-config", "key": key}}
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert refs[key] == {"secretKeyRef": {"name": "postgres-credentials", "key": key}}


def test_function_source_survives_the_unquoted_heredoc() -> None:
    source = inspect.getsource(train_sales_model)
    assert not {"$", "`", "\\"} & set(source), "the SDK embeds the source in an unquoted bash heredoc"
    assert "import" in source.split('"""')[-1]  # imports inside the function, not at module level


def test_the_shipped_script_is_the_function_and_its_call(body, tmp_path: Path) -> None:
    """Run the trainer command's bash script with a stub torchrun: the file it hands over is the function source
    plus the call with the literal parameters, unchanged by the shell."""
    command = body["spec"]["trainer"]["command"]
    assert command[:2] == ["bash", "-c"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "torchrun").write_text('#!/bin/sh\ncp "$1" shipped.py\n')
    (stubs / "torchrun").chmod(0o755)
    done = subprocess.run(command, cwd=tmp_path, env={"PATH": f"{stubs}:/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    shipped = (tmp_path / "shipped.py").read_text()
    call = f"train_sales_model(**{{'epochs': 12, 'hidden': (64, 32), 'trainjob': '{JOB}'}})"
    assert shipped.strip() == f"{textwrap.dedent(inspect.getsource(train_sales_model)).strip()}\n\n{call}"
    compile(shipped, "train.py", "exec")


def test_submission_needs_a_job_name() -> None:
    with pytest.raises(ValueError, match="trainjob"):
        build_trainjob_body(TrainingParams(), load_settings())
