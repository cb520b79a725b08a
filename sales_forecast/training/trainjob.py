"""Submit ``train_sales_model`` as a Kubeflow Trainer v2 TrainJob (runtime ``torch-distributed``) and follow it;
``follow_job`` and ``find_run`` serve the LocalProcess backend too (same TrainerClient API).

The pods run the project image. The cluster wiring goes in through one RuntimePatch on the runtime's
replicated job and container, both named ``node``: the shared PVC at /mnt/shared, the connection settings from
ConfigMap ``pipeline-config``, the PostgreSQL credentials from Secret ``postgres-credentials`` (env valueFrom:
the SDK's ContainerPatch has no envFrom), the label the PostgreSQL NetworkPolicy admits, and a non-root
security context.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sales_forecast.cluster import POD_LABELS, pod_env
from sales_forecast.config import Settings
from sales_forecast.contract import (
    IMAGE_GID,
    IMAGE_UID,
    PART_OF_LABEL,
    SHARED_MOUNT,
    SHARED_PVC,
    SHARED_VOLUME,
    TRAINER_NODE,
    TRAINING_RUNTIME,
)
from sales_forecast.errors import PipelineError
from sales_forecast.timing import console
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import train_sales_model

NODE = TRAINER_NODE
DEFAULT_RESOURCES = {"cpu": "2", "memory": "4Gi"}
JOB_LABELS = {**PART_OF_LABEL, "app.kubernetes.io/name": "sales-training"}

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
        name=NODE, env=pod_env(),
        volume_mounts=[{"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}],
        security_context={"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                          "capabilities": {"drop": ["ALL"]}})
    pod = PodTemplatePatch(
        metadata={"labels": dict(POD_LABELS)},
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
        func=train_sales_model, func_args=params.as_func_args(), image=settings.image, num_nodes=num_nodes,
        resources_per_node=resources,
        env={"MLFLOW_EXPERIMENT_NAME": params.experiment or settings.mlflow_experiment, "PYTHONUNBUFFERED": "1",
             # the point-in-time join runs on a Ray inside the pod (a TrainJob is no Ray job on feast-ray)
             "FEAST_RAY_EXECUTION_MODE": "local"})


def submit(client, params: TrainingParams, settings: Settings, num_nodes: int = 1,
           resources: dict[str, str] | None = None) -> str:
    """client.train(...) exactly as the real submission does it; ``params.trainjob`` names the job."""
    from kubeflow.trainer.options import Labels, Name

    if not params.trainjob:
        raise ValueError("params.trainjob must name the TrainJob (see new_job_name)")
    params.check()  # refused here, before anything reaches the cluster

    trainer = custom_trainer(params, settings, num_nodes, resources or DEFAULT_RESOURCES)
    return client.train(runtime=TRAINING_RUNTIME, trainer=trainer,
                        options=[Name(params.trainjob), Labels(dict(JOB_LABELS)), runtime_patch()])


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


# ------------------------------------------------------------------ following a job (any backend)


COMPLETE, FAILED = "Complete", "Failed"  # kubeflow.trainer.constants TRAINJOB_COMPLETE / TRAINJOB_FAILED


def new_job_name() -> str:
    return f"sales-train-{uuid.uuid4().hex[:8]}"


class LogPrinter:
    """Prints the lines of a job's log that were not printed yet (logs are re-read on every poll)."""

    def __init__(self, client, name: str, write: Callable[[str], None] = print):
        self.client, self.name, self.write, self.printed = client, name, write, 0

    def __call__(self, _job=None) -> None:
        try:
            lines = list(self.client.get_job_logs(self.name))
        except (RuntimeError, ValueError):  # the pod is not there yet, or not readable yet
            return
        for line in lines[self.printed:]:
            self.write(line)
        self.printed = max(self.printed, len(lines))


def follow_job(client, name: str, timeout_s: int, polling_s: int = 2) -> str:
    """Wait for Complete or Failed (never only Complete: LocalProcess would then poll a failed job until the
    timeout), printing the log as it grows; raises PipelineError unless the job completed."""
    printer = LogPrinter(client, name)
    try:
        job = client.wait_for_job_status(name, status={COMPLETE, FAILED}, timeout=timeout_s,
                                         polling_interval=polling_s, callbacks=[printer])
    except TimeoutError as exc:
        printer()
        raise PipelineError(f"TrainJob {name} did not finish within {timeout_s} s") from exc
    printer()
    if job.status != COMPLETE:
        raise PipelineError(f"TrainJob {name} ended {job.status}; its log is above")
    return job.status


def find_run(uri: str, experiment: str, trainjob: str) -> tuple[str, str] | None:
    """(run id, run URL) of the run tagged with this TrainJob, or None when MLflow cannot say."""
    import mlflow

    from sales_forecast.training.tracking import run_url

    client = mlflow.MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], filter_string=f"tags.trainjob = '{trainjob}'",
                                  max_results=1) if found else []
    except Exception as exc:  # noqa: BLE001 - only a convenience: the job's own log names the run
        console.print(f"could not look up the MLflow run of {trainjob}: {type(exc).__name__}: {exc}")
        return None
    if not runs:
        return None
    run = runs[0]
    return run.info.run_id, run_url(uri, run.info.experiment_id, run.info.run_id)
