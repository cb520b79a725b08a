"""Start, stop or inspect the embedded local stack: ``python -m sales_forecast.stack up|down|status|env``.

``env`` prints the stack's settings as ``export`` lines, so the Feast CLI and ``feast ui`` work on the
feature repo from a shell: ``eval "$(python -m sales_forecast.stack env)"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from sales_forecast import stack
from sales_forecast.cli import run_cli
from sales_forecast.config import EMBEDDED_MODEL_SERVER_PORT, load_settings
from sales_forecast.stack import mlflow_server, model_server, postgres, processes, ray_head


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sales_forecast.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    args = parser.parse_args()
    settings = load_settings()
    pgdata = settings.stack_dir / "postgres"
    if args.action == "up":
        settings = stack.ensure_services(settings, mlflow=True, ray=True)
        print(f"postgres  {settings.postgres.libpq_url()}")
        print(f"mlflow    {settings.tracking_uri}")
        print(f"ray       {settings.ray_address} (dashboard "
              f"{ray_head.dashboard_url(settings.stack_ports.ray_dashboard)})")
    elif args.action == "down":
        model_server.stop_all(settings.stack_dir)
        print(f"mlflow    {'stopped' if mlflow_server.stop(settings.stack_dir) else 'not running'}")
        print(f"ray       {'stopped' if ray_head.stop(settings.stack_dir) else 'not running'}")
        print(f"postgres  {'stopped' if postgres.stop(pgdata) else 'not running'}")
    elif args.action == "env":
        resolved = settings
        if not settings.ray_address and settings.ray_mode != "local":
            resolved = dataclasses.replace(settings, ray_address=ray_head.address(settings.stack_ports.ray))
        for name, value in resolved.environment().items():
            print(f"export {name}={shlex.quote(value)}")
    else:
        print(f"postgres  {'up' if postgres.is_ready(settings.postgres) else 'down'}  {settings.postgres.libpq_url()}")
        mlflow_up = processes.http_ok(f"{settings.embedded_mlflow_uri}/health")
        print(f"mlflow    {'up' if mlflow_up else 'down'}  {settings.embedded_mlflow_uri}")
        dashboard = ray_head.dashboard_url(settings.stack_ports.ray_dashboard)
        ray_up = ray_head.is_running(settings.stack_dir) and processes.http_ok(f"{dashboard}/api/version")
        print(f"ray       {'up' if ray_up else 'down'}  {ray_head.address(settings.stack_ports.ray)} "
              f"(dashboard {dashboard})")
        server = model_server.url_of(EMBEDDED_MODEL_SERVER_PORT)
        print(f"model     {'up' if model_server.is_ready(server) else 'down'}  {server}")


if __name__ == "__main__":
    run_cli(main)
