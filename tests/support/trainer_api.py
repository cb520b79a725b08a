"""Kubeflow Trainer without a cluster: the TrainerClient's real Kubernetes backend with a recording stand-in for
the custom-objects API, so tests get the exact TrainJob body ``trainjob.submit`` POSTs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sales_forecast.config import Settings
from sales_forecast.contract import TRAINER_NODE, TRAINING_RUNTIME
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.trainjob import submit

NODE = TRAINER_NODE

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
