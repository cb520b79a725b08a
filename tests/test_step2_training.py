"""train_sales_model end to end on a real PostgreSQL (Feast offline store) and a real MLflow server: the model
beats every naive baseline, the run holds everything the serving side needs, the alias `champion` moves only
when a model wins, and two DDP processes (torchrun, gloo) still beat the baselines.

The data set is fixed (seed and end date), so the metrics do not move with the calendar: 20 stores x 20 depts x
60 weeks ending 2026-06-26, whose 8-week holdout (targets 2026-05-08..06-26) has 53+ weeks of history, so the
seasonal-naive baseline is scored too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from conftest import database_settings

from sales_forecast import model_dir
from sales_forecast.config import REPO_ROOT
from sales_forecast.contract import FEATURE_INDEX, FEATURE_SERVICE, FEATURE_TABLE, RAW_INDEX, RAW_TABLE
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import build_features
from sales_forecast.features.generator import Shape, generate
from sales_forecast.features.load import load_table
from sales_forecast.forecaster import Forecaster
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import train_sales_model

FIXED_SHAPE = Shape(stores=20, depts=20, weeks=60, seed=7, end_date=dt.date(2026, 6, 26))
FAST = {"plot_series": 2}  # the default training: about 5 s here
MODEL = "sales-forecast-it"  # a registered model of this module's own


@pytest.fixture(scope="module")
def fixed_data(stack_settings):
    """Step 1 without materialization (training reads only the offline store): tables + feast apply."""
    settings = database_settings(stack_settings, "training_fixed")
    raw = generate(FIXED_SHAPE)
    load_table(settings.postgres, RAW_TABLE, raw, RAW_INDEX)
    load_table(settings.postgres, FEATURE_TABLE, build_features(raw), FEATURE_INDEX)
    fs_ops.apply_definitions(fs_ops.open_store(settings), settings.feast_repo_path)
    return settings


@pytest.fixture(scope="module")
def training_env(fixed_data, mlflow_uri, tmp_path_factory):
    """The environment train_sales_model reads (as in a pod): this database, this MLflow, a model folder."""
    model_dir = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSTGRES_DB", fixed_data.postgres.database)
        patch.setenv("MODEL_DIR", str(model_dir))
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "training-tests")
        yield model_dir


@pytest.fixture(scope="module")
def champion_run(training_env):
    return train_sales_model({**FAST, "registered_model": MODEL, "run_name": "first"})


def test_model_beats_every_naive_baseline(champion_run) -> None:
    evaluation = champion_run.evaluation
    assert set(evaluation.baselines) == {"naive_lag_1", "mean_last_4", "seasonal_lag_52", "sf_ses"}
    best_name, best = evaluation.best_baseline
    assert evaluation.model.wmae < best.wmae, f"model {evaluation.model.wmae:.1f} vs {best_name} {best.wmae:.1f}"
    assert evaluation.skill > 0
    assert evaluation.rows == champion_run.rows["test"] == 20 * 20 * 8
    assert champion_run.fit.best_epoch >= 1 and champion_run.fit.epochs_run <= TrainingParams().epochs
    assert 0.6 < evaluation.coverage < 0.95  # P10-P90: about 0.8 when calibrated


def test_mlflow_run_holds_params_metrics_model_plot_and_version(champion_run, mlflow_uri) -> None:
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(champion_run.run.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert {"epochs": "8", "batch_size": "2048", "learning_rate": "0.002", "test_weeks": "8", "seed": "42",
            "world_size": "1", "feature_service": FEATURE_SERVICE}.items() <= params.items()
    assert int(params["train_rows"]) == champion_run.rows["train"]
    for name in ("test_wmae", "test_wape", "test_rmse", "baseline_naive_lag_1_wmae", "baseline_mean_last_4_wmae",
                 "baseline_seasonal_lag_52_wmae", "baseline_sf_ses_wmae", "best_baseline_wmae", "skill",
                 "coverage_p10_p90", "train_cpu_seconds"):
        assert np.isfinite(metrics[name]), name
    assert metrics["test_wmae"] == pytest.approx(champion_run.evaluation.model.wmae)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, champion_run.fit.epochs_run + 1))
    assert len(client.get_metric_history(run.info.run_id, "val_wmae")) == champion_run.fit.epochs_run
    assert tags["feature_service"] == FEATURE_SERVICE
    weeks = [f"{day:%Y-%m-%d}" for day in FIXED_SHAPE.dates()]
    # Prediction weeks: from the 4th week (complete lags) to the last but one (its label is the last week).
    assert (tags["data_start"], tags["data_end"]) == (weeks[3], weeks[-2])
    assert tags["test_range"] == f"{weeks[-9]}..{weeks[-2]}"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "forecaster")}
    assert artifacts == {"forecaster/model.pt", "forecaster/forecaster.json"}
    plot = Path(client.download_artifacts(run.info.run_id, "plots/forecast_vs_actual.png"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    version = client.get_model_version(MODEL, champion_run.run.model_version)
    assert version.run_id == run.info.run_id
    assert version.tags["test_wmae"] == f"{champion_run.evaluation.model.wmae:.4f}"
    # MLflow 3 saves the network with torch.export (pt2): it loads without this project's code.
    network = mlflow.pytorch.load_model(f"models:/{MODEL}/{version.version}")
    forecaster = champion_run.fit.forecaster
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{version.version}")
    specs = info.signature.inputs.to_dict()
    assert [spec["name"] for spec in specs] == ["x", "store", "dept", "events"]
    assert list(specs[0]["tensor-spec"]["shape"]) == [-1, forecaster.model.n_inputs]
    example = forecaster.prepare(champion_run_rows(champion_run)).tensors()
    with torch.no_grad():
        assert torch.allclose(network(*example), forecaster.model(*example))


def test_serving_can_load_the_champion_from_mlflow_and_from_the_model_dir(champion_run, mlflow_uri,
                                                                          training_env) -> None:
    client = mlflow.MlflowClient(mlflow_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == champion_run.run.model_version
    bundle = Path(client.download_artifacts(champion.run_id, "forecaster"))
    frame = _feature_rows(champion_run)
    expected = champion_run.fit.forecaster.predict(frame)
    assert np.allclose(Forecaster.load(bundle).predict(frame), expected)
    published = model_dir.load(training_env)
    assert np.allclose(published.forecaster.predict(frame), expected)
    info = published.info
    assert (info["version"], info["run_id"]) == (champion.version, champion.run_id)


def _feature_rows(result) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    features = result.fit.forecaster.features
    return pd.DataFrame({**{name: rng.uniform(1_000, 5_000, 10) for name in features},
                         "store": rng.integers(1, 25, 10), "dept": rng.integers(1, 25, 10)})


def champion_run_rows(result) -> pd.DataFrame:
    return _feature_rows(result).iloc[:3]


def test_alias_moves_only_when_the_model_wins(champion_run, mlflow_uri, training_env) -> None:
    client = mlflow.MlflowClient(mlflow_uri)
    bundle_before = model_dir.resolve(training_env)

    untrained = train_sales_model({**FAST, "epochs": 0, "registered_model": MODEL, "run_name": "untrained"})
    assert not untrained.decision.promote
    assert untrained.evaluation.model.wmae > champion_run.evaluation.model.wmae  # really worse
    # The champion was re-scored on this run's holdout (the same weeks here, so the same WMAE).
    assert untrained.champion.version == champion_run.run.model_version
    assert untrained.champion.holdout_wmae == pytest.approx(champion_run.evaluation.model.wmae)
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion_run.run.model_version
    assert int(untrained.run.model_version) == int(champion_run.run.model_version) + 1  # registered, not promoted
    assert model_dir.resolve(training_env) == bundle_before  # the shared model directory did not move

    # Against a weak champion, a trained model wins and the alias moves to it.
    client.set_registered_model_alias(MODEL, "champion", untrained.run.model_version)
    retrained = train_sales_model({**FAST, "registered_model": MODEL, "run_name": "retrained"})
    assert retrained.decision.promote, retrained.decision.reason
    assert retrained.champion.holdout_wmae == pytest.approx(untrained.evaluation.model.wmae)
    assert client.get_model_version_by_alias(MODEL, "champion").version == retrained.run.model_version
    assert model_dir.load(training_env).info["version"] == retrained.run.model_version


def test_two_ddp_processes_still_beat_the_baselines(fixed_data, mlflow_uri, tmp_path) -> None:
    """torchrun --nproc_per_node 2: gloo, rows sharded by rank, only rank 0 logs and registers."""
    script = tmp_path / "ddp_train.py"
    script.write_text("import json, sys\n"
                      "from sales_forecast.training.pipeline import train_sales_model\n"
                      "train_sales_model(json.loads(sys.argv[1]))\n")
    params = {**FAST, "registered_model": "sales-forecast-ddp", "run_name": "ddp"}
    env = {**os.environ, "POSTGRES_DB": fixed_data.postgres.database, "MODEL_DIR": str(tmp_path / "models"),
           "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": "training-tests-ddp", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}  # this checkout's package, whatever an installed one is
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(params)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("MLflow run ") == 1  # the report comes from rank 0 only

    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("training-tests-ddp").experiment_id])
    assert run.data.params["world_size"] == "2" and run.data.tags["world_size"] == "2"
    assert run.data.metrics["skill"] > 0, run.data.metrics
    assert run.data.metrics["test_wmae"] < run.data.metrics["best_baseline_wmae"]
    versions = client.search_model_versions("name = 'sales-forecast-ddp'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_backtest_scores_every_origin_on_a_model_trained_before_it(training_env, mlflow_uri) -> None:
    """--backtest 2: two origins 4 weeks apart, each a fresh model trained only on the weeks before its holdout;
    the model and every baseline scored per origin and in total; metrics and plot in the run."""
    result = train_sales_model({**FAST, "registered_model": "sales-forecast-backtest", "run_name": "backtest",
                                "backtest": 2})
    backtest = result.backtest
    weeks = [f"{day:%Y-%m-%d}" for day in FIXED_SHAPE.dates()]
    # prediction weeks end with the last but one week (its label is the last week)
    assert [origin.test_range for origin in backtest.origins] == [f"{weeks[-5]}..{weeks[-2]}",
                                                                 f"{weeks[-9]}..{weeks[-6]}"]
    for origin in backtest.origins:
        assert origin.evaluation.rows == 20 * 20 * 4
        assert {"naive_lag_1", "mean_last_4", "sf_ses"} <= set(origin.evaluation.baselines)
        assert 0.5 < origin.evaluation.coverage < 1.0
    totals = backtest.total_wmae()
    weights = np.array([origin.weight for origin in backtest.origins])
    model = [origin.evaluation.model.wmae for origin in backtest.origins]
    assert totals["model"] == pytest.approx(np.dot(model, weights) / weights.sum())
    assert totals["model"] < min(value for name, value in totals.items() if name != "model")  # beats them all

    client = mlflow.MlflowClient(mlflow_uri)
    metrics = client.get_run(result.run.run_id).data.metrics
    for name in ("backtest_1_model_wmae", "backtest_2_model_wmae", "backtest_1_sf_ses_wmae",
                 "backtest_2_naive_lag_1_wmae", "backtest_total_model_wmae", "backtest_total_sf_ses_wmae"):
        assert np.isfinite(metrics[name]), name
    assert metrics["backtest_skill"] == pytest.approx(backtest.skill)
    plot = Path(client.download_artifacts(result.run.run_id, "plots/backtest_wmae.png"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sales_history_is_the_raw_table_in_order(fixed_data) -> None:
    """The statsforecast baselines' history, read as Arrow: every raw row, in series and date order, with the raw
    table's values; the baselines forecast the same from it as from the rows psycopg reads."""
    import psycopg

    from sales_forecast.training.baselines import statsforecast_baselines
    from sales_forecast.training.dataset import LABEL, TIMESTAMP, fetch_sales_history

    history = fetch_sales_history(fixed_data.postgres)
    with psycopg.connect(fixed_data.postgres.libpq_url()) as conn:
        rows = conn.execute(f'SELECT store, dept, date, weekly_sales FROM "{RAW_TABLE}" '
                            "ORDER BY store, dept, date").fetchall()
    reference = pd.DataFrame(rows, columns=["store", "dept", "date", "weekly_sales"])
    assert list(history.columns) == ["store", "dept", "date", "weekly_sales"] and len(history) == len(reference)
    assert history.dtypes.astype(str).tolist()[:2] == ["int64", "int64"] and history["weekly_sales"].dtype == "float64"
    np.testing.assert_array_equal(history[["store", "dept"]].to_numpy(), reference[["store", "dept"]].to_numpy())
    assert (history["date"].dt.date == reference["date"]).all()
    np.testing.assert_array_equal(history["weekly_sales"], reference["weekly_sales"].astype("float64"))
    last = history["date"].max()
    holdout = pd.DataFrame({"store": [1, 2, 3], "dept": [1, 2, 3], LABEL: 1.0,
                            TIMESTAMP: pd.Timestamp(last, tz="UTC") - pd.Timedelta(days=7)})
    np.testing.assert_array_equal(statsforecast_baselines(history, holdout)["sf_ses"],
                                  statsforecast_baselines(reference.astype({"weekly_sales": "float64"}),
                                                          holdout)["sf_ses"])


