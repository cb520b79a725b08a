"""The services a step needs: the configured ones, or the project's own on loopback (the embedded stack).

With ``POSTGRES_HOST`` unset a step starts (or reuses) an embedded PostgreSQL, an MLflow server when
``MLFLOW_TRACKING_URI`` is unset, and a Ray head when neither ``RAY_ADDRESS`` nor
``FEAST_RAY_EXECUTION_MODE=local`` says otherwise; ``python -m sales_forecast.stack up|down|status`` manages
them by hand. A configured service is only checked, never started: an unreachable one fails in one line.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urlparse

from sales_forecast.config import Settings, apply_to_environment
from sales_forecast.errors import PipelineError, first_line

MLFLOW_CHECK_TIMEOUT_S = 5.0


def ensure_postgres(settings: Settings) -> None:
    """Start the embedded server when none is configured; otherwise fail fast if the configured one is down."""
    import psycopg

    from sales_forecast.stack import postgres

    if settings.postgres.embedded:
        postgres.start(settings.postgres, settings.stack_dir / "postgres")
        return
    try:
        with psycopg.connect(settings.postgres.libpq_url(), connect_timeout=10):
            pass
    except psycopg.OperationalError as exc:
        reason = first_line(exc).rsplit(": ", 1)[-1]  # e.g. "Connection refused", without libpq's preamble
        raise PipelineError(f"PostgreSQL at {settings.postgres.host}:{settings.postgres.port} "
                            f"is unreachable: {reason}") from exc


def check_mlflow(uri: str, timeout: float = MLFLOW_CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when an HTTP tracking server is down."""
    import httpx

    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        response = httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise PipelineError(f"the MLflow tracking server at {uri} is unreachable ({type(exc).__name__}: {exc}); "
                            "start it (python -m sales_forecast.stack up) or set MLFLOW_TRACKING_URI") from exc
    if response.status_code >= 500:
        raise PipelineError(f"the MLflow tracking server at {uri} answered HTTP {response.status_code} on /health")


def ensure_mlflow(settings: Settings, wait: bool = True) -> Settings:
    """Settings whose tracking URI answers: the configured one, checked, or the embedded server, started (with
    ``wait=False`` only launched: ``wait_for_mlflow`` before the first use)."""
    from sales_forecast.stack import mlflow_server

    if settings.mlflow_tracking_uri:
        check_mlflow(settings.mlflow_tracking_uri)
        return settings
    uri = mlflow_server.start(settings.stack_dir, settings.stack_ports.mlflow, wait=wait)
    return dataclasses.replace(settings, mlflow_tracking_uri=uri)


def wait_for_mlflow(settings: Settings) -> None:
    """Until the embedded server that ``ensure_services(..., wait_for_mlflow=False)`` launched answers; a configured
    server was checked then."""
    from sales_forecast.stack import mlflow_server

    if settings.mlflow_tracking_uri == settings.embedded_mlflow_uri:
        mlflow_server.wait_ready(settings.stack_dir, settings.stack_ports.mlflow)


def ensure_ray(settings: Settings) -> Settings:
    """Settings with the Ray to attach to: RAY_ADDRESS, a Ray inside the process (mode local), or the embedded
    head, started on demand."""
    from sales_forecast.stack import ray_head

    if settings.ray_address or settings.ray_mode == "local":
        return settings
    head = ray_head.start(settings.stack_dir, settings.stack_ports.ray, settings.stack_ports.ray_dashboard,
                          reserved=(settings.postgres.port, settings.stack_ports.mlflow))
    return dataclasses.replace(settings, ray_address=head)


def ensure_services(settings: Settings, *, mlflow: bool = False, ray: bool = False,
                    wait_for_mlflow: bool = True) -> Settings:
    """PostgreSQL, and MLflow / Ray when asked; returns the resolved settings, also put into os.environ (Feast
    reads its connection and Ray address from there). ``wait_for_mlflow=False``: an embedded MLflow server is
    launched, not waited for (see ``wait_for_mlflow``)."""
    ensure_postgres(settings)
    if mlflow:
        settings = ensure_mlflow(settings, wait=wait_for_mlflow)
    if ray:
        settings = ensure_ray(settings)
    apply_to_environment(settings)
    return settings


def disconnect_ray() -> None:
    """Leave Ray at once when a command is done with it: at interpreter exit, Ray's own hook first sleeps 0.5 s for
    log lines still in flight (steps attach with log_to_driver=False: there are none).

    Ray's shutdown imports its compiled-graph modules (``ray.dag``, 34 of them). The collections their objects
    trigger would walk everything the command made (Feast's import alone: millions of objects), 0.7 s after step 1;
    frozen first (``gc.freeze``), they are not walked, nor by the collection at interpreter exit.
    """
    import gc
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        gc.freeze()
        ray.shutdown()
