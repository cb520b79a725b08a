"""Fast checks of the pieces: metrics and baselines, the chronological split, the promotion rule, parameters,
the model bundle in the shared directory, and the LocalProcess helpers (no database, no server)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import site
import string
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sales_forecast import model_dir
from sales_forecast.errors import PipelineError
from sales_forecast.features.derive import MODEL_FEATURES, REQUIRED_FEATURES
from sales_forecast.forecaster import Forecaster, Preprocessing, SalesForecastModel
from sales_forecast.training import local_process
from sales_forecast.training.champion import Champion, decide
from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY, SEASONAL_NAIVE, TIMESTAMP, chronological_split
from sales_forecast.training.fit import Distributed, can_start_from, fit_forecaster
from sales_forecast.training.metrics import Evaluation, Scores, baseline_forecasts, evaluate, rmse, wape, wmae
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.trainjob import LogPrinter


def frame_of(weeks: int = 20, series: int = 3, seed: int = 0) -> pd.DataFrame:
    """Feature rows with labels, shaped like the training set, for ``series`` series over ``weeks`` weeks."""
    rng = np.random.default_rng(seed)
    rows = []
    for key in range(series):
        level = 1_000.0 * (key + 1)
        sales = level * np.exp(np.cumsum(rng.normal(0, 0.05, weeks + 5)))
        for week in range(weeks):
            lags = sales[week:week + 4][::-1]
            rows.append({"store": 1, "dept": key + 1, TIMESTAMP: pd.Timestamp("2026-01-02", tz="UTC") + pd.Timedelta(
                days=7 * week), **{f"sales_lag_{k}": lags[k - 1] for k in range(1, 5)},
                "sales_mean_4": lags.mean(), "sales_std_4": lags.std(ddof=1), "lag_1_is_holiday": 0.0,
                "target_is_christmas": float(week % 10 == 9), "target_week_sin": 0.0, "target_week_cos": 1.0,
                "temperature": 60.0, "fuel_price": 3.0, "cpi": 200.0, "unemployment": 7.0,
                LABEL: sales[week + 4], LABEL_IS_HOLIDAY: week % 10 == 9, SEASONAL_NAIVE: np.nan})
    frame = pd.DataFrame(rows)
    # the other calendar features are 0; the optional ones (year-ago sales, long means) NULL, as without history
    return frame.assign(**{name: 0.0 if name in REQUIRED_FEATURES else np.nan
                           for name in MODEL_FEATURES if name not in frame})


TINY = {"epochs": 1, "batch_size": 8, "hidden": (4,), "rows_per_epoch": 64}


def test_wmae_weights_holiday_weeks_five_times() -> None:
    actual, forecast = np.array([10.0, 10.0]), np.array([12.0, 16.0])
    assert wmae(actual, forecast, np.array([False, True])) == pytest.approx((2 + 5 * 6) / 6)
    assert wmae(actual, forecast, np.array([False, False])) == pytest.approx(4.0)
    assert wape(actual, forecast) == pytest.approx(8 / 20)
    assert rmse(actual, forecast) == pytest.approx(np.sqrt((4 + 36) / 2))


def test_seasonal_baseline_only_when_every_row_has_last_year() -> None:
    frame = frame_of(weeks=4, series=1)
    assert set(baseline_forecasts(frame)) == {"naive_lag_1", "mean_last_4"}
    frame[SEASONAL_NAIVE] = 5.0
    assert set(baseline_forecasts(frame)) == {"naive_lag_1", "mean_last_4", "seasonal_lag_52"}
    frame.loc[0, SEASONAL_NAIVE] = np.nan
    assert "seasonal_lag_52" not in baseline_forecasts(frame)


def test_evaluation_skill_against_the_best_baseline() -> None:
    frame = frame_of()
    perfect = evaluate(frame, frame[LABEL].to_numpy())
    assert perfect.model.wmae == 0 and perfect.skill == 1.0
    naive = evaluate(frame, frame["sales_lag_1"].to_numpy())
    assert naive.skill == pytest.approx(0.0)
    metrics = naive.metrics()
    assert metrics["test_wmae"] == metrics["baseline_naive_lag_1_wmae"] == metrics["best_baseline_wmae"]


def test_chronological_split_keeps_the_future_out_of_training() -> None:
    frame = frame_of(weeks=20)
    split = chronological_split(frame, test_weeks=3, validation_weeks=2)
    assert split.train[TIMESTAMP].max() < split.validation[TIMESTAMP].min()
    assert split.validation[TIMESTAMP].max() < split.test[TIMESTAMP].min()
    assert [part[TIMESTAMP].nunique() for part in (split.train, split.validation, split.test)] == [15, 2, 3]
    assert len(split.train) + len(split.validation) + len(split.test) == len(frame)
    with pytest.raises(PipelineError, match="the training set is empty: 20 prediction weeks"):
        chronological_split(frame, test_weeks=18, validation_weeks=2)


def test_fit_is_reproducible_with_a_fixed_seed() -> None:
    split = chronological_split(frame_of(weeks=30, series=4), test_weeks=4, validation_weeks=3)
    params = TrainingParams(epochs=3, batch_size=16, hidden=(8,), rows_per_epoch=320)
    first, second = (fit_forecaster(split, params, Distributed(0, 1)) for _ in range(2))
    assert first.history == second.history
    assert np.array_equal(first.forecaster.predict(split.test), second.forecaster.predict(split.test))


def test_training_continues_from_a_champion_with_the_same_layout() -> None:
    """A weekly challenger continues the champion: its preprocessing is kept, its weights are the start, and only a
    champion with these features and this network qualifies."""
    split = chronological_split(frame_of(weeks=30, series=4), test_weeks=4, validation_weeks=3)
    params = TrainingParams(epochs=2, batch_size=16, hidden=(8,), rows_per_epoch=320)
    champion = fit_forecaster(split, params, Distributed(0, 1)).forecaster
    assert can_start_from(champion, params)
    assert not can_start_from(champion, dataclasses.replace(params, hidden=(16,)))
    assert not can_start_from(dataclasses.replace(champion, features=MODEL_FEATURES[:-1]), params)
    start = {name: value.clone() for name, value in champion.model.state_dict().items()}
    continued_fit = fit_forecaster(split, dataclasses.replace(params, warm_epochs=1), Distributed(0, 1), champion)
    assert continued_fit.epochs_run == 1  # warm_epochs, not epochs, when continuing
    continued = continued_fit.forecaster
    assert continued.preprocessing is champion.preprocessing
    scratch = fit_forecaster(split, dataclasses.replace(params, epochs=1), Distributed(0, 1)).forecaster
    def moved(forecaster: Forecaster) -> float:
        return max(float((value - start[name]).abs().max()) for name, value in forecaster.model.state_dict().items()
                   if value.numel())

    assert moved(continued) > 0  # trained further...
    assert moved(continued) < moved(scratch)  # ...from the champion's weights, not from new ones


SCORES = {"naive_lag_1": Scores(100.0, 0.1, 150.0), "mean_last_4": Scores(110.0, 0.1, 160.0)}


@pytest.mark.parametrize(("model", "champion", "promote"), [
    (90.0, None, True),  # first model that beats the baselines
    (100.0, None, False),  # a tie with the best baseline is not a win
    (90.0, 95.0, True),  # beats the champion re-scored on the same holdout
    (90.0, 85.0, False),  # worse than the champion
    (120.0, 130.0, False),  # better than a weak champion but not than the baselines
])
def test_promotion_rule(model: float, champion: float | None, promote: bool) -> None:
    evaluation = Evaluation(model=Scores(model, 0.1, 150.0), baselines=SCORES, rows=10)
    current = Champion(version="3" if champion else None, holdout_wmae=champion)
    assert decide(evaluation, current).promote is promote


def test_a_champion_that_cannot_be_rescored_is_kept() -> None:
    """Fail closed: a transient error while re-scoring never lets a model in on the baselines alone."""
    evaluation = Evaluation(model=Scores(90.0, 0.1, 150.0), baselines=SCORES, rows=10)
    failed = Champion(version="3", rescore_failed=True, note="champion v3 could not be re-scored: ConnectionError")
    decision = decide(evaluation, failed)
    assert not decision.promote
    assert "keeping champion v3" in decision.reason and "ConnectionError" in decision.reason
    older_format = Champion(version="3", note="champion v3 has no forecaster/forecaster.json (an older bundle format")
    assert decide(evaluation, older_format).promote


def fake_registry(monkeypatch: pytest.MonkeyPatch, version: str, download) -> None:
    """An MLflow client whose champion alias points at ``version`` and whose artifact download is ``download``."""
    import mlflow

    class Client:
        def __init__(self, uri):
            pass

        def get_model_version_by_alias(self, name, alias):
            return type("Version", (), {"version": version, "run_id": f"run-{version}"})()

        def download_artifacts(self, run_id, path, folder):
            return download(run_id, path, folder)

    monkeypatch.setattr(mlflow, "MlflowClient", Client)


def test_rescoring_errors_keep_the_champion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """current_champion against an MLflow whose artifact download fails: rescore_failed, so decide keeps it."""
    from sales_forecast.training import champion

    def download(run_id, path, folder):
        raise ConnectionError("artifact download interrupted")

    fake_registry(monkeypatch, "4", download)
    found = champion.current_champion("http://mlflow", "m", frame_of(weeks=6))
    assert found.rescore_failed and "artifact download interrupted" in found.note
    evaluation = Evaluation(model=Scores(1.0, 0.1, 1.0), baselines=SCORES, rows=10)
    assert not decide(evaluation, found).promote


def test_params_come_from_literal_dicts() -> None:
    params = TrainingParams.from_dict({"epochs": 3, "hidden": [32, 16], "learning_rate": 0.01})
    assert params.hidden == (32, 16)
    assert params.changed() == {"epochs": 3, "hidden": (32, 16), "learning_rate": 0.01}
    shipped = params.as_func_args()
    assert set(shipped) == {"encoded"} and set(shipped["encoded"]) <= set(string.ascii_letters + string.digits + "-_=")
    assert TrainingParams.from_dict(eval(repr(shipped))) == params  # the SDK embeds this repr in the job script
    with pytest.raises(PipelineError, match="learning_rate must be > 0"):
        TrainingParams.from_dict({"learning_rate": 0})


def test_publish_switches_the_shared_model_atomically(tmp_path: Path) -> None:
    split = chronological_split(frame_of(weeks=12), test_weeks=2, validation_weeks=2)
    forecaster = fit_forecaster(split, TrainingParams(**TINY), Distributed(0, 1))
    folder = model_dir.publish(forecaster.forecaster, tmp_path / "models", {"version": "7"})
    assert sorted(p.name for p in folder.iterdir()) == sorted(["model.pt", "forecaster.json", model_dir.INFO_FILE])
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []
    loaded = model_dir.load(tmp_path / "models")
    assert loaded.folder == folder and loaded.info["version"] == "7"
    assert loaded.forecaster.features == MODEL_FEATURES
    assert np.array_equal(loaded.forecaster.predict(split.test), forecaster.forecaster.predict(split.test))


def test_a_prune_renames_a_bundle_away_and_clears_what_a_dead_prune_left(tmp_path: Path) -> None:
    """Pruning renames the folder first (a reader missing a file then finds its folder gone and starts over); a
    renamed folder a prune died before deleting is removed by the next publish."""
    forecaster = fit_forecaster(chronological_split(frame_of(weeks=12), 2, 2), TrainingParams(**TINY),
                                Distributed(0, 1)).forecaster
    directory = tmp_path / "models"
    first = model_dir.publish(forecaster, directory, {"version": "0"})
    leftover = directory / model_dir.BUNDLES / f"{model_dir.PRUNED}v-dead"
    (leftover / "sub").mkdir(parents=True)
    renamed = []
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        renamed.append((self.name, Path(target).name))
        return real_rename(self, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", rename)
        for number in range(1, model_dir.KEEP + 1):
            model_dir.publish(forecaster, directory, {"version": str(number)})
    assert not leftover.exists() and not first.exists()
    assert (first.name, f"{model_dir.PRUNED}{first.name}") in renamed
    assert [p.name for p in (directory / model_dir.BUNDLES).iterdir() if p.name.startswith(".")] == []


def test_readers_never_mix_two_published_versions(tmp_path: Path) -> None:
    """A reader loading while versions are published back to back always gets one version's files: the weights
    (a bias equal to the version), the scaler and model_info.json agree."""
    frame = frame_of(weeks=12)
    base = fit_forecaster(chronological_split(frame, 2, 2), TrainingParams(**TINY),
                          Distributed(0, 1)).forecaster

    def version(number: int) -> Forecaster:
        model = SalesForecastModel(base.model.arch)
        model.load_state_dict(base.model.state_dict())
        with torch.no_grad():
            model.net[-1].bias.fill_(float(number))
        return Forecaster(model=model, preprocessing=model_dir_preprocessing(base, number), features=base.features)

    directory = tmp_path / "models"
    model_dir.publish(version(0), directory, {"version": "0"})
    stop, seen, mixed, errors = threading.Event(), set(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                loaded = model_dir.load(directory)
                number = int(loaded.info["version"])
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                return
            bias = float(loaded.forecaster.model.net[-1].bias[0].detach())
            if bias != number or loaded.forecaster.preprocessing.mean[0] != number:
                mixed.append((number, bias, loaded.forecaster.preprocessing.mean[0]))
            seen.add(number)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    for number in range(1, 40):
        model_dir.publish(version(number), directory, {"version": str(number)})
    stop.set()
    for reader in readers:
        reader.join()
    assert errors == [] and mixed == []
    assert len(seen) > 1
    assert len(list((directory / model_dir.BUNDLES).iterdir())) == model_dir.KEEP


def model_dir_preprocessing(base: Forecaster, number: int) -> Preprocessing:
    mean = base.preprocessing.mean.copy()
    mean[0] = number
    return dataclasses.replace(base.preprocessing, mean=mean)


def test_a_bundle_is_plain_data(tmp_path: Path) -> None:
    """No pickle: the preprocessing is JSON numbers, the weights load with weights_only=True, and a pickle planted in
    the folder is never opened."""
    split = chronological_split(frame_of(weeks=12), test_weeks=2, validation_weeks=2)
    forecaster = fit_forecaster(split, TrainingParams(**TINY), Distributed(0, 1))
    files = forecaster.forecaster.save(tmp_path)
    assert sorted(p.name for p in files) == ["forecaster.json", "model.pt"]
    meta = json.loads((tmp_path / "forecaster.json").read_text())
    assert meta["preprocessing"]["mean"] == forecaster.forecaster.preprocessing.mean.tolist()
    (tmp_path / "scaler.pkl").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")  # would run a command if unpickled
    loaded = Forecaster.load(tmp_path)
    assert np.array_equal(loaded.inputs(split.test), forecaster.forecaster.inputs(split.test))
    assert not (tmp_path / "pwned").exists()
    torch.save({"payload": object()}, tmp_path / "model.pt")  # a pickled object, not plain tensors
    with pytest.raises(pickle.UnpicklingError):
        Forecaster.load(tmp_path)


def test_torchrun_wheel_installs_only_the_console_script(tmp_path: Path) -> None:
    wheel = local_process.torchrun_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{local_process.SHIM_NAME}-0.1.0.dist-info/entry_points.txt").decode()
    assert all(".dist-info/" in name for name in names)
    assert "torchrun = torch.distributed.run:main" in entry_points
    target = tmp_path / "target"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (target / "bin" / "torchrun").exists()


def test_job_env_is_explicit_and_keeps_other_pips_off_path(tmp_path: Path) -> None:
    from sales_forecast.config import load_settings

    tools = local_process.pip_wrapper(tmp_path / "bin")
    settings = load_settings({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "MLFLOW_EXPERIMENT_NAME": "exp"})
    env = local_process.job_env(settings, tools)
    path = env["PATH"].split(":")
    assert path[0] == str(tools) and str(Path(sys.executable).parent) not in path
    assert set(site.getsitepackages()) <= set(env["PYTHONPATH"].split(":"))
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999" and env["PIP_NO_INDEX"] == "1"
    job = load_settings(env)  # the submitter's settings; the child only checks the server the parent started
    assert dataclasses.replace(job, postgres=settings.postgres) == settings
    assert not job.postgres.embedded and job.postgres.libpq_url() == settings.postgres.libpq_url()
    assert 'VIRTUAL_ENV' in (tools / "pip").read_text()


def test_log_printer_prints_each_line_once() -> None:
    lines: list[str] = []

    class Client:
        logs = ["a", "b"]

        def get_job_logs(self, name):
            return iter(self.logs)

    client = Client()
    printer = LogPrinter(client, "job", lines.append)
    printer()
    client.logs = ["a", "b", "c"]
    printer()
    printer()
    assert lines == ["a", "b", "c"]


class FakeJobClient:
    """A TrainerClient stand-in: the job ends with ``status`` (or never, with ``timeout``)."""

    def __init__(self, status: str = "Complete", timeout: bool = False):
        self.status, self.timeout = status, timeout

    def wait_for_job_status(self, name, status, timeout, polling_interval, callbacks):
        assert status == {"Complete", "Failed"}  # never only Complete: LocalProcess would wait for the timeout
        for callback in callbacks:
            callback(None)
        if self.timeout:
            raise TimeoutError(name)
        return type("Job", (), {"status": self.status})()

    def get_job_logs(self, name):
        return iter([f"log of {name}"])


def test_follow_job_turns_failure_and_timeout_into_pipeline_errors(capsys) -> None:
    from sales_forecast.training.trainjob import follow_job

    assert follow_job(FakeJobClient(), "job-a", timeout_s=10) == "Complete"
    assert capsys.readouterr().out == "log of job-a\n"
    with pytest.raises(PipelineError, match="TrainJob job-b ended Failed"):
        follow_job(FakeJobClient("Failed"), "job-b", timeout_s=10)
    with pytest.raises(PipelineError, match="did not finish within 10 s"):
        follow_job(FakeJobClient(timeout=True), "job-c", timeout_s=10)


def test_the_pinball_median_term_is_the_wmae_numerator() -> None:
    """With rows weighted by level x holiday weight, P50's weighted pinball loss on the relative target is half the
    WMAE numerator of the forecasts in sales units: |y - L (1 + f)| = L |y / L - 1 - f|."""
    from sales_forecast.training.fit import pinball

    rng = np.random.default_rng(1)
    level, y, f = rng.uniform(10, 1e4, 50), rng.uniform(0, 2e4, 50), rng.normal(0, 0.2, 50)
    holiday = rng.random(50) < 0.2
    loss = pinball(torch.tensor(f)[:, None], torch.tensor(y / level - 1), torch.tensor([0.5])).numpy()
    holiday_weight = np.where(holiday, 5.0, 1.0)
    numerator = wmae(y, level * (1 + f), holiday) * holiday_weight.sum()
    assert np.sum(level * holiday_weight * loss) == pytest.approx(numerator / 2)


def test_balanced_early_stopping_score_weighs_every_week_alike() -> None:
    from sales_forecast.training.fit import balanced_wmae

    frame = frame_of(weeks=4, series=3)
    naive = frame["sales_lag_1"].to_numpy()
    assert balanced_wmae(frame, naive) == pytest.approx(1.0)
    better = naive + 0.5 * (frame[LABEL].to_numpy() - naive)  # halves every week's errors
    assert balanced_wmae(frame, better) == pytest.approx(0.5)


def test_new_training_params_cross_the_kubeflow_boundary() -> None:
    params = TrainingParams(backtest=3, time_budget=12.5, rows_per_epoch=1000, dropout=0.0, statsforecast=False,
                            store_dim=2, dept_dim=0)
    assert TrainingParams.from_dict(eval(repr(params.as_func_args()))) == params
    with pytest.raises(PipelineError, match="time_budget must be > 0"):
        TrainingParams.from_dict({"time_budget": 0})
    with pytest.raises(PipelineError, match="backtest must be >= 0"):
        TrainingParams.from_dict({"backtest": -1})


def test_backtest_origins_train_only_before_their_holdout() -> None:
    from sales_forecast.training.backtest import origin_split

    frame = frame_of(weeks=30)
    weeks = np.sort(frame[TIMESTAMP].unique())
    for k in range(3):
        split = origin_split(frame, k * 4, test_weeks=4, validation_weeks=3)
        assert list(np.sort(split.test[TIMESTAMP].unique())) == list(weeks[len(weeks) - 4 * k - 4:len(weeks) - 4 * k])
        assert split.train[TIMESTAMP].max() < split.validation[TIMESTAMP].min()
        assert split.validation[TIMESTAMP].max() < split.test[TIMESTAMP].min()
        assert split.validation[TIMESTAMP].nunique() == 3
    with pytest.raises(PipelineError, match="leaves no training weeks"):
        origin_split(frame, 24, test_weeks=4, validation_weeks=3)


def test_statsforecast_baselines_forecast_each_row_from_its_past() -> None:
    """SES one week ahead from every holdout origin; changing the sales after an origin changes none of its
    forecasts; the seasonal MSTL + ETS baseline needs two years of history."""
    from sales_forecast.training.baselines import statsforecast_baselines

    frame = frame_of(weeks=20, series=3)
    dates = frame[TIMESTAMP].dt.tz_localize(None)
    history = pd.concat([  # the raw weeks: week t's sales, and the labels (week t+1's)
        pd.DataFrame({"store": frame["store"], "dept": frame["dept"], "date": dates,
                      "weekly_sales": frame["sales_lag_1"]}),
        pd.DataFrame({"store": frame["store"], "dept": frame["dept"], "date": dates + pd.Timedelta(days=7),
                      "weekly_sales": frame[LABEL]})]).drop_duplicates(["store", "dept", "date"])
    rows = frame[frame[TIMESTAMP] >= frame[TIMESTAMP].max() - pd.Timedelta(days=14)].iloc[::-1]
    first = statsforecast_baselines(history, rows)
    assert set(first) == {"sf_ses"} and np.isfinite(first["sf_ses"]).all() and len(first["sf_ses"]) == len(rows)
    changed = history.copy()
    changed.loc[changed["date"] > rows[TIMESTAMP].min().tz_localize(None), "weekly_sales"] *= 3
    earliest = (rows[TIMESTAMP] == rows[TIMESTAMP].min()).to_numpy()
    again = statsforecast_baselines(changed, rows)
    np.testing.assert_allclose(again["sf_ses"][earliest], first["sf_ses"][earliest])
    # SES's forecast lies within the range of the series' past
    for (dept, stamp), forecast in zip(zip(rows["dept"], rows[TIMESTAMP], strict=True), first["sf_ses"], strict=True):
        past = history[(history["dept"] == dept) & (history["date"] <= stamp.tz_localize(None))]["weekly_sales"]
        assert past.min() <= forecast <= past.max()


def test_the_training_cli_passes_the_backtest_and_the_budget() -> None:
    import importlib.util

    from sales_forecast.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("training_cli", REPO_ROOT / "02_training.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    params = cli.training_params(cli.parse_args(["--backtest", "3", "--time-budget", "20", "--no-statsforecast"]))
    assert (params.backtest, params.backtest_weeks, params.time_budget, params.statsforecast) == (3, 4, 20.0, False)
    assert cli.training_params(cli.parse_args([])) == TrainingParams()


def test_a_champion_of_an_older_model_version_does_not_block_promotion(monkeypatch: pytest.MonkeyPatch) -> None:
    """A champion whose bundle has another design matrix (the model before issue 12) cannot be re-scored; the gate
    says so and lets a model that beats the baselines replace it, instead of failing closed forever."""
    from sales_forecast.training import champion

    def download(run_id, path, folder):
        bundle = Path(folder) / path
        bundle.mkdir(parents=True)
        (bundle / "forecaster.json").write_text(json.dumps({"features": [], "n_inputs": 14, "hidden": [8],
                                                            "quantiles": [0.5], "scaler": {}}))
        return str(bundle)

    fake_registry(monkeypatch, "2", download)
    found = champion.current_champion("http://mlflow", "m", frame_of(weeks=6))
    assert not found.rescore_failed and "older model version" in found.note
    assert decide(Evaluation(model=Scores(90.0, 0.1, 150.0), baselines=SCORES, rows=10), found).promote


def test_complete_rows_are_selected_and_ordered_in_one_copy() -> None:
    """The rows with every required feature and a label, ordered by store, dept and time, ties in their order:
    what pandas' boolean selection and stable sort give."""
    from sales_forecast.training.dataset import complete_rows

    rng = np.random.default_rng(3)
    n = 5000
    frame = pd.DataFrame({"store": rng.integers(1, 9, n), "dept": rng.integers(1, 5, n), "other": np.arange(n),
                          TIMESTAMP: pd.to_datetime(rng.integers(0, 9, n) * 7 * 86400, unit="s", utc=True),
                          LABEL: np.where(rng.random(n) < 0.05, np.nan, rng.normal(size=n))})
    for name in REQUIRED_FEATURES:
        frame[name] = np.where(rng.random(n) < 0.02, np.nan, rng.normal(size=n))
    keep = frame[[*REQUIRED_FEATURES, LABEL]].notna().all(axis=1)
    expected = frame.loc[keep].sort_values(["store", "dept", TIMESTAMP], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(complete_rows(frame), expected)
