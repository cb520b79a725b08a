"""The ``champion`` alias: it moves to a new version only when that version beats the best naive baseline and
the current champion on the same holdout; the champion's bundle is then published to the shared model directory
(Settings.model_dir: a PVC path on Kubernetes, .stack/models locally), so serving can load it without MLflow.

Holdouts move as data arrives, so the champion's logged metric is not comparable with a new run's. Instead the
champion's Forecaster bundle (artifact ``forecaster`` of its run) is downloaded and re-scored on the new run's
holdout rows. The gate fails closed: when re-scoring fails (MLflow unreachable, a download error, a crash), the
champion stays and the run records why. The one exception is a champion this version cannot load at all (its run
has no bundle in the current format, so this server could not serve it either): then the new model is compared
with the baselines only, and the run says so.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sales_forecast.contract import CHAMPION_ALIAS, FORECASTER_ARTIFACT
from sales_forecast.errors import first_line
from sales_forecast.forecaster import META_FILE, BundleFormatError, Forecaster
from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY
from sales_forecast.training.metrics import Evaluation, wmae


@dataclass(frozen=True)
class Champion:
    version: str | None  # None: no champion yet
    run_id: str | None = None
    holdout_wmae: float | None = None  # the champion re-scored on this run's holdout
    note: str = ""
    rescore_failed: bool = False  # a champion exists but could not be re-scored: keep it


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def current_champion(uri: str, registered_model: str, holdout: pd.DataFrame) -> Champion:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
    except MlflowException:  # no such model or alias yet
        return Champion(version=None, note="no champion yet")
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = Path(client.download_artifacts(version.run_id, FORECASTER_ARTIFACT, folder))
            if not (local / META_FILE).is_file():
                return Champion(version=version.version, run_id=version.run_id,
                                note=f"champion v{version.version} has no {FORECASTER_ARTIFACT}/{META_FILE} (an older "
                                     "bundle format this version can neither re-score nor serve)")
            try:
                forecaster = Forecaster.load(local)
            except BundleFormatError:
                return Champion(version=version.version, run_id=version.run_id,
                                note=f"champion v{version.version} is an older model version (another design "
                                     "matrix) this version can neither re-score nor serve")
            score = wmae(holdout[LABEL].to_numpy(dtype="float64"), forecaster.predict(holdout),
                         holdout[LABEL_IS_HOLIDAY].to_numpy())
    except Exception as exc:  # noqa: BLE001 - whatever failed, the champion is kept and the reason reported
        return Champion(version=version.version, run_id=version.run_id, rescore_failed=True,
                        note=f"champion v{version.version} could not be re-scored: {type(exc).__name__}: "
                             f"{first_line(exc)}")
    return Champion(version=version.version, run_id=version.run_id, holdout_wmae=score,
                    note=f"champion v{version.version} re-scored on this holdout")


def decide(evaluation: Evaluation, champion: Champion) -> Decision:
    model = evaluation.model.wmae
    baseline_name, baseline = evaluation.best_baseline
    if not model < baseline.wmae:
        return Decision(False, f"WMAE {model:,.1f} does not beat the best baseline {baseline_name} "
                               f"({baseline.wmae:,.1f})")
    if champion.rescore_failed:
        return Decision(False, f"WMAE {model:,.1f} beats {baseline_name} ({baseline.wmae:,.1f}), but {champion.note}: "
                               f"keeping champion v{champion.version} (the gate fails closed; re-run when MLflow "
                               "answers)")
    if champion.holdout_wmae is not None and not model < champion.holdout_wmae:
        return Decision(False, f"WMAE {model:,.1f} does not beat champion v{champion.version} "
                               f"({champion.holdout_wmae:,.1f} on the same holdout)")
    versus = (f"champion v{champion.version} ({champion.holdout_wmae:,.1f})" if champion.holdout_wmae is not None
              else champion.note)
    return Decision(True, f"WMAE {model:,.1f} beats {baseline_name} ({baseline.wmae:,.1f}) and {versus}")


def promote(uri: str, registered_model: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)


def tag_version(uri: str, registered_model: str, version: str, tags: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
