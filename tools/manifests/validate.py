"""Strict offline validation of Kubernetes objects, without an API server.

- ``render(path)``: ``kubectl kustomize <path>`` parsed into a list of objects.
- ``validate_builtin(obj)``: built-in kinds against kubernetes-validate's strict schemas.
- ``validate_custom_resource(obj)``: custom resources against the ``openAPIV3Schema`` of the
  pinned CRDs, with unknown fields rejected like the API server's strict field validation.
- ``validate(objs)``: both, plus the cross-object checks a schema cannot make (references,
  selectors, pinned images, non-root containers, resources) and, given the repository root,
  the pipeline's contract (config URLs, feature_store.yaml hosts, Ray versions, workers).

Every validator returns a list of error strings; an empty list means valid.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv_utils
from packaging.version import Version

KUBERNETES_VERSION = "1.32"
CRDS_DIR_ENV = "CRDS_DIR"
KUBECTL_ENV = "KUBECTL"
REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_CLIENT_LABEL = "sales-forecast/postgres-client"
PIPELINE_CONFIG = "pipeline-config"
POSTGRES_SECRET = "postgres-credentials"
POSTGRES_SERVICE = "postgres"
RAY_WORKER_REPLICAS = 2
PIPELINE_CONFIG_KEYS = (
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "MLFLOW_TRACKING_URI",
    "MODEL_DIR",
    "FEAST_REPO_PATH",
    "RAY_JOBS_ADDRESS",
)
CRD_SOURCES = (
    "ray-project/kuberay @ v1.7.0: ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml",
    "kubeflow/trainer @ v2.3.0: manifests/base/crds/trainer.kubeflow.org_*.yaml",
    "kserve/kserve @ v0.20.0: config/crd/full/serving.kserve.io_*.yaml",
)
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "PersistentVolume",
        "StorageClass",
        "CustomResourceDefinition",
        "PriorityClass",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "ClusterTrainingRuntime",
        "ClusterServingRuntime",
        "ClusterStorageContainer",
    }
)
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-?[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ValidationSetupError(RuntimeError):
    """kubectl or the CRD folder is missing: validation cannot run at all."""


Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def kubectl_path() -> str:
    """The kubectl binary: $KUBECTL, else `kubectl` on PATH."""
    candidate = os.environ.get(KUBECTL_ENV) or shutil.which("kubectl")
    if not candidate or not Path(candidate).exists():
        raise ValidationSetupError(
            "kubectl not found (set $KUBECTL or put kubectl >= 1.27 on PATH); it is needed "
            "to render the manifests with `kubectl kustomize`, which works offline. Install it "
            "from https://kubernetes.io/docs/tasks/tools/ or your package manager."
        )
    return candidate


def render(path: str | Path = "manifests") -> list[Obj]:
    """Render a kustomization with `kubectl kustomize`; relative paths are repo-relative."""
    target = Path(path)
    if not target.is_absolute():
        target = REPO_ROOT / target
    result = subprocess.run(
        [kubectl_path(), "kustomize", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        hint = ""
        if "feature_repo" in result.stderr and not (REPO_ROOT / "feature_repo" / "kustomization.yaml").exists():
            hint = (
                "\nmanifests/base includes ../../feature_repo: feature_repo/kustomization.yaml must generate "
                "ConfigMap feature-repo (kustomize reads files only below a kustomization's folder)."
            )
        raise ValidationSetupError(f"`kubectl kustomize {target}` failed:\n{result.stderr.strip()}{hint}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --------------------------------------------------------------------------- helpers


def describe(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def _namespace(obj: Obj) -> str | None:
    if obj.get("kind") in CLUSTER_SCOPED_KINDS:
        return None
    return (obj.get("metadata") or {}).get("namespace")


def _dig(node: Any, *keys: str | int) -> Any:
    for key in keys:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return None
    return node


def _schema_error(where: str, err: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<root>"
    return f"{where}: {path}: {err.message}"


# --------------------------------------------------------------------------- metadata


def validate_name(obj: Obj) -> list[str]:
    """DNS-1123 checks of metadata.name/namespace and label syntax (ObjectMeta rules)."""
    where = describe(obj)
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [f"{where}: metadata is missing"]
    errors: list[str] = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        errors.append(f"{where}: metadata.name is required")
    elif name:
        label_like = obj.get("kind") in {"Namespace", "Service"}
        pattern, limit = (_DNS1123_LABEL, 63) if label_like else (_DNS1123_SUBDOMAIN, 253)
        if not pattern.match(name) or len(name) > limit:
            errors.append(
                f"{where}: metadata.name {name!r} is not a valid DNS-1123 {'label' if label_like else 'subdomain'}"
            )
    namespace = meta.get("namespace")
    if namespace is not None and not _DNS1123_LABEL.match(str(namespace)):
        errors.append(f"{where}: metadata.namespace {namespace!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        errors.extend(f"{where}: metadata.labels: {e}" for e in _label_errors(key, value))
    return errors


def _label_errors(key: str, value: Any) -> list[str]:
    errors = []
    prefix, _, name = key.rpartition("/")
    if prefix and (not _DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253):
        errors.append(f"key {key!r} has an invalid prefix")
    if not _LABEL_NAME.match(name) or len(name) > 63:
        errors.append(f"key {key!r} is not a valid label name")
    if not isinstance(value, str):
        errors.append(f"value of {key!r} must be a string, got {value!r}")
    elif value and (not _LABEL_NAME.match(value) or len(value) > 63):
        errors.append(f"value {value!r} of {key!r} is not a valid label value")
    return errors


# --------------------------------------------------------------------------- built-in kinds


def schema_version(k8s_version: str = KUBERNETES_VERSION) -> str:
    """The newest schema version kubernetes-validate ships that is <= k8s_version."""
    wanted = Version(k8s_version.lstrip("v"))
    shipped = [v for v in kv_utils.all_versions() if Version(v) <= wanted]
    if not shipped:
        raise ValidationSetupError(f"kubernetes-validate has no schema <= {k8s_version}")
    return max(shipped, key=Version)


def validate_builtin(obj: Obj, k8s_version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate a built-in object strictly (unknown fields rejected)."""
    where = describe(obj)
    try:
        kv_utils.validate(obj, schema_version(k8s_version), strict=True)
    except kv_utils.ValidationError as err:
        return [_schema_error(where, err)]
    except kv_utils.SchemaNotFoundError as err:
        return [f"{where}: {err.message} (unknown kind, or a custom resource without its CRD)"]
    return validate_name(obj)


