"""Shared fixtures: the project's embedded stack, private to the test session: a real PostgreSQL, a real Ray head
(the drivers attach to it, as steps 1 and 2 do on the laptop and in a Ray job on the cluster) and a real
MLflow server.

The test stack lives in a temporary folder on free ports, so tests never touch the demo's data and can run
beside a running demo stack. Each data set gets its own database.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from sales_forecast.config import Settings, load_settings
from sales_forecast.features.generator import Shape
from sales_forecast.stack import mlflow_server, postgres, ray_head

# Small but complete: store 1/dept 12 and store 11/dept 2 both exist (the key-collision pair).
SMALL_SHAPE = Shape(stores=12, depts=13, weeks=60, seed=7)


def ports_below_the_ephemeral_range(count: int) -> list[int]:
    """``count`` distinct free ports below the kernel's ephemeral range, which it never hands out for a bind to port
    0: the session's MLflow port stays free until MLflow starts (when a test first needs it), however many ports
    the tests' servers and the Ray head's agents pick meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.Random().sample(range(max(1024, low - 12000), low), 200)
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for port in candidates:
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports below {low}")


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """An embedded PostgreSQL and a Ray head on free ports, in a temporary stack folder; RAY_ADDRESS names the
    head (the dashboard, also the job-submission API, is RAY_DASHBOARD_URL's)."""
    stack_dir = tmp_path_factory.mktemp("stack")
    saved = dict(os.environ)
    for name in ("POSTGRES_HOST", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MLFLOW_TRACKING_URI",
                 "RAY_JOBS_ADDRESS", "RAY_ADDRESS", "MODEL_DIR", "FEAST_REPO_PATH", "FEAST_RAY_EXECUTION_MODE",
                 "SERVING_MAX_INSTANCES", "SERVING_MAX_BODY_BYTES", "SERVING_RELOAD_SECONDS", "INFERENCE_BACKEND"):
        os.environ.pop(name, None)
    ports = dict(zip(("POSTGRES_PORT", "SALES_MLFLOW_PORT", "SALES_RAY_PORT", "SALES_RAY_DASHBOARD_PORT"),
                     map(str, ports_below_the_ephemeral_range(4)), strict=True))
    os.environ.update({"SALES_STACK_DIR": str(stack_dir), **ports, "RAY_DISABLE_USAGE_STATS": "1"})
    settings = load_settings()
    postgres.start(settings.postgres, stack_dir / "postgres")
    ports = settings.stack_ports
    head = ray_head.start(stack_dir, ports.ray, ports.ray_dashboard,
                          reserved=(settings.postgres.port, ports.mlflow))
    os.environ.update({"RAY_ADDRESS": head, "RAY_DASHBOARD_URL": ray_head.dashboard_url(ports.ray_dashboard)})
    yield load_settings()
    mlflow_server.stop(stack_dir)
    ray_head.stop(stack_dir)
    postgres.stop(stack_dir / "postgres")
    os.environ.clear()
    os.environ.update(saved)


def database_settings(settings: Settings, name: str) -> Settings:
    """Settings pointing at a fresh, empty database ``name`` on the test server."""
    with psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return settings.with_database(name)


@pytest.fixture(scope="session")
def mlflow_uri(stack_settings: Settings) -> str:
    """A real MLflow tracking server process on a free port."""
    uri = mlflow_server.start(stack_settings.stack_dir, stack_settings.stack_ports.mlflow)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def small_features(stack_settings: Settings):
    """Step 1 run once on the small shape in its own database; returns (settings, result)."""
    from sales_forecast.features.pipeline import run_feature_pipeline

    settings = database_settings(stack_settings, "small_features")
    result = run_feature_pipeline(SMALL_SHAPE, settings)
    return settings, result


@pytest.fixture(scope="session")
def settings(small_features) -> Settings:
    """The settings of the small step-1 data set's database."""
    return small_features[0]


@pytest.fixture(scope="session")
def bundle(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fitted Forecaster bundle on the small features, for the serving tests."""
    from tests.support.quick_model import fit_quick_forecaster, labelled_rows

    directory = tmp_path_factory.mktemp("bundle")
    fit_quick_forecaster(labelled_rows(settings)).save(directory)
    return directory


@pytest.fixture(scope="session")
def latest_rows(settings: Settings):
    """The offline feature table's rows of the last week, indexed by (store, dept)."""
    from sales_forecast.contract import FEATURE_TABLE
    from sales_forecast.features.derive import MODEL_FEATURES

    query = (f'SELECT * FROM "{FEATURE_TABLE}" WHERE event_timestamp = '
             f'(SELECT max(event_timestamp) FROM "{FEATURE_TABLE}")')
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(query)
        rows = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
    rows[MODEL_FEATURES] = rows[MODEL_FEATURES].astype("float64")
    return rows.set_index(["store", "dept"], drop=False)


@pytest.fixture(scope="module")
def own_ray() -> Iterator[None]:
    """Disconnect this process from Ray after a module's tests (a local Ray a test started stops with it)."""
    import ray

    started_here = not ray.is_initialized()
    yield
    if started_here and ray.is_initialized():
        ray.shutdown()

