"""Submit ``train_sales_model`` as a Kubeflow Trainer v2 TrainJob (runtime ``torch-distributed``), or build the
exact body that submission POSTs without a cluster.

The pods run the project image. The cluster wiring goes in through one RuntimePatch on the runtime's
replicated job and container, both named ``node``: the shared PVC at /mnt/shared, the connection settings from
ConfigMap ``pipeline-config``, the PostgreSQL credentials from Secret ``postgres-credentials`` (env valueFrom:
the SDK's ContainerPatch has no envFrom), the label the PostgreSQL NetworkPolicy admits, and a non-root
security context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.train import train_sales_model

TRAINING_RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's replicated job and its trainer container
SHARED_PVC, SHARED_VOLUME, SHARED_MOUNT = "mlops-shared", "shared", "/mnt/shared"
PIPELINE_CONFIG, POSTGRES_SECRET = "pipeline-config", "postgres-credentials"
POSTGRES_CLIENT_LABEL = "sales-forecast/postgres-client"
CONFIG_KEYS = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "MLFLOW_TRACKING_URI", "MODEL_DIR", "FEAST_REPO_PATH")
SECRET_KEYS = ("POSTGRES_USER", "POSTGRES_PASSWORD")
DEFAULT_RESOURCES = {"cpu": "2", "memory": "4Gi"}
IMAGE_UID, IMAGE_GID = 1000, 100  # the project image's user (Dockerfile)
JOB_LABELS = {"app.kubernetes.io/part-of": "sales-forecast", "app.kubernetes.io/name": "sales-training"}

# kubeflow/trainer v2.3.0 manifests/base/runtimes/torch_distributed.yaml, the parts the SDK reads to build a
# TrainJob: framework label, mlPolicy, and the `node` container marked by the ancestor-step label.
TORCH_DISTRIBUTED_RUNTIME: dict[str, Any] = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": TRAINING_RUNTIME, "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {"spec": {"replicatedJobs": [{
            "name": NODE,
            "template": {
                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                "spec": {"template": {"spec": {"containers": [{
                    "name": NODE, "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime",
                    "command": ["/bin/bash", "-c", 'echo "Torch Distributed Runtime"']}]}}},
            },
        }]}},
    },
}


def _pod_env() -> list[dict[str, Any]]:
    config = [{"name": key, "valueFrom": {"configMapKeyRef": {"name": PIPELINE_CONFIG, "key": key}}}
              for key in CONFIG_KEYS]
    secret = [{"name": key, "valueFrom": {"secretKeyRef": {"name": POSTGRES_SECRET, "key": key}}}
              for key in SECRET_KEYS]
    return config + secret


def runtime_patch():
    from kubeflow.trainer.options import (
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainingRuntimeSpecPatch,
    )

    # The training set's point-in-time join runs on a Ray inside this pod: its object store lives in /dev/shm,
    # which a container gets only 64Mi of by default.
    container = ContainerPatch(
        name=NODE, env=_pod_env(),
        volume_mounts=[{"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}],
        security_context={"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                          "capabilities": {"drop": ["ALL"]}})
    pod = PodTemplatePatch(
        metadata={"labels": {POSTGRES_CLIENT_LABEL: "true"}},
        spec=PodSpecPatch(
            security_context={"runAsNonRoot": True, "runAsUser": IMAGE_UID, "fsGroup": IMAGE_GID,
                              "seccompProfile": {"type": "RuntimeDefault"}},
            volumes=[{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": SHARED_PVC}},
                     {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
            containers=[container]))
    job = ReplicatedJobPatch(name=NODE, template=JobTemplatePatch(spec=JobSpecPatch(template=pod)))
    return RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(
        template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[job]))))


def custom_trainer(params: TrainingParams, settings: Settings, num_nodes: int, resources: dict[str, str]):
    from kubeflow.trainer import CustomTrainer

    return CustomTrainer(
        func=train_sales_model, func_args=params.as_literal(), image=settings.image, num_nodes=num_nodes,
        resources_per_node=resources,
        env={"MLFLOW_EXPERIMENT_NAME": params.experiment or settings.mlflow_experiment, "PYTHONUNBUFFERED": "1"})


def submit(client, params: TrainingParams, settings: Settings, num_nodes: int = 1,
           resources: dict[str, str] | None = None) -> str:
    """client.train(...) exactly as the real submission does it; ``params.trainjob`` names the job."""
    from kubeflow.trainer.options import Labels, Name

    if not params.trainjob:
        raise ValueError("params.trainjob must name the TrainJob (see new_job_name)")

    trainer = custom_trainer(params, settings, num_nodes, resources or DEFAULT_RESOURCES)
    return client.train(runtime=TRAINING_RUNTIME, trainer=trainer,
                        options=[Name(params.trainjob), Labels(dict(JOB_LABELS)), runtime_patch()])


# ------------------------------------------------------------------ the body, without a cluster


class _Reply:
    """What CustomObjectsApi returns for async_req=True: an object whose get() gives the result."""

    def __init__(self, value: Any = None, error: Exception | None = None):
        self.value, self.error = value, error

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class CreateRequest:
    group: str
    version: str
    namespace: str
    plural: str
    body: dict[str, Any]


class RecordingCustomObjectsApi:
    """Stands in for kubernetes.client.CustomObjectsApi: serves the torch-distributed runtime (cluster scope
    only, as installed by the Trainer's runtimes overlay) and records what would be created."""

    def __init__(self, runtime: dict[str, Any]):
        self.runtime = runtime
        self.created: list[CreateRequest] = []

    @staticmethod
    def _not_found() -> _Reply:
        from kubernetes.client.exceptions import ApiException

        return _Reply(error=ApiException(status=404, reason="Not Found"))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs) -> _Reply:
        return self._not_found()

    def get_cluster_custom_object(self, group, version, plural, name, **kwargs) -> _Reply:
        return _Reply(self.runtime) if name == self.runtime["metadata"]["name"] else self._not_found()

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs) -> dict:
        self.created.append(CreateRequest(group, version, namespace, plural, body))
        return body


