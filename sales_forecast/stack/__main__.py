"""Start, stop or inspect the embedded local stack: ``python -m sales_forecast.stack up|down|status``."""

from __future__ import annotations

import argparse

from sales_forecast.cli import run_cli
from sales_forecast.config import EMBEDDED_MLFLOW_PORT, EMBEDDED_MODEL_SERVER_PORT, load_settings
from sales_forecast.stack import mlflow_server, model_server, postgres, processes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sales_forecast.stack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args()
    settings = load_settings()
    pgdata = settings.stack_dir / "postgres"
    if args.action == "up":
        postgres.start(settings.postgres, pgdata)
        print(f"postgres  {settings.postgres.libpq_url()}")
        print(f"mlflow    {mlflow_server.start(settings.stack_dir, EMBEDDED_MLFLOW_PORT)}")
    elif args.action == "down":
        for pid_file in sorted(settings.stack_dir.glob("*/server.pid")):
            processes.stop(pid_file)
        print(f"postgres  {'stopped' if postgres.stop(pgdata) else 'not running'}")
    else:
        print(f"postgres  {'up' if postgres.is_ready(settings.postgres) else 'down'}  {settings.postgres.libpq_url()}")
        mlflow_up = processes.http_ok(f"{settings.embedded_mlflow_uri}/health")
        print(f"mlflow    {'up' if mlflow_up else 'down'}  {settings.embedded_mlflow_uri}")
        server = model_server.url_of(EMBEDDED_MODEL_SERVER_PORT)
        print(f"model     {'up' if model_server.is_ready(server) else 'down'}  {server}")


if __name__ == "__main__":
    run_cli(main)
