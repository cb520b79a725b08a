"""Step 1 against a real PostgreSQL and real (local) Ray: load, apply, materialize, idempotence, faults."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import psycopg
import pytest
from conftest import REPO_ROOT, SMALL_SHAPE, database_settings, free_port

from sales_forecast import feature_store as fs_ops
from sales_forecast.config import FEATURE_SERVICE, FEATURE_TABLE, RAW_TABLE
from sales_forecast.data import Shape, generate
from sales_forecast.errors import PipelineError
from sales_forecast.feature_pipeline import run_feature_pipeline
from sales_forecast.features import MODEL_FEATURES
from sales_forecast.stack.processes import http_ok, wait_until

STEP1 = str(REPO_ROOT / "01_feast_features.py")


def _query(settings, sql: str) -> list[tuple]:
    with psycopg.connect(settings.postgres.libpq_url()) as conn:
        return conn.execute(sql).fetchall()


def _expected_latest(raw: pd.DataFrame) -> pd.DataFrame:
    """Last week's features computed directly from the raw series, independently of build_features."""
    rows = []
    for (store, dept), series in raw.sort_values("date").groupby(["store", "dept"]):
        last4 = series["weekly_sales"].to_numpy()[-4:]
        last = series.iloc[-1]
        rows.append({"store": store, "dept": dept,
                     "sales_lag_1": last4[-1], "sales_lag_2": last4[-2], "sales_lag_3": last4[-3],
                     "sales_lag_4": last4[-4], "sales_mean_4": last4.mean(), "sales_std_4": last4.std(ddof=1),
                     "lag_1_is_holiday": float(last["is_holiday"]), "temperature": last["temperature"],
                     "fuel_price": last["fuel_price"], "cpi": last["cpi"], "unemployment": last["unemployment"]})
    return pd.DataFrame(rows)


def test_load_round_trip(small_features) -> None:
    settings, result = small_features
    raw = generate(SMALL_SHAPE)
    assert result.rows == len(raw) == SMALL_SHAPE.rows
    for table in (RAW_TABLE, FEATURE_TABLE):
        assert _query(settings, f"SELECT count(*) FROM {table}")[0][0] == len(raw)
    sample = raw.sample(25, random_state=1)
    for _, row in sample.iterrows():
        (sales, holiday), = _query(settings, f"SELECT weekly_sales, is_holiday FROM {RAW_TABLE} WHERE store = "
                                             f"{row.store} AND dept = {row.dept} AND date = '{row.date}'")
        assert sales == pytest.approx(row.weekly_sales) and holiday == row.is_holiday
    indexes = {name for (name,) in _query(settings, "SELECT indexname FROM pg_indexes WHERE schemaname='public'")}
    assert {f"{RAW_TABLE}_key_ts", f"{FEATURE_TABLE}_key_ts"} <= indexes


def test_apply_creates_registry_objects(small_features) -> None:
    settings, _ = small_features
    store = fs_ops.open_store(settings)  # a fresh store reads the SQL registry back
    assert sorted(e.name for e in store.list_entities()) == ["dept", "store"]
    assert {e.name: e.join_key for e in store.list_entities()} == {"store": "store", "dept": "dept"}
    view = store.get_feature_view("sales_features")
    assert view.ttl == dt.timedelta(days=7)
    assert sorted(view.entities) == ["dept", "store"]
    assert [c.name for c in view.entity_columns] == ["store", "dept"]
    assert [f.name for f in view.features] == MODEL_FEATURES
    service = store.get_feature_service(FEATURE_SERVICE)
    assert [p.name for p in service.feature_view_projections] == ["sales_features"]
    assert [f.name for p in service.feature_view_projections for f in p.features] == MODEL_FEATURES


def test_materialized_online_values_equal_last_week(small_features) -> None:
    settings, result = small_features
    n_series = SMALL_SHAPE.stores * SMALL_SHAPE.depts
    assert result.series == result.online_entities == n_series
    stats = fs_ops.online_stats(settings)
    assert stats.entities == n_series
    assert stats.rows == n_series * len(MODEL_FEATURES)  # one row per series and feature
    expected = _expected_latest(generate(SMALL_SHAPE)).set_index(["store", "dept"], drop=False)
    keys = [(1, 12), (11, 2), (1, 1), (12, 13)]  # (1, 12) / (11, 2) would collide under a glued key
    online = fs_ops.online_features(fs_ops.open_store(settings), keys).set_index(["store", "dept"], drop=False)
    assert online.index.tolist() == keys
    assert online.loc[(1, 12), "sales_lag_1"] != online.loc[(11, 2), "sales_lag_1"]
    for key in keys:
        for column in expected.columns:
            assert online.loc[key, column] == pytest.approx(expected.loc[key, column]), (key, column)