# --------------------------------------------------------------------------- custom resources


def crds_dir() -> Path:
    """$CRDS_DIR, else <repo root>/../shared/crds."""
    configured = os.environ.get(CRDS_DIR_ENV)
    folder = Path(configured) if configured else REPO_ROOT.parent / "shared" / "crds"
    if not folder.is_dir() or not any(folder.glob("*.yaml")):
        sources = "\n  ".join(CRD_SOURCES)
        raise ValidationSetupError(
            f"CRD folder {folder} is missing or holds no *.yaml. Download the pinned "
            f"CustomResourceDefinitions into it, or point ${CRDS_DIR_ENV} at a folder "
            f"holding them:\n  {sources}"
        )
    return folder


@dataclass(frozen=True)
class _Crd:
    schema: Obj
    namespaced: bool


@functools.lru_cache(maxsize=4)
def _crd_index(folder: str) -> dict[tuple[str, str], _Crd]:
    index: dict[tuple[str, str], _Crd] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        with path.open() as handle:
            docs = yaml.load_all(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            for doc in docs:
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec["versions"]:
                    if not version.get("served"):
                        continue
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schema = version["schema"]["openAPIV3Schema"]
                    index[key] = _Crd(_strict_schema(schema), spec["scope"] == "Namespaced")
    return index


def _strict_schema(node: Obj) -> Obj:
    """Structural-schema dialect -> JSON Schema, with unknown fields rejected."""
    out: Obj = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict_schema(sub) for sub in value]
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue  # translated below; CEL rules (x-kubernetes-validations) are dropped
        else:
            out[key] = value
    if "required" in out:
        # The API server applies defaults before validating, so a defaulted field is never missing.
        props = node.get("properties") or {}
        out["required"] = [name for name in out["required"] if "default" not in (props.get(name) or {})]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def is_custom_resource(obj: Obj, folder: Path | None = None) -> bool:
    index = _crd_index(str(folder or crds_dir()))
    return (obj.get("apiVersion"), obj.get("kind")) in index