def _baseline_children() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True)
            if "sales_forecast.training.baselines" in " ".join(child.cmdline())]


def test_the_baselines_child_process_forecasts_what_the_function_does(fixed_data) -> None:
    """Two row sets through the child process (``python -m``, it reads the history itself) get the very forecasts
    ``statsforecast_baselines`` gives in this process, each in its rows' order."""
    from sales_forecast.training.baselines import BaselineProcess, statsforecast_baselines
    from sales_forecast.training.dataset import TIMESTAMP, fetch_sales_history

    history = fetch_sales_history(fixed_data.postgres)
    last = pd.Timestamp(history["date"].max(), tz="UTC") - pd.Timedelta(days=7)
    first = pd.DataFrame({"store": [1, 2, 3, 20], "dept": [1, 2, 3, 20], TIMESTAMP: last, "extra": "x"})
    weeks = [last - pd.Timedelta(days=7 * k) for k in range(3)]
    second = pd.DataFrame({"store": [5, 5, 5, 7], "dept": [9, 9, 9, 1], TIMESTAMP: [*weeks, weeks[1]]})
    with BaselineProcess(fixed_data, [first, second]) as child:
        assert len(_baseline_children()) == 1
        got = [child.forecasts(0), child.forecasts(1)]
    for rows, forecasts in zip([first, second], got, strict=True):
        expected = statsforecast_baselines(history, rows)
        assert set(forecasts) == set(expected) and "sf_ses" in forecasts
        for name, values in expected.items():
            np.testing.assert_array_equal(forecasts[name], values)
    assert not _baseline_children()


