"""Where the served Forecaster comes from: the MLflow registry alias (default) or a bundle folder.

The training run logs the bundle written by ``Forecaster.save`` as run artifacts under ``forecaster`` and gives
the registered model's winning version the alias ``champion``; training also saves the same bundle to the
shared volume (``MODEL_DIR``), which ``--model-dir`` serves without MLflow.

Every loaded model carries a ``marker``, what identifies it at its source (the registry version the alias
pointed at, or the bundle folder ``current`` resolved to), and ``current_marker`` tells cheaply what the source
points at now: the server's reload check compares the two and loads the new model only when they differ.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sales_forecast import model_dir
from sales_forecast.contract import CHAMPION_URI, FORECASTER_ARTIFACT
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.forecaster import Forecaster

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


@dataclass(frozen=True)
class ModelSource:
    model_dir: Path | None = None
    model_uri: str = CHAMPION_URI
    tracking_uri: str | None = None

    @property
    def description(self) -> str:
        return str(self.model_dir) if self.model_dir is not None else self.model_uri


@dataclass(frozen=True)
class LoadedModel:
    forecaster: Forecaster
    origin: str  # what was loaded, for logs and the CLI
    version: str = ""  # the registry version; for a bundle, its model_info.json version or else its folder name
    marker: str = ""  # what the source pointed at: the registry version, or the resolved bundle folder


def load_forecaster(source: ModelSource) -> LoadedModel:
    if source.model_dir is not None:
        bundle = model_dir.load(source.model_dir)
        version = str(bundle.info.get("version") or bundle.folder.name)
        return LoadedModel(bundle.forecaster, str(bundle.folder), version=version, marker=str(bundle.folder))
    return load_registered(source.model_uri, source.tracking_uri)


def current_marker(source: ModelSource) -> str:
    """What the source points at now (one registry call, or one symlink read); compare with LoadedModel.marker."""
    if source.model_dir is not None:
        return str(model_dir.resolve(source.model_dir))
    return champion_version(source.tracking_uri, source.model_uri)


def parse_alias_uri(model_uri: str) -> tuple[str, str]:
    match = _ALIAS_URI.match(model_uri)
    if not match:
        raise PipelineError(f"model URI {model_uri!r} is not of the form models:/<name>@<alias>")
    return match["name"], match["alias"]


def load_registered(model_uri: str, tracking_uri: str | None) -> LoadedModel:
    """Resolve models:/<name>@<alias> to its run and load the bundle that run logged."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = parse_alias_uri(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise PipelineError(f"no model {model_uri} in the MLflow registry at {tracking_uri or 'the default URI'} "
                            f"({first_line(exc)}); run 02_training.py first or pass --model-dir") from exc
    with tempfile.TemporaryDirectory(prefix="sales-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=FORECASTER_ARTIFACT,
                                                        dst_path=tmp, tracking_uri=tracking_uri)
        except MlflowException as exc:
            raise PipelineError(f"run {version.run_id} of {model_uri} (version {version.version}) has no "
                                f"'{FORECASTER_ARTIFACT}' artifacts: {first_line(exc)}") from exc
        forecaster = model_dir.load(Path(local)).forecaster
    return LoadedModel(forecaster, f"{model_uri} = version {version.version} (run {version.run_id})",
                       version=str(version.version), marker=str(version.version))


def champion_version(tracking_uri: str | None, model_uri: str = CHAMPION_URI) -> str:
    """The registry version the alias points at now (an InferenceService annotation, so a new champion rolls
    the predictor pods)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = parse_alias_uri(model_uri)
    try:
        return str(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                   .get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise PipelineError(f"no model {model_uri} in the MLflow registry at {tracking_uri}: "
                            f"{first_line(exc)}; run 02_training.py first") from exc