def validate_custom_resource(obj: Obj, folder: Path | None = None) -> list[str]:
    """Validate a custom resource against its pinned CRD's served-version schema."""
    where = describe(obj)
    index = _crd_index(str(folder or crds_dir()))
    crd = index.get((obj.get("apiVersion"), obj.get("kind")))
    if crd is None:
        known = ", ".join(sorted(f"{k} {v}" for v, k in index))
        return [f"{where}: no CRD for apiVersion {obj.get('apiVersion')!r} (known: {known})"]
    # The CRDs say only `metadata: {type: object}`; ObjectMeta rules are checked instead.
    body = {key: value for key, value in obj.items() if key != "metadata"}
    validator = jsonschema.Draft7Validator(crd.schema)
    errors = [
        _schema_error(where, err) for err in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    ]
    return errors + _object_meta_errors(obj) + validate_name(obj)


@functools.lru_cache(maxsize=2)
def _object_meta_validator(version: str) -> jsonschema.Validator:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = base / f"v{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    schema = json.loads((folder / "objectmeta-meta-v1.json").read_text())
    registry = referencing.Registry().with_resources(
        [
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
            ("/api/_definitions.json", referencing.Resource.from_contents(definitions)),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _object_meta_errors(obj: Obj) -> list[str]:
    validator = _object_meta_validator(schema_version())
    meta = obj.get("metadata") or {}
    return [
        f"{describe(obj)}: metadata.{'.'.join(map(str, e.absolute_path)) or ''}: {e.message}"
        for e in validator.iter_errors(meta)
    ]


def validate_schema(obj: Obj, k8s_version: str = KUBERNETES_VERSION) -> list[str]:
    """Dispatch to the CRD or the built-in schema."""
    if is_custom_resource(obj):
        return validate_custom_resource(obj)
    return validate_builtin(obj, k8s_version)


# --------------------------------------------------------------------------- pod views


@dataclass
class PodView:
    """The pod a workload object will run, as far as it can be known offline."""

    owner: str
    namespace: str | None
    labels: dict[str, str]
    spec: Obj
    claim_templates: tuple[str, ...] = ()
    # A TrainJob without trainer.image runs the runtime's (pinned) image.
    image_optional: bool = False


def pod_views(obj: Obj) -> list[PodView]:
    kind, spec, ns = obj.get("kind"), obj.get("spec") or {}, _namespace(obj)
    where = describe(obj)
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        template = spec.get("template") or {}
        claims = tuple(_dig(t, "metadata", "name") for t in spec.get("volumeClaimTemplates") or [])
        return [_view(where, ns, template, claims)]
    if kind == "CronJob":
        return [_view(where, ns, _dig(spec, "jobTemplate", "spec", "template") or {})]
    if kind == "Pod":
        return [PodView(where, ns, _dig(obj, "metadata", "labels") or {}, spec)]
    if kind == "RayCluster":
        views = [_view(f"{where} head", ns, _dig(spec, "headGroupSpec", "template") or {})]
        for group in spec.get("workerGroupSpecs") or []:
            views.append(_view(f"{where} {group.get('groupName')}", ns, group.get("template") or {}))
        return views
    if kind == "InferenceService":
        predictor = spec.get("predictor") or {}
        # Only spec.predictor.labels is certain to reach the predictor pods.
        return [PodView(f"{where} predictor", ns, predictor.get("labels") or {}, predictor)]
    if kind == "TrainJob":
        return [_trainjob_view(obj)]
    return []


def _view(owner: str, ns: str | None, template: Obj, claims: tuple = ()) -> PodView:
    return PodView(owner, ns, _dig(template, "metadata", "labels") or {}, template.get("spec") or {}, claims)


def _trainjob_view(obj: Obj) -> PodView:
    """The trainer pod: runtime container `node` + spec.trainer + runtimePatches for `node`."""
    spec = obj.get("spec") or {}
    trainer = spec.get("trainer") or {}
    labels: dict[str, str] = {}
    pod: Obj = {"volumes": [], "containers": []}
    node: Obj = {"name": "node", "env": list(trainer.get("env") or [])}
    if trainer.get("image"):
        node["image"] = trainer["image"]
    if trainer.get("resourcesPerNode"):
        node["resources"] = trainer["resourcesPerNode"]
    for patch in spec.get("runtimePatches") or []:
        jobs = _dig(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []
        for job in jobs:
            if job.get("name") != "node":
                continue
            template = _dig(job, "template", "spec", "template") or {}
            labels.update(_dig(template, "metadata", "labels") or {})
            pod_spec = template.get("spec") or {}
            pod["volumes"] += pod_spec.get("volumes") or []
            for key in ("securityContext", "serviceAccountName"):
                if key in pod_spec:
                    pod[key] = pod_spec[key]
            for container in pod_spec.get("containers") or []:
                if container.get("name") == "node":
                    node["env"] += container.get("env") or []
                    for key in ("volumeMounts", "securityContext", "envFrom"):
                        if key in container:
                            node[key] = container[key]
    pod["containers"].append(node)
    return PodView(f"{describe(obj)} trainer", _namespace(obj), labels, pod, image_optional=True)


def _containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


# --------------------------------------------------------------------------- semantic checks


class _Index:
    def __init__(self, objs: list[Obj]) -> None:
        self.by_key: dict[tuple[str, str | None, str], Obj] = {}
        for obj in objs:
            name = _dig(obj, "metadata", "name")
            self.by_key[(obj.get("kind", ""), _namespace(obj), name)] = obj

    def get(self, kind: str, ns: str | None, name: str) -> Obj | None:
        return self.by_key.get((kind, ns, name))

    def keys_of(self, kind: str, ns: str | None, name: str) -> set[str] | None:
        obj = self.get(kind, ns, name)
        if obj is None:
            return None
        fields = ("data", "stringData") if kind == "Secret" else ("data", "binaryData")
        return {key for field in fields for key in (obj.get(field) or {})}


def image_errors(image: str | None) -> list[str]:
    if not image:
        return ["has no image"]
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"image {image!r} has no tag (pin a version)"]
    if last.rsplit(":", 1)[1] == "latest":
        return [f"image {image!r} uses :latest (pin a version)"]
    return []


def _security_errors(container: Obj, pod_context: Obj) -> list[str]:
    ctx = container.get("securityContext") or {}
    errors = []
    non_root = ctx.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    if non_root is not True:
        errors.append("runAsNonRoot is not true")
    if ctx.get("runAsUser", pod_context.get("runAsUser")) == 0:
        errors.append("runs as uid 0")
    if ctx.get("allowPrivilegeEscalation") is not False:
        errors.append("allowPrivilegeEscalation is not false")
    if "ALL" not in (_dig(ctx, "capabilities", "drop") or []):
        errors.append("does not drop ALL capabilities")
    if ctx.get("privileged"):
        errors.append("is privileged")
    return errors


def _resource_errors(container: Obj) -> list[str]:
    resources = container.get("resources") or {}
    errors = []
    for section in ("requests", "limits"):
        missing = [r for r in ("cpu", "memory") if r not in (resources.get(section) or {})]
        if missing:
            errors.append(f"has no {section} for {', '.join(missing)}")
    return errors


def _env_reference_errors(container: Obj, ns: str | None, index: _Index) -> list[str]:
    errors = []
    for env in container.get("env") or []:
        for ref_kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            ref = _dig(env, "valueFrom", field)
            if ref and not ref.get("optional"):
                errors += _key_errors(ref_kind, ns, ref.get("name"), ref.get("key"), index)
    for source in container.get("envFrom") or []:
        for ref_kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            ref = source.get(field)
            if ref and not ref.get("optional") and index.get(ref_kind, ns, ref.get("name")) is None:
                errors.append(f"envFrom {ref_kind} {ref.get('name')!r} does not exist")
    return errors


def _key_errors(kind: str, ns: str | None, name: str, key: str, index: _Index) -> list[str]:
    keys = index.keys_of(kind, ns, name)
    if keys is None:
        return [f"references {kind} {name!r}, which does not exist"]
    if key not in keys:
        return [f"references key {key!r} of {kind} {name!r}, which has only {sorted(keys)}"]
    return []


def _volume_errors(view: PodView, index: _Index) -> list[str]:
    errors = []
    volumes = {v.get("name"): v for v in view.spec.get("volumes") or []}
    ns = view.namespace
    for volume in volumes.values():
        claim = _dig(volume, "persistentVolumeClaim", "claimName")
        if claim and index.get("PersistentVolumeClaim", ns, claim) is None:
            errors.append(f"volume {volume['name']!r}: PVC {claim!r} does not exist")
        for kind, field, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            source = volume.get(field)
            if not source or source.get("optional"):
                continue
            if index.get(kind, ns, source.get(name_key)) is None:
                errors.append(f"volume {volume['name']!r}: {kind} {source.get(name_key)!r} does not exist")
            for item in source.get("items") or []:
                errors += _key_errors(kind, ns, source.get(name_key), item.get("key"), index)
    for container in _containers(view.spec):
        for mount in container.get("volumeMounts") or []:
            name = mount.get("name")
            if name not in volumes and name not in view.claim_templates:
                errors.append(f"container {container.get('name')!r} mounts unknown volume {name!r}")
                continue
            source = (volumes.get(name) or {}).get("configMap")
            if source and mount.get("subPath"):
                errors += _key_errors("ConfigMap", ns, source.get("name"), mount["subPath"], index)
    return errors


def _pod_errors(view: PodView, index: _Index) -> list[str]:
    errors = []
    pod_context = view.spec.get("securityContext") or {}
    for container in _containers(view.spec):
        label = f"container {container.get('name')!r}"
        problems = []
        if container.get("image") or not view.image_optional:
            problems += image_errors(container.get("image"))
        problems += _security_errors(container, pod_context)
        problems += _resource_errors(container)
        problems += _env_reference_errors(container, view.namespace, index)
        errors += [f"{label} {p}" for p in problems]
    errors += _volume_errors(view, index)
    account = view.spec.get("serviceAccountName")
    if account and account != "default" and index.get("ServiceAccount", view.namespace, account) is None:
        errors.append(f"ServiceAccount {account!r} does not exist")
    return [f"{view.owner}: {e}" for e in errors]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _service_errors(service: Obj, views: list[PodView]) -> list[str]:
    selector = _dig(service, "spec", "selector") or {}
    if not selector:
        return []
    ns = _namespace(service)
    selected = [v for v in views if v.namespace == ns and _selects(selector, v.labels)]
    if not selected:
        return [f"{describe(service)}: selector {selector} selects no pod template"]
    errors = []
    for port in _dig(service, "spec", "ports") or []:
        target = port.get("targetPort")
        if isinstance(target, str):
            named = {
                p.get("name") for v in selected for c in v.spec.get("containers") or [] for p in c.get("ports") or []
            }
            if target not in named:
                errors.append(f"{describe(service)}: targetPort {target!r} is no container port name")
    return errors


def _network_policy_errors(policy: Obj, views: list[PodView]) -> list[str]:
    ns = _namespace(policy)
    local = [v for v in views if v.namespace == ns]
    errors = []
    target = _dig(policy, "spec", "podSelector", "matchLabels") or {}
    if target and not any(_selects(target, v.labels) for v in local):
        errors.append(f"{describe(policy)}: podSelector {target} selects no pod template")
    for rule in _dig(policy, "spec", "ingress") or []:
        for peer in rule.get("from") or []:
            match = _dig(peer, "podSelector", "matchLabels") or {}
            if match and "namespaceSelector" not in peer and not any(_selects(match, v.labels) for v in local):
                errors.append(f"{describe(policy)}: ingress podSelector {match} selects no pod template")
    return errors


def _postgres_label_errors(views: list[PodView], index: _Index) -> list[str]:
    """Pods given the Postgres credentials must pass the NetworkPolicy (carry the label)."""
    errors = []
    for view in views:
        service = index.get("Service", view.namespace, POSTGRES_SERVICE)
        if service and _selects(_dig(service, "spec", "selector") or {}, view.labels):
            continue  # the server itself
        if _uses_secret(view.spec, POSTGRES_SECRET) and view.labels.get(POSTGRES_CLIENT_LABEL) != "true":
            errors.append(
                f"{view.owner}: gets {POSTGRES_SECRET} but lacks label "
                f'{POSTGRES_CLIENT_LABEL}: "true" (the NetworkPolicy would block it)'
            )
    return errors


def _uses_secret(spec: Obj, name: str) -> bool:
    for container in _containers(spec):
        if any(_dig(s, "secretRef", "name") == name for s in container.get("envFrom") or []):
            return True
        if any(_dig(e, "valueFrom", "secretKeyRef", "name") == name for e in container.get("env") or []):
            return True
    return False


def semantic_errors(objs: list[Obj]) -> list[str]:
    """Cross-object checks within the set (independent of this project's contract)."""
    index = _Index(objs)
    views = [view for obj in objs for view in pod_views(obj)]
    errors: list[str] = []
    for obj in objs:
        if obj.get("kind") not in CLUSTER_SCOPED_KINDS and not _dig(obj, "metadata", "namespace"):
            errors.append(f"{describe(obj)}: no metadata.namespace (it would land in the current context's)")
        if obj.get("kind") == "Service":
            errors += _service_errors(obj, views)
        if obj.get("kind") == "NetworkPolicy":
            errors += _network_policy_errors(obj, views)
    for view in views:
        errors += _pod_errors(view, index)
    errors += _postgres_label_errors(views, index)
    return errors


# --------------------------------------------------------------------------- pipeline contract


def _config(objs: list[Obj]) -> dict[str, str]:
    for obj in objs:
        if obj.get("kind") == "ConfigMap" and _dig(obj, "metadata", "name") == PIPELINE_CONFIG:
            return dict(obj.get("data") or {})
    return {}


def _service_ports(objs: list[Obj]) -> dict[str, set[int]]:
    """Service host names (short and qualified) -> ports, including KubeRay head Services."""
    services: dict[str, set[int]] = {}
    for obj in objs:
        ns = _namespace(obj) or "default"
        if obj.get("kind") == "Service":
            name, ports = obj["metadata"]["name"], {p["port"] for p in _dig(obj, "spec", "ports") or []}
        elif obj.get("kind") == "RayCluster":
            name, ports = f"{obj['metadata']['name']}-head-svc", _ray_head_ports(obj)
        else:
            continue
        for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
            services[host] = ports
    return services


def _ray_head_ports(cluster: Obj) -> set[int]:
    head = _dig(cluster, "spec", "headGroupSpec", "template", "spec", "containers", 0) or {}
    declared = {p["containerPort"] for p in head.get("ports") or []}
    # KubeRay exposes its defaults only when the head declares no ports; metrics always.
    return (declared | {8080}) if declared else {10001, 6379, 8265, 8080, 8000}


def _endpoint_errors(label: str, host: str | None, port: int | None, services: dict[str, set[int]]) -> list[str]:
    if not host:
        return [f"{label}: no host"]
    if host not in services:
        return [f"{label}: host {host!r} is no Service in the manifests"]
    if port is not None and port not in services[host]:
        return [f"{label}: Service {host!r} has no port {port} (has {sorted(services[host])})"]
    return []


def _expand(value: str, env: dict[str, str]) -> str:
    return _ENV_REF.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)


_ENDPOINT_SCHEMES = frozenset({"postgresql", "postgres", "http", "https", "ray", "redis", "grpc"})


def _feature_store_errors(objs: list[Obj], root: Path, services: dict[str, set[int]]) -> list[str]:
    """Hosts in feature_store.yaml (after ${VAR} expansion from pipeline-config) are Services."""
    path = root / "feature_repo" / "feature_store.yaml"
    if not path.exists():
        return [f"{path} does not exist"]
    text = path.read_text()
    errors = []
    generated = next(
        (o for o in objs if o.get("kind") == "ConfigMap" and _dig(o, "metadata", "name") == "feature-repo"),
        None,
    )
    if generated is None:
        errors.append("ConfigMap/feature-repo is missing")
    elif (generated.get("data") or {}).get("feature_store.yaml") != text:
        errors.append("ConfigMap/feature-repo: feature_store.yaml differs from feature_repo/")
    env = _config(objs)
    for key_path, value, parent in _walk_strings(yaml.safe_load(text)):
        label = f"feature_store.yaml {key_path}={value!r}"
        expanded = _expand(value, env)
        if key_path.rsplit(".", 1)[-1] == "host":
            port = _expand(str(parent.get("port", "")), env)
            errors += _host_errors(label, expanded, int(port) if port.isdigit() else None, services)
        elif "://" in expanded and expanded.split("://")[0].split("+")[0] in _ENDPOINT_SCHEMES:
            url = urlparse(expanded)
            errors += _host_errors(label, url.hostname or "", url.port, services)
    return errors


def _host_errors(label: str, host: str, port: int | None, services: dict[str, set[int]]) -> list[str]:
    if "$" in host or "{" in host:
        return [f"{label}: host variable not set by {PIPELINE_CONFIG}"]
    return _endpoint_errors(label, host, port, services)


def _walk_strings(node: Any, prefix: str = "", parent: Obj | None = None) -> Iterator[tuple[str, str, Obj]]:
    """(dotted key path, string value, the dict holding it) for every string leaf."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_strings(value, f"{prefix}.{key}" if prefix else str(key), node)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_strings(value, f"{prefix}[{i}]", parent)
    elif isinstance(node, str):
        yield prefix, node, parent or {}


def ray_versions(root: Path) -> dict[str, str | None]:
    """The Ray version of the Dockerfile base image and of the requirements pin."""
    dockerfile = (root / "Dockerfile").read_text() if (root / "Dockerfile").exists() else ""
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py\d+", dockerfile, re.M)
    reqs = (root / "requirements.txt").read_text() if (root / "requirements.txt").exists() else ""
    pin = re.search(r"^ray(\[[^\]]*\])?==([\w.]+)", reqs, re.M)
    return {
        "Dockerfile": base.group(1) if base else None,
        "requirements.txt": pin.group(2) if pin else None,
    }


def _ray_errors(objs: list[Obj], root: Path) -> list[str]:
    clusters = [o for o in objs if o.get("kind") == "RayCluster"]
    if not clusters:
        return ["no RayCluster in the manifests"]
    errors = []
    versions = ray_versions(root)
    for cluster in clusters:
        where, spec = describe(cluster), cluster.get("spec") or {}
        for source, version in versions.items():
            if spec.get("rayVersion") != version:
                errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {source} Ray {version!r}")
        groups = spec.get("workerGroupSpecs") or []
        counts = [(g.get("replicas"), g.get("minReplicas"), g.get("maxReplicas")) for g in groups]
        if counts != [(RAY_WORKER_REPLICAS,) * 3]:
            errors.append(f"{where}: want one worker group with replicas=min=max={RAY_WORKER_REPLICAS}, got {counts}")
    return errors


def _project_image_errors(objs: list[Obj]) -> list[str]:
    """The RayCluster's image is the project image; every use of it is identical."""
    images: dict[str, set[str]] = {}
    errors = []
    for obj in objs:
        for view in pod_views(obj):
            for container in _containers(view.spec):
                image = container.get("image") or ""
                images.setdefault(image.rsplit(":", 1)[0], set()).add(image)
                if "RAY_ADDRESS" in {e.get("name") for e in container.get("env") or []}:
                    errors.append(f"{view.owner}: sets RAY_ADDRESS (Feast would switch to remote mode)")
    ray_image = next(
        (
            _dig(o, "spec", "headGroupSpec", "template", "spec", "containers", 0, "image")
            for o in objs
            if o.get("kind") == "RayCluster"
        ),
        None,
    )
    if ray_image:
        variants = images.get(ray_image.rsplit(":", 1)[0], set())
        if len(variants) > 1:
            errors.append(f"project image used with different tags: {sorted(variants)}")
    return errors


def pipeline_errors(objs: list[Obj], root: Path = REPO_ROOT) -> list[str]:
    """The pipeline's contract: config keys and URLs, feature_store.yaml, Ray, images."""
    config = _config(objs)
    errors = [f"ConfigMap/{PIPELINE_CONFIG}: missing key {k}" for k in PIPELINE_CONFIG_KEYS if k not in config]
    services = _service_ports(objs)
    if "POSTGRES_HOST" in config:
        port = config.get("POSTGRES_PORT", "")
        errors += _endpoint_errors(
            f"{PIPELINE_CONFIG} POSTGRES_HOST", config["POSTGRES_HOST"], int(port) if port.isdigit() else None, services
        )
    for key in ("MLFLOW_TRACKING_URI", "RAY_JOBS_ADDRESS"):
        if key in config:
            url = urlparse(config[key])
            errors += _endpoint_errors(f"{PIPELINE_CONFIG} {key}", url.hostname, url.port, services)
    errors += _feature_store_errors(objs, root, services)
    errors += _ray_errors(objs, root)
    errors += _project_image_errors(objs)
    return errors


def validate(
    objs: list[Obj],
    root: Path | None = REPO_ROOT,
    k8s_version: str = KUBERNETES_VERSION,
) -> list[str]:
    """All errors of a set of objects; root=None skips the pipeline-contract checks."""
    errors = [e for obj in objs for e in validate_schema(obj, k8s_version)]
    errors += semantic_errors(objs)
    if root is not None:
        errors += pipeline_errors(objs, root)
    return errors