def test_rerun_leaves_the_same_state(stack_settings) -> None:
    settings = database_settings(stack_settings, "rerun")
    shape = Shape(stores=3, depts=4, weeks=8, seed=5)
    run_feature_pipeline(shape, settings)
    first = _snapshot(settings)
    run_feature_pipeline(shape, settings)
    assert _snapshot(settings) == first
    assert first["counts"] == (96, 96)
    assert first["online"][0] == 12


def test_rerun_with_fewer_series_serves_only_those(stack_settings) -> None:
    settings = database_settings(stack_settings, "shrink")
    run_feature_pipeline(Shape(stores=3, depts=4, weeks=8, seed=5), settings)
    result = run_feature_pipeline(Shape(stores=2, depts=3, weeks=8, seed=5), settings)
    assert result.online_entities == fs_ops.online_stats(settings).entities == 6
    gone = fs_ops.online_features(fs_ops.open_store(settings), [(3, 4)])
    assert gone[MODEL_FEATURES].isna().all(axis=None)


def _snapshot(settings) -> dict:
    store = fs_ops.open_store(settings)
    return {
        "counts": (_query(settings, f"SELECT count(*) FROM {RAW_TABLE}")[0][0],
                   _query(settings, f"SELECT count(*) FROM {FEATURE_TABLE}")[0][0]),
        "features": _query(settings, f"SELECT md5(string_agg(t::text, ',' ORDER BY store, dept, event_timestamp)) "
                                     f"FROM {FEATURE_TABLE} t"),
        "online": dataclasses.astuple(fs_ops.online_stats(settings))[:2],
        "registry": sorted(v.name for v in store.list_feature_views())
                    + sorted(s.name for s in store.list_feature_services()),
    }


def test_stale_end_date_is_refused_before_loading(stack_settings) -> None:
    settings = database_settings(stack_settings, "stale")
    old = Shape(stores=2, depts=2, weeks=8, end_date=dt.date(2024, 1, 5))
    with pytest.raises(PipelineError, match="ttl"):
        run_feature_pipeline(old, settings)
    assert _query(settings, "SELECT to_regclass('weekly_sales')")[0][0] is None


def _run_step1(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, STEP1, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO_ROOT)


@pytest.mark.parametrize("args, message", [
    (["--stores", "0"], "must be at least 1"),
    (["--weeks", "3"], "--weeks must be at least 6"),
    (["--seed", "x"], "invalid int value"),
    (["--end-date", "2026-13-01"], "not a date"),
    (["--end-date", "2999-01-01"], "is in the future"),
])
def test_bad_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    result = _run_step1(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_unreachable_postgres_fails_fast_with_one_line(stack_settings) -> None:
    started = time.monotonic()
    result = _run_step1("--stores", "2", "--depts", "2", "--weeks", "8",
                        env={"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(free_port())})
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: PostgreSQL at 127.0.0.1:")
    assert last_line.endswith("is unreachable: Connection refused")
    assert "Traceback" not in result.stderr


def test_step1_as_a_ray_job_on_a_ray_cluster(stack_settings) -> None:
    """The Kubernetes path: the command submits itself to a Ray cluster's job API and the job materializes."""
    settings = database_settings(stack_settings, "ray_job")
    dashboard, gcs = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    env.pop("FEAST_RAY_EXECUTION_MODE", None)  # the job must use the cluster (RAY_ADDRESS), not a local Ray
    # Every port free, not Ray's defaults: a second Ray on the machine must not take this head's job agent.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=true", f"--temp-dir={temp_dir}", *agent_ports],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    jobs_api = f"http://127.0.0.1:{dashboard}"
    try:
        assert wait_until(lambda: http_ok(f"{jobs_api}/api/version"), 120), "the Ray head did not start"
        result = subprocess.run(
            [sys.executable, STEP1, "--stores", "3", "--depts", "4", "--weeks", "8", "--ray-jobs-address", jobs_api],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
            env={**env, "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(settings.postgres.port),
                 "POSTGRES_USER": settings.postgres.user, "POSTGRES_PASSWORD": settings.postgres.password,
                 "POSTGRES_DB": settings.postgres.database})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "submitted Ray job" in result.stderr
        assert "online store: 12 series" in result.stdout
        assert fs_ops.online_stats(settings).entities == 12
    finally:  # only this head's process group: `ray stop` would stop every Ray on the machine
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
