"""All configuration: the only module that reads environment variables.

A variable that is set always wins over the embedded default. ``load_settings()`` validates every value and
raises ``ConfigError`` (one line, exit 2 in the CLIs) for a bad one. ``Settings.environment()`` is the one
mapping back to variables: the model server, the LocalProcess job, the Ray job and Feast's ``${VAR}``
expansion of ``feature_store.yaml`` all get their settings through it (pods get the same variables from the
ConfigMap ``pipeline-config`` and the Secret ``postgres-credentials``, see ``contract.py``).

When ``POSTGRES_HOST`` is unset the project runs its own services on loopback (``sales_forecast.stack``):
PostgreSQL, the MLflow server and a Ray head, started on demand and reused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sales_forecast import contract
from sales_forecast.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

EMBEDDED_POSTGRES_PORT = 54329
EMBEDDED_MODEL_SERVER_PORT = 8085
DEFAULT_POSTGRES_USER = DEFAULT_POSTGRES_PASSWORD = "postgres"
DEFAULT_MAX_INSTANCES = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_RELOAD_SECONDS = 30
RAY_MODES = ("local", "remote")
INFERENCE_BACKENDS = ("local", "kubernetes")
# Characters a value may not hold because feature_store.yaml embeds it in YAML or in the registry's URL.
_YAML_UNSAFE = re.compile(r"[\"\\\n\r\x00]")
_URL_UNSAFE = re.compile(r"[@/:?#\[\]\s%]")


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else default


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    text = _env(environ, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = _env(environ, name, default)
    if value is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class PostgresSettings:
    host: str
    port: int
    user: str
    password: str
    database: str
    embedded: bool  # the project's own server (POSTGRES_HOST unset)

    def _auth(self) -> str:
        user = quote(self.user, safe="")
        return f"{user}:{quote(self.password, safe='')}" if self.password else user

    def sqlalchemy_url(self, database: str | None = None) -> str:
        return f"postgresql+psycopg://{self._auth()}@{self.host}:{self.port}/{database or self.database}"

    def libpq_url(self, database: str | None = None) -> str:
        return f"postgresql://{self._auth()}@{self.host}:{self.port}/{database or self.database}?sslmode=disable"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"

    def with_database(self, database: str) -> PostgresSettings:
        return dataclasses.replace(self, database=database)


@dataclass(frozen=True)
class StackPorts:
    """Loopback ports of the embedded services (a second stack, e.g. a benchmark's, picks others)."""

    mlflow: int = 5050  # SALES_MLFLOW_PORT
    ray: int = 6389  # SALES_RAY_PORT: the Ray head's GCS
    ray_dashboard: int = 8265  # SALES_RAY_DASHBOARD_PORT: dashboard and job-submission API


@dataclass(frozen=True)
class ShapeDefaults:
    """The default data shape (also generator.Shape's), and step 1's from SALES_STORES, SALES_DEPTS, SALES_WEEKS,
    SALES_SEED (flags override them)."""

    stores: int = 143
    depts: int = 81
    weeks: int = 52
    seed: int = 42


@dataclass(frozen=True)
class Settings:
    postgres: PostgresSettings
    stack_dir: Path
    stack_ports: StackPorts
    feast_repo_path: Path
    ray_address: str | None  # RAY_ADDRESS: a Ray cluster to attach to as a driver (never ray://)
    ray_mode: str | None  # FEAST_RAY_EXECUTION_MODE: "local" runs Ray inside the process (a TrainJob pod)
    ray_jobs_address: str | None  # RAY_JOBS_ADDRESS: step 1 submits itself there as a Ray job
    mlflow_tracking_uri: str | None  # None: the embedded MLflow server
    mlflow_experiment: str
    model_dir: Path
    image: str
    namespace: str
    max_instances: int  # SERVING_MAX_INSTANCES: larger requests get 413
    max_body_bytes: int  # SERVING_MAX_BODY_BYTES: larger bodies get 413 before they are parsed
    reload_seconds: int  # SERVING_RELOAD_SECONDS: how often the server looks for a new champion; 0: never
    inference_backend: str

    @property
    def embedded_mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.stack_ports.mlflow}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or self.embedded_mlflow_uri

    def with_database(self, database: str) -> Settings:
        return dataclasses.replace(self, postgres=self.postgres.with_database(database))

    def environment(self, secrets: bool = True) -> dict[str, str]:
        """The variables that reproduce these settings in another process, including the ones
        feature_store.yaml expands (POSTGRES_*). ``secrets=False`` leaves out the credentials (the keys of
        Secret postgres-credentials), for a submission others can read, such as a Ray job's runtime_env."""
        pg = self.postgres
        env = {
            "POSTGRES_HOST": pg.host,
            "POSTGRES_PORT": str(pg.port),
            "POSTGRES_USER": pg.user,
            "POSTGRES_PASSWORD": pg.password,
            "POSTGRES_DB": pg.database,
            "SALES_STACK_DIR": str(self.stack_dir),
            "SALES_MLFLOW_PORT": str(self.stack_ports.mlflow),
            "SALES_RAY_PORT": str(self.stack_ports.ray),
            "SALES_RAY_DASHBOARD_PORT": str(self.stack_ports.ray_dashboard),
            "FEAST_REPO_PATH": str(self.feast_repo_path),
            "MLFLOW_EXPERIMENT_NAME": self.mlflow_experiment,
            "MODEL_DIR": str(self.model_dir),
            "PIPELINE_IMAGE": self.image,
            "K8S_NAMESPACE": self.namespace,
            "SERVING_MAX_INSTANCES": str(self.max_instances),
            "SERVING_MAX_BODY_BYTES": str(self.max_body_bytes),
            "SERVING_RELOAD_SECONDS": str(self.reload_seconds),
        }
        if self.mlflow_tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        if self.ray_mode:
            env["FEAST_RAY_EXECUTION_MODE"] = self.ray_mode
        if not secrets:
            for name in contract.POSTGRES_SECRET_KEYS:
                env.pop(name)
        return env


