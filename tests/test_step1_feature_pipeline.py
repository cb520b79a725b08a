"""Step 1 against a real PostgreSQL and real (local) Ray: load, apply, materialize, idempotence, faults."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from conftest import SMALL_SHAPE, database_settings

from sales_forecast.config import REPO_ROOT
from sales_forecast.contract import FEATURE_SERVICE, FEATURE_TABLE, RAW_TABLE
from sales_forecast.errors import PipelineError
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import MODEL_FEATURES
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.pipeline import run_feature_pipeline
from sales_forecast.ray_engine import DATA_CONTEXT_DEPRECATIONS
from sales_forecast.stack.processes import free_port, http_ok, wait_until

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


LOAD_PHASE = "generate, derive, bulk load (COPY)"


def test_rerun_leaves_the_same_state(stack_settings) -> None:
    settings = database_settings(stack_settings, "rerun")
    shape = Shape(stores=3, depts=4, weeks=8, seed=5)
    first_run = run_feature_pipeline(shape, settings)
    assert "kept" not in first_run.timer.notes[LOAD_PHASE]
    first = _snapshot(settings)
    again = run_feature_pipeline(shape, settings)
    assert "weekly_sales, sales_features unchanged: kept" in again.timer.notes[LOAD_PHASE]
    assert _snapshot(settings) == first
    assert first["counts"] == (96, 96)
    assert first["online"][0] == 12


def test_a_full_run_after_an_append_writes_the_tables_again(stack_settings) -> None:
    """An appended week changed both tables since their load: the next full run must replace them (dropping that
    week again), not keep them."""
    from sales_forecast.features.append import append_week
    from sales_forecast.features.generator import latest_friday

    settings = database_settings(stack_settings, "append_then_full")
    last_week = latest_friday(dt.datetime.now(dt.UTC).date()) - dt.timedelta(days=7)
    shape = Shape(stores=2, depts=3, weeks=8, seed=5, end_date=last_week)
    run_feature_pipeline(shape, settings, online=False)
    before = _offline_snapshot(settings)
    append_week(settings)  # the week after the loaded ones
    assert _offline_snapshot(settings)["counts"] == (54, 54)
    result = run_feature_pipeline(shape, settings, online=False)
    assert "kept" not in result.timer.notes[LOAD_PHASE]
    assert _offline_snapshot(settings) == before


def test_rerun_with_fewer_series_serves_only_those(stack_settings) -> None:
    settings = database_settings(stack_settings, "shrink")
    run_feature_pipeline(Shape(stores=3, depts=4, weeks=8, seed=5), settings)
    result = run_feature_pipeline(Shape(stores=2, depts=3, weeks=8, seed=5), settings)
    assert result.online_entities == fs_ops.online_stats(settings).entities == 6
    gone = fs_ops.online_features(fs_ops.open_store(settings), [(3, 4)])
    assert gone[MODEL_FEATURES].isna().all(axis=None)


def _offline_snapshot(settings) -> dict:
    return {
        "counts": (_query(settings, f"SELECT count(*) FROM {RAW_TABLE}")[0][0],
                   _query(settings, f"SELECT count(*) FROM {FEATURE_TABLE}")[0][0]),
        "features": _query(settings, f"SELECT md5(string_agg(t::text, ',' ORDER BY store, dept, event_timestamp)) "
                                     f"FROM {FEATURE_TABLE} t"),
    }


def _snapshot(settings) -> dict:
    store = fs_ops.open_store(settings)
    return {
        **_offline_snapshot(settings),
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
    assert _query(settings, "SELECT count(*) FROM pg_class WHERE relname LIKE '%sales%'")[0][0] == 0  # no staging


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


def test_a_database_error_in_the_ray_write_fails_the_step_with_one_line(stack_settings) -> None:
    """The online table's database refuses the materialization's write inside a Ray task (here a trigger raising
    disk_full, which a full disk raised at 10x): the step exits 1 with the database's message as its last line, not
    with Ray's traceback of the task."""
    settings = database_settings(stack_settings, "write_fault")
    run_feature_pipeline(Shape(stores=2, depts=2, weeks=8, seed=5), settings)
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION USING "
                     "ERRCODE = 'disk_full', MESSAGE = 'could not extend file: No space left on device'; END $$")
        conn.execute(f'CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON "{fs_ops.online_table()}" '
                     "FOR EACH ROW EXECUTE FUNCTION refuse()")
    result = _run_step1("--stores", "3", "--depts", "2", "--weeks", "8", "--seed", "6", env=settings.environment(),
                        timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == \
        "error: database: could not extend file: No space left on device"
    assert fs_ops.online_stats(settings).entities == 4  # the failed write changed nothing


def test_step1_as_a_ray_job_on_a_ray_cluster(stack_settings) -> None:
    """The Kubernetes path: the command submits itself to a Ray cluster's job API (here the test stack's Ray head,
    as the cluster's feast-ray), the job's driver runs on the cluster and materializes, and the submission carries
    no credentials (Ray's job list shows a job's runtime_env)."""
    from ray.job_submission import JobSubmissionClient

    settings = database_settings(stack_settings, "ray_job")
    jobs_api = os.environ["RAY_DASHBOARD_URL"]
    env = {**os.environ, **settings.environment()}
    env.pop("POSTGRES_PASSWORD")  # the embedded server trusts loopback; the job must not need it passed
    result = subprocess.run(
        [sys.executable, STEP1, "--stores", "3", "--depts", "4", "--weeks", "8", "--ray-jobs-address", jobs_api],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted Ray job" in result.stderr
    assert "online store: 12 series" in result.stdout
    assert not re.search(DATA_CONTEXT_DEPRECATIONS, result.stdout + result.stderr)  # Ray's noise, not the user's
    assert fs_ops.online_stats(settings).entities == 12
    job_id = re.search(r"submitted Ray job (\S+)", result.stderr).group(1)
    submitted = JobSubmissionClient(jobs_api).get_job_info(job_id).runtime_env["env_vars"]
    assert submitted["POSTGRES_DB"] == "ray_job"
    assert not {"POSTGRES_USER", "POSTGRES_PASSWORD", "RAY_ADDRESS"} & set(submitted)


def fresh_interpreter(code: str, timeout: float) -> str:
    """What ``code`` prints, run by a new Python in the repo."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_warm_workers_start_before_the_step_imports_feast(stack_settings) -> None:
    """Step 1's Ray workers import Feast while the step's process does, on the other core. Starting them must not
    import Feast in the step's process: when it did (the write count came from a module that imports Feast), a
    worker was still importing when the materialization began (1x, run again: materialization 15-17 s, not 4-5)."""
    code = ("import sys\n"
            "from sales_forecast.config import load_settings\n"
            "from sales_forecast.features.store import WarmWorkers\n"
            "workers = WarmWorkers(load_settings(), 115_830)\n"
            "print(len(workers.pending), 'feast' in sys.modules)\n")
    assert fresh_interpreter(code, 180).split() == ["2", "False"]  # 10x: two writes at once, each with a worker


def test_step1_starts_the_child_before_it_imports_pandas() -> None:
    """The child's own imports (pandas, scipy, psycopg, ADBC) overlap the step's only if the step starts it before
    importing them: step 1's script and ``child.start`` must not import pandas. The child collects rarely and has
    the staging code imported."""
    code = ("import gc, importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('step1', '01_feast_features.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "from sales_forecast.features import child\n"
            "process = child.start()\n"
            "print('pandas' in sys.modules)\n"
            "staged = \"'sales_forecast.features.staging' in __import__('sys').modules\"\n"
            "print(*process.submit(gc.get_threshold).result(), process.submit(eval, staged).result())\n"
            "process.shutdown()\n")
    assert fresh_interpreter(code, 120).split("\n")[:2] == ["False", "100000 50 1000 True"]


def test_the_local_ray_head_is_started_without_rays_sigterm_drain(stack_settings) -> None:
    """Ray 2.58 waits up to 30 s on SIGTERM for the node to drain (for Ray Serve), unless
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S <= 0: the stack's head, whose stop sends SIGTERM, has it at 0."""
    from sales_forecast.stack import ray_head

    pid = ray_head.head_pid(stack_settings.stack_dir)
    assert pid is not None
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    environ = dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)
    assert float(environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) <= 0


def test_the_local_ray_heads_ports_are_distinct(stack_settings) -> None:
    """Free ports asked for one after another can repeat, and a head given one port for two of its agents does not
    start: its ports are chosen together (``free_ports`` holds each socket until all are chosen)."""
    from sales_forecast.stack import processes, ray_head

    pid = ray_head.head_pid(stack_settings.stack_dir)
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    ports = [int(a.split("=", 1)[1]) for a in arguments if a.startswith("--") and a.split("=")[0].endswith("-port")]
    assert len(ports) == 7 and len(set(ports)) == 7
    assert not set(ports) & {stack_settings.postgres.port, stack_settings.stack_ports.mlflow}  # reserved
    chosen = processes.free_ports(200, exclude=ports)
    assert len(set(chosen)) == 200 and not set(chosen) & set(ports)


def feast_cli_env(settings) -> dict[str, str]:
    """Only what a user sets: PATH, HOME and the README's POSTGRES_* variables."""
    postgres = {k: v for k, v in settings.environment().items() if k.startswith("POSTGRES_")}
    return {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            **postgres}


def test_feast_cli_and_ui_work_on_the_repo_with_only_postgres_variables(small_features) -> None:
    settings, _ = small_features
    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    env = feast_cli_env(settings)
    port = free_port()
    # the four commands each import Feast (about 10 s of CPU): run at once, not one after another
    ui = subprocess.Popen([feast, "-c", "feature_repo", "ui", "-h", "127.0.0.1", "-p", str(port)], cwd=REPO_ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    listings: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        listings = {objects: (expected, subprocess.Popen(
            [feast, "-c", "feature_repo", objects, "list"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)) for objects, expected in (
                ("feature-views", "sales_features"), ("entities", "dept"), ("feature-services", FEATURE_SERVICE))}
        for objects, (expected, listing) in listings.items():
            stdout, stderr = listing.communicate(timeout=120)
            assert listing.returncode == 0, f"feast {objects} list: {stderr[-2000:]}"
            assert expected in stdout
        assert wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120), "feast ui did not start"
        import httpx

        projects = httpx.get(f"http://127.0.0.1:{port}/projects-list.json", timeout=10).json()
        assert "sales_forecast" in str(projects)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    finally:
        for _, listing in listings.values():
            listing.kill()
            listing.wait(30)
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


def test_a_password_with_url_and_yaml_characters_works(stack_settings) -> None:
    """The registry URL never holds the password and feature_store.yaml quotes it: Feast (SDK and CLI) and the
    project's own connections log in with a password full of @ : / # and spaces. The test server trusts loopback,
    so pg_hba.conf asks this one role for its password (scram-sha-256) while the test runs."""
    password = "p@ss:w/rd #1 x"
    settings = database_settings(stack_settings, "password_check")
    hba = stack_settings.stack_dir / "postgres" / "pg_hba.conf"
    original = hba.read_text()
    admin = psycopg.connect(settings.postgres.libpq_url("postgres"), autocommit=True)
    try:
        admin.execute("DROP ROLE IF EXISTS pipeline_user")
        admin.execute(psycopg.sql.SQL("CREATE ROLE pipeline_user LOGIN SUPERUSER PASSWORD {}").format(password))
        hba.write_text("host all pipeline_user 127.0.0.1/32 scram-sha-256\n" + original)
        admin.execute("SELECT pg_reload_conf()")
        user = dataclasses.replace(settings, postgres=dataclasses.replace(settings.postgres, user="pipeline_user",
                                                                          password=password))
        wrong = dataclasses.replace(user, postgres=dataclasses.replace(user.postgres, password="wrong"))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(wrong.postgres.libpq_url()).close()
        psycopg.connect(user.postgres.libpq_url()).close()
        store = fs_ops.open_store(user)
        assert store.registry.list_projects(allow_cache=False) is not None
        feast = os.path.join(os.path.dirname(sys.executable), "feast")
        done = subprocess.run([feast, "-c", "feature_repo", "entities", "list"], cwd=REPO_ROOT,
                              env=feast_cli_env(user), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        hba.write_text(original)
        admin.execute("SELECT pg_reload_conf()")
        admin.close()
