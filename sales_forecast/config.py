"""All configuration, read from environment variables with embedded local defaults.

A variable that is set always wins. When POSTGRES_HOST is unset, the project runs its own PostgreSQL
(see ``sales_forecast.local_stack``) on loopback at EMBEDDED_POSTGRES_PORT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

EMBEDDED_POSTGRES_PORT = 54329
EMBEDDED_MLFLOW_PORT = 5050
EMBEDDED_MODEL_SERVER_PORT = 8085

PROJECT_IMAGE = "sales-forecast:0.1.0"
FEATURE_SERVICE = "sales_forecast_v1"
FEATURE_VIEW = "sales_features"
FEAST_PROJECT = "sales_forecast"
RAW_TABLE = "weekly_sales"
FEATURE_TABLE = "sales_features"
REGISTERED_MODEL = "sales-forecast"
MODEL_NAME = "sales-model"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class PostgresSettings:
    host: str
    port: int
    user: str
    password: str
    database: str
    embedded: bool

    def sqlalchemy_url(self, database: str | None = None) -> str:
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{database or self.database}"

    def libpq_url(self, database: str | None = None) -> str:
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database or self.database}?sslmode=disable"

    def feast_env(self) -> dict[str, str]:
        """The variables feature_store.yaml expands."""
        return {
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_DB": self.database,
            "FEAST_REGISTRY_URL": self.sqlalchemy_url(),
        }


@dataclass(frozen=True)
class Settings:
    postgres: PostgresSettings
    stack_dir: Path
    feast_repo_path: Path
    ray_jobs_address: str | None
    mlflow_tracking_uri: str | None
    mlflow_experiment: str
    model_dir: Path
    image: str
    namespace: str

    @property
    def embedded_mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{EMBEDDED_MLFLOW_PORT}"


def load_settings() -> Settings:
    stack_dir = Path(_env("SALES_STACK_DIR", str(REPO_ROOT / ".stack"))).resolve()
    host = _env("POSTGRES_HOST")
    postgres = PostgresSettings(
        host=host or "127.0.0.1",
        port=int(_env("POSTGRES_PORT", str(EMBEDDED_POSTGRES_PORT))),
        user=_env("POSTGRES_USER", "postgres"),
        password=_env("POSTGRES_PASSWORD", "") if host else _env("POSTGRES_PASSWORD", "postgres"),
        database=_env("POSTGRES_DB", "feast"),
        embedded=host is None,
    )
    return Settings(
        postgres=postgres,
        stack_dir=stack_dir,
        feast_repo_path=Path(_env("FEAST_REPO_PATH", str(REPO_ROOT / "feature_repo"))).resolve(),
        ray_jobs_address=_env("RAY_JOBS_ADDRESS"),
        mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI"),
        mlflow_experiment=_env("MLFLOW_EXPERIMENT_NAME", "sales-forecast"),
        model_dir=Path(_env("MODEL_DIR", str(stack_dir / "models"))),
        image=_env("PIPELINE_IMAGE", PROJECT_IMAGE),
        namespace=_env("K8S_NAMESPACE", "mlops"),
    )


def export_feast_env(settings: Settings) -> None:
    """Put the resolved connection into os.environ so Feast's ${VAR} expansion sees it.

    Feast's Ray engine runs locally unless the user chose a mode or a Ray cluster set RAY_ADDRESS.
    """
    os.environ.update(settings.postgres.feast_env())
    if "FEAST_RAY_EXECUTION_MODE" not in os.environ and not os.environ.get("RAY_ADDRESS"):
        os.environ["FEAST_RAY_EXECUTION_MODE"] = "local"
