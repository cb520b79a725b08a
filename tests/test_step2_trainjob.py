"""The TrainJob that `02_training.py --backend kubernetes` POSTs, built without a cluster through the real
TrainerClient Kubernetes backend (only the custom-objects API is replaced), validated strictly against the
pinned Trainer v2.3.0 CRD and, with the rendered manifests, against the cluster wiring."""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sales_forecast import contract
from sales_forecast.config import REPO_ROOT, load_settings
from sales_forecast.errors import ConfigError
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import train_sales_model
from tests.support.trainer_api import build_trainjob_body
from tools.manifests import validate as validation

JOB = "sales-train-test0001"


PARAMS = TrainingParams(trainjob=JOB, epochs=12, hidden=(64, 32))


@pytest.fixture(scope="module")
def body() -> dict:
    return build_trainjob_body(PARAMS, load_settings(), num_nodes=2, resources={"cpu": "2", "memory": "4Gi"})


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
    labels = {contract.POSTGRES_CLIENT_LABEL: "true", contract.MLFLOW_CLIENT_LABEL: "true"}
    assert template["metadata"]["labels"] == labels
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
    for key in contract.MLFLOW_CREDENTIAL_KEYS:  # only the basic-auth overlay has the Secret
        secret = {"name": contract.MLFLOW_CREDENTIALS_SECRET, "key": key, "optional": True}
        assert refs[key] == {"secretKeyRef": secret}


def test_function_source_survives_the_unquoted_heredoc() -> None:
    source = inspect.getsource(train_sales_model)
    assert not {"$", "`", "\\"} & set(source), "the SDK embeds the source in an unquoted bash heredoc"
    assert "import" in source.split('"""')[-1]  # imports inside the function, not at module level


def run_shipped_command(command: list[str], folder: Path, capture: bool) -> subprocess.CompletedProcess:
    """Run the trainer container's bash command with a stub torchrun. ``capture``: the stub runs the shipped
    file with Python, whose run_training (sitecustomize) records the parameters it receives instead of training."""
    stubs = folder / "bin"
    stubs.mkdir()
    runner = f'exec "{sys.executable}" "$1"' if capture else 'cp "$1" shipped.py'
    (stubs / "torchrun").write_text(f"#!/bin/sh\n{runner}\n")
    (stubs / "torchrun").chmod(0o755)
    (folder / "sitecustomize.py").write_text(
        "import dataclasses, json\n"
        "import sales_forecast.training.pipeline as pipeline\n"
        "def record(params, settings):\n"
        "    open('received.json', 'w').write(json.dumps(dataclasses.asdict(params)))\n"
        "pipeline.run_training = record\n")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(folder / "home"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": f"{folder}:{REPO_ROOT}"}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_shipped_script_is_the_function_and_its_call(body, tmp_path: Path) -> None:
    """The file the command hands to torchrun is the function source plus the call with the encoded
    parameters, unchanged by the shell."""
    done = run_shipped_command(body["spec"]["trainer"]["command"], tmp_path, capture=False)
    assert body["spec"]["trainer"]["command"][:2] == ["bash", "-c"]
    assert done.returncode == 0, done.stderr
    shipped = (tmp_path / "shipped.py").read_text()
    call = f"train_sales_model(**{PARAMS.as_func_args()!r})"
    assert shipped.strip() == f"{textwrap.dedent(inspect.getsource(train_sales_model)).strip()}\n\n{call}"
    compile(shipped, "train.py", "exec")


HOSTILE = [
    "canary $(touch pwned) `touch pwned2`",
    "sales-forecast$(touch x)",
    "$HOME and ${HOME}",
    "C:\\temp\\new",
    "trailing backslash \\",
    "quotes ' \" and EOM\nEOM\ntouch pwned3\n",
    "üñíçødé ✓ \t tab",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_names_reach_the_training_exactly(hostile: str, tmp_path: Path) -> None:
    """The real command the SDK generates, run in bash: a run name (and a registered model name where MLflow
    allows it) arrive exactly as given, and nothing in them runs."""
    model = hostile if "/" not in hostile and ":" not in hostile and "@" not in hostile else "plain"
    params = TrainingParams(trainjob=JOB, run_name=hostile, registered_model=model)
    body = build_trainjob_body(params, load_settings())
    done = run_shipped_command(body["spec"]["trainer"]["command"], tmp_path, capture=True)
    assert done.returncode == 0, done.stderr[-2000:]
    received = json.loads((tmp_path / "received.json").read_text())
    assert received["run_name"] == hostile and received["registered_model"] == model
    created = {p.name for p in tmp_path.iterdir()} - {"bin", "sitecustomize.py", "received.json", "home"}
    assert created == {os.path.basename(inspect.getfile(train_sales_model))}, created
    assert not [p for p in tmp_path.rglob("*") if p.name in ("pwned", "pwned2", "pwned3", "x")]  # nothing ran


@pytest.mark.parametrize(("field", "value", "message"), [
    ("registered_model", "team/model", "cannot contain '/' or ':'"),
    ("registered_model", "a@b", "must not contain '@'"),
    ("registered_model", "   ", "non-empty"),
    ("run_name", "x" * 251, "MLflow stores at most 250"),
    ("run_name", "nul\x00byte", "NUL"),
])
def test_names_mlflow_refuses_are_refused_before_submitting(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_trainjob_body(TrainingParams(trainjob=JOB, **{field: value}), load_settings())


def test_02_training_refuses_a_bad_name_with_exit_2() -> None:
    done = subprocess.run([sys.executable, "02_training.py", "--backend", "kubernetes", "--registered-model", "a/b"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "cannot contain '/' or ':'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_submission_needs_a_job_name() -> None:
    with pytest.raises(ValueError, match="trainjob"):
        build_trainjob_body(TrainingParams(), load_settings())