def test_a_failed_killed_or_abandoned_baseline_child_is_one_clear_error(fixed_data) -> None:
    """An unreachable database and a killed child each raise one PipelineError line; leaving the block while the
    child runs stops it."""
    import dataclasses

    from sales_forecast.errors import PipelineError
    from sales_forecast.stack.processes import free_port
    from sales_forecast.training.baselines import BaselineProcess
    from sales_forecast.training.dataset import TIMESTAMP

    rows = pd.DataFrame({"store": [1], "dept": [1], TIMESTAMP: pd.Timestamp("2026-06-12", tz="UTC")})
    nowhere = dataclasses.replace(fixed_data, postgres=dataclasses.replace(fixed_data.postgres, port=free_port()))
    with BaselineProcess(nowhere, [rows]) as child, pytest.raises(PipelineError) as failed:
        child.forecasts(0)
    message = str(failed.value)
    assert message.startswith("the statsforecast baselines failed in their child process: ") and "\n" not in message
    assert str(nowhere.postgres.port) in message or "connect" in message.lower(), message

    with BaselineProcess(fixed_data, [rows]) as child:
        [process] = _baseline_children()
        process.kill()
        with pytest.raises(PipelineError, match="killed by signal 9"):
            child.forecasts(0)

    with BaselineProcess(fixed_data, [rows]):
        [process] = _baseline_children()
    process.wait(timeout=10)
    assert not _baseline_children()


