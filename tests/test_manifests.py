"""Offline, strict validation of manifests/, the Dockerfile, and the TrainJob and
InferenceService shapes that steps 2 and 3 submit. No API server is needed; kubectl
(for `kubectl kustomize`) and the pinned CRDs (../shared/crds or $CRDS_DIR) are, and
their absence fails the tests with a message saying what to install."""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sales_forecast.config import REPO_ROOT
from tools.manifests import validate as v

ROOT = REPO_ROOT
FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
BROKEN = sorted((FIXTURES / "broken").glob("*.yaml"))
INSTALL_SCRIPT = ROOT / "scripts" / "install-operators.sh"
Obj = dict[str, Any]

EXPECTED_CONFIG = {
    "POSTGRES_HOST": "postgres",
    "POSTGRES_PORT": "5432",
    "POSTGRES_DB": "feast",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "MODEL_DIR": "/mnt/shared/models",
    "FEAST_REPO_PATH": "/app/feature_repo",
    "RAY_JOBS_ADDRESS": "http://feast-ray-head-svc:8265",
}
EXPECTED_OBJECTS = {
    ("Namespace", "mlops"),
    ("PersistentVolumeClaim", "mlops-shared"),
    ("Secret", "postgres-credentials"),
    ("ConfigMap", "pipeline-config"),
    ("ConfigMap", "feature-repo"),
    ("ConfigMap", "postgres-init"),
    ("StatefulSet", "postgres"),
    ("Service", "postgres"),
    ("NetworkPolicy", "postgres-clients-only"),
    ("Deployment", "mlflow"),
    ("Service", "mlflow"),
    ("RayCluster", "feast-ray"),
    ("Job", "feast-features"),
    ("ServiceAccount", "pipeline"),
    ("Role", "pipeline"),
    ("RoleBinding", "pipeline"),
    ("ClusterRole", "sales-forecast-pipeline-runtime-reader"),
    ("ClusterRoleBinding", "sales-forecast-pipeline-runtime-reader"),
}


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def kinds_and_names(objs: list[Obj]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return v.render("manifests")


# --------------------------------------------------------------------------- tools


def test_kubectl_and_crds_are_available() -> None:
    """Fails (never skips) when CI lacks kubectl or the CRD folder."""
    v.kubectl_path()
    folder = v.crds_dir()
    for kind in ("RayCluster", "TrainJob", "InferenceService"):
        assert any(k == kind for _, k in v._crd_index(str(folder))), f"no CRD for {kind} in {folder}"


def test_setup_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(v.CRDS_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(v.ValidationSetupError, match=r"(?s)CRDS_DIR.*kuberay @ v1\.7\.0.*trainer @ v2\.3\.0"):
        v.crds_dir()
    monkeypatch.setenv(v.KUBECTL_ENV, str(tmp_path / "no-kubectl"))
    with pytest.raises(v.ValidationSetupError, match="kubectl not found"):
        v.kubectl_path()


# --------------------------------------------------------------------------- manifests


def test_base_renders_the_contract(rendered: list[Obj]) -> None:
    assert kinds_and_names(rendered) >= EXPECTED_OBJECTS
    for obj in rendered:
        if obj["kind"] not in v.CLUSTER_SCOPED_KINDS:
            assert obj["metadata"]["namespace"] == "mlops", v.describe(obj)
    assert find(rendered, "ConfigMap", "pipeline-config")["data"] == EXPECTED_CONFIG
    secret = find(rendered, "Secret", "postgres-credentials")
    assert set(secret["data"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD"}
    assert set(find(rendered, "ConfigMap", "feature-repo")["data"]) >= {"feature_store.yaml", "features.py"}
    init = find(rendered, "ConfigMap", "postgres-init")["data"]
    assert any("CREATE DATABASE mlflow" in sql for sql in init.values())


def test_base_is_valid(rendered: list[Obj]) -> None:
    assert v.validate(rendered) == []


def test_single_node_overlay_is_valid_and_read_write_once(rendered: list[Obj]) -> None:
    overlay = v.render("manifests/overlays/single-node")
    assert kinds_and_names(overlay) == kinds_and_names(rendered)
    assert find(overlay, "PersistentVolumeClaim", "mlops-shared")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert find(rendered, "PersistentVolumeClaim", "mlops-shared")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert v.validate(overlay) == []


def test_step_jobs_are_valid(rendered: list[Obj]) -> None:
    steps = v.render("manifests/steps")
    assert v.validate(rendered + steps) == []
    for job in steps:
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "pipeline"
        assert pod["containers"][0]["command"][-2:] == ["--backend", "kubernetes"]


def test_ray_cluster_contract(rendered: list[Obj]) -> None:
    spec = find(rendered, "RayCluster", "feast-ray")["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in groups] == [(2, 2, 2)]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in groups)]:
        for container in template["spec"]["containers"]:
            assert container["image"] == "sales-forecast:0.1.0"
            assert container["imagePullPolicy"] == "IfNotPresent"
            assert "limits" in container["resources"] and "nvidia.com/gpu" not in container["resources"]["limits"]


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
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in (o for o in rendered if o["kind"] == kind):
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline", "namespace": "mlops"}]


def test_credentials_are_overridable_without_editing_the_repo(tmp_path: Path) -> None:
    """The overlay documented in docs/kubernetes.md replaces the demo credentials."""
    (tmp_path / "credentials.env").write_text("POSTGRES_USER=alice\nPOSTGRES_PASSWORD=p@ss:w/rd\n")
    base = os.path.relpath(ROOT / "manifests", tmp_path)  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        "resources:\n"
        f"  - {base}\n"
        "secretGenerator:\n"
        "  - name: postgres-credentials\n"
        "    namespace: mlops\n"
        "    behavior: replace\n"
        "    envs: [credentials.env]\n"
        "    options: {disableNameSuffixHash: true}\n"
    )
    objs = v.render(tmp_path)
    data = find(objs, "Secret", "postgres-credentials")["data"]
    assert {k: base64.b64decode(val).decode() for k, val in data.items()} == {
        "POSTGRES_USER": "alice",
        "POSTGRES_PASSWORD": "p@ss:w/rd",
    }
    assert v.validate(objs) == []


# --------------------------------------------------------------------------- bodies of 02/03


@pytest.mark.parametrize("name", ["trainjob.yaml", "inferenceservice.yaml"])
def test_example_custom_resources_are_valid(rendered: list[Obj], name: str) -> None:
    (body,) = load(FIXTURES / name)
    assert v.validate_custom_resource(body) == []
    assert v.validate(rendered + [body]) == []


# --------------------------------------------------------------------------- the validator fails


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_fixture_is_rejected(rendered: list[Obj], path: Path) -> None:
    expected = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
    assert expected, f"{path} lacks an '# expect:' line"
    objs = load(path)
    names = [v.describe(o) for o in objs]
    errors = v.validate(rendered + objs)
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
        lambda d: d["spec"]["template"]["metadata"]["labels"].pop(v.POSTGRES_CLIENT_LABEL),
        "lacks label sales-forecast/postgres-client",
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
    find(objs, "ConfigMap", "pipeline-config")["data"]["RAY_JOBS_ADDRESS"] = "http://feast-ray-head:8265"
    find(objs, "ConfigMap", "pipeline-config")["data"]["MLFLOW_TRACKING_URI"] = "http://mlflow:8080"
    errors = v.validate(objs)
    assert any("host 'feast-ray-head' is no Service" in e for e in errors), errors
    assert any("Service 'mlflow' has no port 8080" in e for e in errors), errors


def test_strict_schema_translation() -> None:
    schema = v._strict_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "note": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "rule": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]},
                "defaulted": {"type": "integer", "default": 1},
            },
            "required": ["defaulted"],
        }
    )
    validator = v.jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors({"port": 80, "note": None, "free": {"any": 1}, "rule": ""}))
    assert not list(validator.iter_errors({"port": "http"}))
    assert [e.message for e in validator.iter_errors({"prot": 80})] == [
        "Additional properties are not allowed ('prot' was unexpected)"
    ]


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
    script = INSTALL_SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], check=True)
    files = " ".join(p.name for p in v.crds_dir().glob("*.yaml"))
    for variable, prefix in (
        ("KUBERAY_VERSION", "kuberay_v"),
        ("TRAINER_VERSION", "trainer_v"),
        ("KSERVE_VERSION", "kserve_v"),
    ):
        pinned = re.search(rf'^{variable}="\$\{{{variable}:-v?([\d.]+)\}}"$', script, re.M)
        assert pinned, f"{variable} is not pinned in {INSTALL_SCRIPT}"
        assert f"{prefix}{pinned.group(1)}_" in files, f"{variable}={pinned.group(1)} but CRDs are {files}"
    assert "deploymentMode=Standard" in script
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"Kubernetes ≥ {v.KUBERNETES_VERSION}" in docs
