"""The step-3 InferenceService: build it, create or replace it with KServeClient, wait until ready, find its URL.

Standard deployment mode (plain Deployment + Service, no Knative), the project image running
``python -m sales_forecast.serving.server`` as the custom container ``kserve-container`` on port 8080, the settings
and credentials every pipeline pod gets (sales_forecast/cluster.py), the shared PVC (where training publishes the
champion's bundle) and the ``feature-repo`` ConfigMap over the image's feature repo, as the other pipeline pods
mount it. The pods carry the labels the PostgreSQL and MLflow NetworkPolicies admit.

``roll_to`` is the weekly cycle's: after a promotion it sets the new version in the predictor's annotation of the
InferenceService step 3 created (keeping its other choices), so KServe rolls the pods to the new champion.
"""

from __future__ import annotations

from typing import Any

from kserve import KServeClient, V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec, constants
from kubernetes import client as k8s

from sales_forecast.cluster import POD_LABELS, pod_env
from sales_forecast.config import Settings
from sales_forecast.contract import (
    APP_DIR,
    FEATURE_REPO_CONFIGMAP,
    FEATURE_REPO_FILES,
    FEATURE_REPO_MOUNT,
    IMAGE_GID,
    IMAGE_UID,
    MODEL_NAME,
    PART_OF_LABEL,
    SERVING_PORT,
    SHARED_MOUNT,
    SHARED_PVC,
    SHARED_VOLUME,
)
from sales_forecast.errors import PipelineError

INFERENCE_SERVICE = MODEL_NAME  # the README's name; the served model has the same one
MODEL_VERSION_ANNOTATION = "sales-forecast/model-version"
DEPLOYMENT_MODE = {"serving.kserve.io/deploymentMode": "Standard",
                   "serving.kserve.io/enable-prometheus-scraping": "true"}


def build_inference_service(settings: Settings, *, name: str = INFERENCE_SERVICE, model_dir: str | None = None,
                            model_uri: str | None = None, model_version: str | None = None) -> V1beta1InferenceService:
    """The InferenceService. The server loads the MLflow champion (or ``model_uri``), or with ``model_dir`` a
    bundle on the shared volume; ``model_version`` (the registry version the alias points at) goes into a pod
    annotation, so a new champion rolls the pods even when nothing else changed."""
    args = [f"--model_name={MODEL_NAME}", f"--http_port={SERVING_PORT}", "--host=0.0.0.0"]
    if model_dir:
        args.append(f"--model-dir={model_dir}")
    elif model_uri:
        args.append(f"--model-uri={model_uri}")
    predictor = V1beta1PredictorSpec(
        min_replicas=1,
        max_replicas=1,
        labels=dict(POD_LABELS),
        annotations={MODEL_VERSION_ANNOTATION: model_version} if model_version else None,
        automount_service_account_token=False,
        enable_service_links=False,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=IMAGE_UID, fs_group=IMAGE_GID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        containers=[_container(settings.image, args)],
        volumes=[
            k8s.V1Volume(name=SHARED_VOLUME, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=SHARED_PVC, read_only=True)),
            k8s.V1Volume(name="feature-repo", config_map=k8s.V1ConfigMapVolumeSource(name=FEATURE_REPO_CONFIGMAP)),
        ],
    )
    return V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1,
        kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(
            name=name, namespace=settings.namespace, annotations=dict(DEPLOYMENT_MODE),
            labels={**PART_OF_LABEL, "networking.kserve.io/visibility": "cluster-local"}),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def _container(image: str, args: list[str]) -> k8s.V1Container:
    repo_files = [k8s.V1VolumeMount(name="feature-repo", mount_path=f"{FEATURE_REPO_MOUNT}/{file}", sub_path=file,
                                    read_only=True) for file in FEATURE_REPO_FILES]
    return k8s.V1Container(
        name="kserve-container",  # KServe's name for the predictor container
        image=image,
        image_pull_policy="IfNotPresent",
        working_dir=APP_DIR,
        command=["python", "-m", "sales_forecast.serving.server"],
        args=args,
        ports=[k8s.V1ContainerPort(container_port=SERVING_PORT, protocol="TCP")],
        env=pod_env(),
        resources=k8s.V1ResourceRequirements(requests={"cpu": "250m", "memory": "1Gi"},
                                             limits={"cpu": "1", "memory": "2Gi"}),
        # Ready once the model is loaded and the feature store opened; a PostgreSQL outage is answered with 503
        # rather than by taking the pod out of the Service.
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path=f"/v1/models/{MODEL_NAME}", port=SERVING_PORT),
            initial_delay_seconds=5, period_seconds=5, timeout_seconds=2, failure_threshold=3),
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"])),
        volume_mounts=[k8s.V1VolumeMount(name=SHARED_VOLUME, mount_path=SHARED_MOUNT, read_only=True), *repo_files],
    )


