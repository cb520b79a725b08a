"""Baselines from a forecasting library (statsforecast), one week ahead from every origin the model is scored at.

``sf_ses``: simple exponential smoothing, refitted at every origin. ``sf_stl_ets``: MSTL with a 52-week season and
an AutoETS trend (R's stlf), when every series has two years of history before the first origin; fitted once on
the weeks up to the first origin and rolled forward with each new actual (statsforecast's ``refit=False``),
because refitting it costs about 15 ms per series and origin.

``BaselineProcess`` computes them in a child process while the model trains on its one core: at 10x the default
rows, reading the history and SES took 26 s of step 2 after training. The child is ``python -P -m`` this module
with this process's copy of the package first on its path, not a multiprocessing spawn, which re-imports the
parent's main script: torchrun's and the Kubeflow SDK's generated scripts have no main guard and would train again
in the child.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.training.dataset import TIMESTAMP

SEASON = 52
ERROR_PREFIX = "baselines failed: "  # the child's failure line on stderr
FAILED = "the statsforecast baselines failed in their child process: "
WEEK = pd.Timedelta(days=7)


def _models(history_weeks: int) -> list:
    from statsforecast.models import MSTL, AutoETS, SimpleExponentialSmoothingOptimized

    models = [SimpleExponentialSmoothingOptimized(alias="sf_ses")]
    if history_weeks >= 2 * SEASON:
        models.append(MSTL(season_length=SEASON, trend_forecaster=AutoETS(model="ZZN"), alias="sf_stl_ets"))
    return models


def statsforecast_baselines(history: pd.DataFrame, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """{baseline: forecast of each of ``rows``} (rows: store, dept, event_timestamp t; the forecast is of week t+1
    from the sales of weeks <= t); ``history`` holds store, dept, date, weekly_sales. The origins must be
    consecutive weeks, as a holdout's are."""
    os.environ.setdefault("NIXTLA_ID_AS_COL", "1")
    from statsforecast import StatsForecast

    stamps = pd.to_datetime(rows[TIMESTAMP]).dt.tz_localize(None)
    first, last = stamps.min(), stamps.max()
    dates = pd.to_datetime(history["date"])
    data = history.loc[dates <= last + WEEK, ["store", "dept", "weekly_sales"]].assign(ds=dates)
    # series ids by groupby, not by factorizing (store, dept) tuples: at 10x that took 3.4 s and 0.65 GiB
    codes = data.groupby(["store", "dept"], sort=False).ngroup().to_numpy()
    series = data[["store", "dept"]].assign(unique_id=codes).drop_duplicates("unique_id")
    ids = rows[["store", "dept"]].merge(series, how="left", on=["store", "dept"])["unique_id"]
    frame = pd.DataFrame({"unique_id": codes, "ds": data["ds"].to_numpy(), "y": data["weekly_sales"].to_numpy(
        dtype="float64")}).sort_values(["unique_id", "ds"], kind="stable")
    history_weeks = int(frame[frame["ds"] <= first].groupby("unique_id").size().min())
    windows = int((last - first) / WEEK) + 1
    wanted = pd.MultiIndex.from_arrays([ids.fillna(-1).to_numpy(dtype="int64"), stamps.to_numpy()])
    out: dict[str, np.ndarray] = {}
    for model in _models(history_weeks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cv = StatsForecast(models=[model], freq="7D", n_jobs=1).cross_validation(
                df=frame, h=1, n_windows=windows, step_size=1, refit=not hasattr(model, "forward"))
        forecast = pd.Series(cv[model.alias].to_numpy(dtype="float64"),
                             index=pd.MultiIndex.from_arrays([cv["unique_id"].to_numpy(), cv["cutoff"].to_numpy()]))
        out[model.alias] = forecast.reindex(wanted).to_numpy()
    return out


class BaselineProcess:
    """The statsforecast forecasts of each of ``requests`` (row sets as ``statsforecast_baselines`` takes them),
    computed by a child process that reads the sales history itself. ``forecasts(i)`` waits for them; leaving the
    block stops a child still running."""

    def __init__(self, settings: Settings, requests: Sequence[pd.DataFrame]) -> None:
        payload = pickle.dumps([rows[["store", "dept", TIMESTAMP]].reset_index(drop=True) for rows in requests])
        root = Path(__file__).resolve().parents[2]  # a checkout (editable or not); an installed copy is found as is
        first = [] if root.name in ("site-packages", "dist-packages") else [str(root)]
        path = os.pathsep.join([*first, *filter(None, [os.environ.get("PYTHONPATH")])])
        self._process = subprocess.Popen([sys.executable, "-P", "-m", __name__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env={**os.environ, **settings.environment(), **({"PYTHONPATH": path}
                                                                                          if path else {})})
        self._output: tuple[bytes, bytes] = (b"", b"")
        self._results: list[dict[str, np.ndarray]] | None = None
        self._thread = threading.Thread(target=self._communicate, args=(payload,), daemon=True)
        self._thread.start()

    def _communicate(self, payload: bytes) -> None:
        try:
            self._output = self._process.communicate(payload)
        except (OSError, ValueError) as exc:  # the pipes closed under it (the child stopped by close())
            self._output = (b"", str(exc).encode())

    def forecasts(self, index: int) -> dict[str, np.ndarray]:
        if self._results is None:
            self._thread.join()
            out, err = self._output
            code = self._process.wait()
            if code != 0:
                raise PipelineError(f"{FAILED}{_why(code, err)}")
            try:
                self._results = pickle.loads(out)
            except Exception as exc:  # noqa: BLE001 (unreadable output, whatever the error)
                raise PipelineError(f"{FAILED}{first_line(exc)}") from None
        return self._results[index]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._thread.join()
        self._process.wait()

    def __enter__(self) -> BaselineProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _why(code: int, stderr: bytes) -> str:
    """The child's failure in one line: its own line on stderr, else the last one, else how it ended."""
    if code < 0:
        return f"killed by signal {-code} (out of memory? --no-statsforecast skips them)"
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    own = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
    return (own or lines or [f"exit {code}"])[-1]


def _exit_with(parent: int) -> None:
    """Exit when the parent is gone (killed without leaving its block): the work would go nowhere."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _child() -> int:
    """The child's side: row sets in (pickled, stdin), their forecasts out (pickled, stdout); one line on stderr
    and exit 1 for a failure."""
    from sales_forecast.config import load_settings
    from sales_forecast.training.dataset import fetch_sales_history

    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    result = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print must not corrupt the pickle
    try:
        requests = pickle.load(sys.stdin.buffer)
        history = fetch_sales_history(load_settings().postgres)
        forecasts = [statsforecast_baselines(history, rows) for rows in requests]
    except Exception as exc:  # noqa: BLE001 (the parent reports it as one line)
        print(f"{ERROR_PREFIX}{type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
        return 1
    with result:
        pickle.dump(forecasts, result, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
