"""Run a command as a Ray job on a Ray cluster, through the job-submission API (dashboard port 8265).

Feast's Ray materialization crashes through Ray Client (ray://, Ray 2.58), so on Kubernetes the step runs
with its driver on the cluster: Ray sets RAY_ADDRESS for the job and Feast connects to the cluster from there.

The job gets the submitter's settings without the credentials: Ray's job list shows a job's runtime_env to
anyone who can reach the dashboard, so the Ray pods get the PostgreSQL Secret themselves (secretKeyRef).
"""

from __future__ import annotations

import asyncio
import time

from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError
from sales_forecast.timing import console

RAY_OWN_VARIABLES = ("RAY_ADDRESS", "FEAST_RAY_EXECUTION_MODE")  # the cluster sets these for its drivers


def job_environment(settings: Settings) -> dict[str, str]:
    env = settings.environment(secrets=False)
    for name in RAY_OWN_VARIABLES:
        env.pop(name, None)
    return env


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # the client raises ConnectionError, RuntimeError or ValueError by case
        raise PipelineError(f"Ray job-submission API at {address} is unreachable: {exc}") from exc


def _submit(client, entrypoint: str, env: dict[str, str], agent_wait_s: float = 90) -> str:
    """Submit, waiting for the head's job agent: it starts after the dashboard answers."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise PipelineError(f"Ray job submission failed: {exc}") from exc
            time.sleep(1)


def run_ray_job(address: str, entrypoint: str, env: dict[str, str], timeout_s: float = 1800) -> None:
    """Submit ``entrypoint``, stream its logs, and raise PipelineError unless it succeeds."""
    from ray.job_submission import JobStatus

    client = _client(address)
    job_id = _submit(client, entrypoint, env)
    console.print(f"submitted Ray job {job_id} to {address}")

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise PipelineError(f"Ray job {job_id} ended {status}: {info.message or 'see its logs above'}")