def to_body(isvc: V1beta1InferenceService) -> dict[str, Any]:
    """The JSON body KServeClient sends (camelCase keys, no nulls)."""
    return k8s.ApiClient().sanitize_for_serialization(isvc)


def _is_not_found(exc: RuntimeError) -> bool:
    # KServeClient wraps every API error in a bare RuntimeError whose text holds the ApiException.
    text = str(exc)
    return "(404)" in text or "Not Found" in text


def create_or_replace(client: KServeClient, isvc: V1beta1InferenceService) -> dict[str, Any]:
    name, namespace = isvc.metadata.name, isvc.metadata.namespace
    try:
        current = client.get(name, namespace=namespace)
    except RuntimeError as exc:
        if not _is_not_found(exc):
            raise PipelineError(f"cannot read InferenceService {namespace}/{name}: {exc}") from exc
        return client.create(isvc)
    isvc.metadata.resource_version = current["metadata"]["resourceVersion"]
    return client.replace(name, isvc, namespace=namespace)


def wait_ready(client: KServeClient, applied: dict[str, Any], timeout_seconds: int) -> dict[str, Any]:
    """Wait until the applied generation is Ready; returns the InferenceService as the API server has it."""
    meta = applied["metadata"]
    try:
        client.wait_isvc_ready(meta["name"], namespace=meta["namespace"], timeout_seconds=timeout_seconds,
                               polling_interval=5, expected_generation=meta.get("generation"))
    except RuntimeError as exc:
        current = client.get(meta["name"], namespace=meta["namespace"])
        raise PipelineError(f"InferenceService {meta['namespace']}/{meta['name']} is not ready after "
                            f"{timeout_seconds} s: {describe_conditions(current)}") from exc
    return client.get(meta["name"], namespace=meta["namespace"])


def describe_conditions(isvc: dict[str, Any]) -> str:
    conditions = (isvc.get("status") or {}).get("conditions") or []
    parts = [f"{c.get('type')}={c.get('status')}" + (f" ({c['message']})" if c.get("message") else "")
             for c in conditions]
    return "; ".join(parts) or "no status conditions yet"


def cluster_url(isvc: dict[str, Any]) -> str:
    """The in-cluster address (http://<name>-predictor.<namespace>.svc.cluster.local); status.url is the
    ingress domain's, which needs DNS outside the cluster."""
    url = ((isvc.get("status") or {}).get("address") or {}).get("url")
    if not url:
        raise PipelineError(f"InferenceService {isvc['metadata']['name']} has no status.address.url")
    return url.rstrip("/")


def roll_to(client: KServeClient, namespace: str, version: str, timeout_seconds: int = 600,
            name: str = INFERENCE_SERVICE) -> bool:
    """Point the running InferenceService's model-version annotation at ``version`` and wait until the new pods
    are ready; False (and nothing changed) when step 3 has not created the InferenceService yet."""
    try:
        current = client.get(name, namespace=namespace)
    except RuntimeError as exc:
        if _is_not_found(exc):
            return False
        raise PipelineError(f"cannot read InferenceService {namespace}/{name}: {exc}") from exc
    predictor = current["spec"]["predictor"]
    if (predictor.get("annotations") or {}).get(MODEL_VERSION_ANNOTATION) == version:
        return True
    predictor["annotations"] = {**(predictor.get("annotations") or {}), MODEL_VERSION_ANNOTATION: version}
    applied = client.replace(name, current, namespace=namespace)
    wait_ready(client, applied, timeout_seconds)
    return True
