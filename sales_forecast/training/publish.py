"""The shared model directory (Settings.model_dir: a PVC path on Kubernetes, .stack/models locally) holds the
champion's Forecaster bundle, so serving can load it without MLflow."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sales_forecast.model import Forecaster

INFO_FILE = "model_info.json"


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
