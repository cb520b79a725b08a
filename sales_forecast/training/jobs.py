"""Follow a TrainJob submitted through TrainerClient (any backend) and find the MLflow run it logged."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sales_forecast.errors import PipelineError
from sales_forecast.timing import console

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