def test_the_baselines_child_runs_this_copy_of_the_package_and_dies_with_its_parent(fixed_data, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """A ``sales_forecast`` in the working directory or first on PYTHONPATH is not the one the child runs; a parent
    killed outright (no ``with`` block left) takes the child down within seconds instead of leaving it to finish."""
    import socket
    import textwrap

    from sales_forecast.training.baselines import BaselineProcess
    from sales_forecast.training.dataset import TIMESTAMP

    impostor = tmp_path / "sales_forecast"
    (impostor / "training").mkdir(parents=True)
    (impostor / "__init__.py").write_text("raise ImportError('the wrong copy of sales_forecast')\n")
    (impostor / "training" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = pd.DataFrame({"store": [1], "dept": [1], TIMESTAMP: pd.Timestamp("2026-06-12", tz="UTC")})
    with BaselineProcess(fixed_data, [rows]) as child:
        assert np.isfinite(child.forecasts(0)["sf_ses"]).all()
    monkeypatch.delenv("PYTHONPATH")

    with socket.socket() as silent:  # accepts connections and never answers: the child's connect waits 10 s
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        script = textwrap.dedent(f"""
            import dataclasses, sys, time
            import pandas as pd
            from sales_forecast.config import load_settings
            from sales_forecast.training.baselines import BaselineProcess
            settings = load_settings()
            settings = dataclasses.replace(settings, postgres=dataclasses.replace(settings.postgres,
                                           port={silent.getsockname()[1]}))
            rows = pd.DataFrame({{"store": [1], "dept": [1], "event_timestamp": pd.Timestamp("2026-06-12", tz="UTC")}})
            child = BaselineProcess(settings, [rows])
            print("started", flush=True)
            time.sleep(60)
        """)
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO_ROOT, env={**os.environ, **fixed_data.environment()})
        try:
            assert parent.stdout.readline().strip() == "started"
            [child] = psutil.Process(parent.pid).children()
            time.sleep(3)  # the child has imported and is waiting for the silent server
            assert child.is_running()
            parent.kill()
            parent.wait(timeout=10)
            gone, _ = psutil.wait_procs([child], timeout=5)
            assert gone, "the child outlived its killed parent"
        finally:
            parent.kill()
            parent.stdout.close()