def offline_client(namespace: str, runtime: dict[str, Any] | None = None):
    """A TrainerClient on the real Kubernetes backend whose custom-objects API is a RecordingCustomObjectsApi.

    The backend's start-up probe of the Trainer control plane goes to a closed loopback port and only warns,
    as it does on a cluster without the Trainer's public ConfigMap; the warning is silenced here.
    """
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubernetes.client import Configuration

    configuration = Configuration(host="http://127.0.0.1:9")
    configuration.retries = False
    backend_logger = logging.getLogger("kubeflow.trainer.backends.kubernetes.backend")
    level = backend_logger.level
    backend_logger.setLevel(logging.ERROR)
    try:
        client = TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=configuration))
    finally:
        backend_logger.setLevel(level)
    client.backend.custom_api = RecordingCustomObjectsApi(runtime or TORCH_DISTRIBUTED_RUNTIME)
    return client


def build_trainjob_body(params: TrainingParams, settings: Settings, num_nodes: int = 1,
                        resources: dict[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob that ``submit`` POSTs to namespaces/<settings.namespace>/trainjobs, byte for byte (the API
    server adds metadata.namespace from the URL)."""
    client = offline_client(settings.namespace)
    submit(client, params, settings, num_nodes, resources)
    (request,) = client.backend.custom_api.created
    return request.body


# ------------------------------------------------------------------ the real submission


def kubernetes_client(namespace: str):
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubernetes.config.config_exception import ConfigException

    try:
        return TrainerClient(KubernetesBackendConfig(namespace=namespace))
    except ConfigException as exc:
        raise PipelineError(f"no Kubernetes configuration (kubeconfig or in-cluster): {exc}") from exc


def run_on_kubernetes(params: TrainingParams, settings: Settings, num_nodes: int, resources: dict[str, str],
                      timeout_s: int) -> str:
    """Submit, follow the logs until Complete or Failed, and return the job name; PipelineError on failure."""
    from sales_forecast.timing import console
    from sales_forecast.training.jobs import follow_job

    client = kubernetes_client(settings.namespace)
    try:
        name = submit(client, params, settings, num_nodes, resources)
    except (RuntimeError, TimeoutError) as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise PipelineError(f"{exc}{cause}") from exc
    console.print(f"submitted TrainJob {settings.namespace}/{name} (runtime {TRAINING_RUNTIME}, image "
                  f"{settings.image}, {num_nodes} node(s))")
    follow_job(client, name, timeout_s)
    return name
