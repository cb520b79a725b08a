"""The ``champion`` alias: it moves to a new version only when that version beats the best naive baseline and
the current champion on the same holdout; the champion's bundle is then published to the shared model directory
(Settings.model_dir: a PVC path on Kubernetes, .stack/models locally), so serving can load it without MLflow.

Holdouts move as data arrives, so the champion's logged metric is not comparable with a new run's. Instead the
champion's Forecaster bundle (artifact ``forecaster`` of its run) is downloaded and re-scored on the new run's
holdout rows. When that is impossible (bundle missing or unloadable) the new model is compared with the baselines
only, and the reason is recorded on the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sales_forecast.contract import CHAMPION_ALIAS, FORECASTER_ARTIFACT
from sales_forecast.forecaster import Forecaster
from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY
from sales_forecast.training.metrics import Evaluation, wmae

INFO_FILE = "model_info.json"


@dataclass(frozen=True)
class Champion:
    version: str | None  # None: no champion yet
    run_id: str | None = None
    holdout_wmae: float | None = None  # the champion re-scored on this run's holdout
    note: str = ""


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
            local = client.download_artifacts(version.run_id, FORECASTER_ARTIFACT, folder)
            forecaster = Forecaster.load(Path(local))
            score = wmae(holdout[LABEL].to_numpy(dtype="float64"), forecaster.predict(holdout),
                         holdout[LABEL_IS_HOLIDAY].to_numpy())
    except Exception as exc:  # noqa: BLE001 - any failure means "not comparable", which is reported
        return Champion(version=version.version, run_id=version.run_id,
                        note=f"champion v{version.version} could not be re-scored: {type(exc).__name__}: {exc}")
    return Champion(version=version.version, run_id=version.run_id, holdout_wmae=score,
                    note=f"champion v{version.version} re-scored on this holdout")


def decide(evaluation: Evaluation, champion: Champion) -> Decision:
    model = evaluation.model.wmae
    baseline_name, baseline = evaluation.best_baseline
    if not model < baseline.wmae:
        return Decision(False, f"WMAE {model:,.1f} does not beat the best baseline {baseline_name} "
                               f"({baseline.wmae:,.1f})")
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


def publish_bundle(forecaster: Forecaster, model_dir: Path, info: dict[str, str]) -> list[Path]:
    """Write the bundle and ``model_info.json`` (registered model, version, run) into ``model_dir``.

    Each file is written aside and renamed into place, so a reader never sees a half-written file.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        files = forecaster.save(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        published = []
        for path in [*files, staging / INFO_FILE]:
            os.replace(path, model_dir / path.name)
            published.append(model_dir / path.name)
        return published
    finally:
        shutil.rmtree(staging, ignore_errors=True)