def _check_embeddable(name: str, value: str, in_url: bool) -> str:
    if _YAML_UNSAFE.search(value):
        raise ConfigError(f"{name} must not contain a double quote, a backslash or a line break "
                          "(feature_store.yaml embeds it)")
    if in_url and _URL_UNSAFE.search(value):
        raise ConfigError(f"{name} must not contain @ / : ? # [ ] % or spaces (the registry URL in "
                          "feature_store.yaml embeds it)")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    stack_dir = Path(_env(env, "SALES_STACK_DIR", str(REPO_ROOT / ".stack"))).resolve()
    host = _env(env, "POSTGRES_HOST")
    postgres = PostgresSettings(
        host=_check_embeddable("POSTGRES_HOST", host or "127.0.0.1", in_url=False),
        port=_int(env, "POSTGRES_PORT", EMBEDDED_POSTGRES_PORT, maximum=65535),
        user=_check_embeddable("POSTGRES_USER", _env(env, "POSTGRES_USER", DEFAULT_POSTGRES_USER), in_url=True),
        password=_check_embeddable("POSTGRES_PASSWORD", _env(env, "POSTGRES_PASSWORD", DEFAULT_POSTGRES_PASSWORD),
                                   in_url=False),
        database=_check_embeddable("POSTGRES_DB", _env(env, "POSTGRES_DB", "feast"), in_url=True),
        embedded=host is None,
    )
    ray_address, ray_mode = load_ray_variables(env)
    return Settings(
        postgres=postgres,
        stack_dir=stack_dir,
        stack_ports=StackPorts(
            mlflow=_int(env, "SALES_MLFLOW_PORT", StackPorts.mlflow, maximum=65535),
            ray=_int(env, "SALES_RAY_PORT", StackPorts.ray, maximum=65535),
            ray_dashboard=_int(env, "SALES_RAY_DASHBOARD_PORT", StackPorts.ray_dashboard, maximum=65535)),
        feast_repo_path=Path(_env(env, "FEAST_REPO_PATH", str(REPO_ROOT / "feature_repo"))).resolve(),
        ray_address=ray_address,
        ray_mode=ray_mode,
        ray_jobs_address=_env(env, "RAY_JOBS_ADDRESS"),
        mlflow_tracking_uri=_env(env, "MLFLOW_TRACKING_URI"),
        mlflow_experiment=_env(env, "MLFLOW_EXPERIMENT_NAME", "sales-forecast"),
        model_dir=Path(_env(env, "MODEL_DIR", str(stack_dir / "models"))).resolve(),
        image=_env(env, "PIPELINE_IMAGE", contract.PROJECT_IMAGE),
        namespace=_env(env, "K8S_NAMESPACE", contract.NAMESPACE),
        max_instances=_int(env, "SERVING_MAX_INSTANCES", DEFAULT_MAX_INSTANCES),
        max_body_bytes=_int(env, "SERVING_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, minimum=1024),
        reload_seconds=_int(env, "SERVING_RELOAD_SECONDS", DEFAULT_RELOAD_SECONDS, minimum=0),
        inference_backend=_choice(env, "INFERENCE_BACKEND", INFERENCE_BACKENDS, "local"),
    )


def load_ray_variables(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(RAY_ADDRESS, FEAST_RAY_EXECUTION_MODE), checked; alone, for the Ray offline store in any Feast repo, where
    the rest of this project's variables mean nothing."""
    env = os.environ if environ is None else environ
    ray_address = _env(env, "RAY_ADDRESS")
    if ray_address and ray_address.startswith("ray://"):
        raise ConfigError(f"RAY_ADDRESS={ray_address} is Ray Client, which Feast's Ray engine cannot use: give the "
                          "cluster's GCS address (host:6379) to a driver on the cluster, or RAY_JOBS_ADDRESS")
    return ray_address, _choice(env, "FEAST_RAY_EXECUTION_MODE", RAY_MODES, None)


def load_shape_defaults(environ: Mapping[str, str] | None = None) -> ShapeDefaults:
    """The data shape's defaults, with the flags' rules (stores, depts >= 1; weeks >= 6; any integer seed)."""
    env = os.environ if environ is None else environ
    base = ShapeDefaults()
    return ShapeDefaults(
        stores=_int(env, "SALES_STORES", base.stores),
        depts=_int(env, "SALES_DEPTS", base.depts),
        weeks=_int(env, "SALES_WEEKS", base.weeks, minimum=6),
        seed=_int(env, "SALES_SEED", base.seed, minimum=-(2**63)),
    )


# What a child process with a fresh environment (LocalProcess) still needs from this one.
PROCESS_VARIABLES = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "RAY_DISABLE_USAGE_STATS", "SSL_CERT_FILE",
                     "REQUESTS_CA_BUNDLE")


def process_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {name: env[name] for name in PROCESS_VARIABLES if env.get(name)}


def torchrun_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) in a plain process."""
    env = os.environ if environ is None else environ
    return _int(env, "RANK", 0, minimum=0), _int(env, "WORLD_SIZE", 1)


def set_library_defaults(values: Mapping[str, str]) -> None:
    """Settings libraries read from the environment (libpq, MLflow), unless the user set them already."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


FEAST_VARIABLES = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",
                   "RAY_ADDRESS", "FEAST_RAY_EXECUTION_MODE")


def apply_to_environment(settings: Settings) -> None:
    """Put what Feast reads from os.environ into it: feature_store.yaml's ${VAR}s and the Ray to attach to."""
    env = settings.environment()
    os.environ.update({name: env[name] for name in FEAST_VARIABLES if name in env})
