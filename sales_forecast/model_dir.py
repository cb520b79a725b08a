"""The shared model directory (Settings.model_dir: a PVC path on Kubernetes, .stack/models locally): the
champion's Forecaster bundle, so serving can load it without MLflow.

Layout: every published bundle is a folder of its own under ``bundles/``, complete before it gets its final
name; ``current`` is a symlink to one of them, switched with an atomic rename. A reader resolves ``current``
once and reads every file from that folder, so it never combines one version's weights with another's metadata,
whenever a publish happens. The last ``KEEP`` bundles stay, so a reader that resolved an older one can finish.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from sales_forecast.errors import PipelineError
from sales_forecast.forecaster import META_FILE, Forecaster

CURRENT, BUNDLES, INFO_FILE = "current", "bundles", "model_info.json"
KEEP = 3
PRUNED = ".pruned-"  # a pruned bundle's folder while it is deleted


def publish(forecaster: Forecaster, model_dir: Path, info: dict[str, str]) -> Path:
    """Write the bundle and ``model_info.json`` into a new folder and switch ``current`` to it; returns the folder."""
    bundles = model_dir / BUNDLES
    bundles.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=bundles))
    try:
        forecaster.save(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        folder = bundles / f"v{info.get('version', 'x')}-{uuid.uuid4().hex[:8]}"
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    link = model_dir / f".{CURRENT}-{uuid.uuid4().hex[:8]}"
    link.symlink_to(Path(BUNDLES) / folder.name)
    os.replace(link, model_dir / CURRENT)
    _prune(bundles, keep=folder.name)
    return folder


def _prune(bundles: Path, keep: str) -> None:
    for leftover in bundles.glob(f"{PRUNED}*"):  # a prune that died between its rename and its delete
        shutil.rmtree(leftover, ignore_errors=True)
    published = sorted((p for p in bundles.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)
    for old in published[:-KEEP]:
        if old.name == keep:
            continue
        # Renamed away first, atomically: a reader missing a file then finds its folder gone and starts over, where
        # a folder being deleted file by file still exists while its files vanish
        trash = bundles / f"{PRUNED}{old.name}"
        try:
            old.rename(trash)
        except OSError:  # pruned by another publisher
            continue
        shutil.rmtree(trash, ignore_errors=True)


def resolve(directory: Path) -> Path:
    """The bundle folder to read: ``current``'s target in a model directory, or ``directory`` itself when it is a
    bundle (a folder Forecaster.save wrote, e.g. downloaded run artifacts)."""
    current = directory / CURRENT
    if current.is_symlink() or current.exists():
        return current.resolve(strict=True)
    if (directory / META_FILE).is_file():
        return directory
    raise PipelineError(f"{directory} holds no model bundle (neither {CURRENT}/ nor {META_FILE}); "
                        "run 02_training.py or pass the folder Forecaster.save wrote")


@dataclass(frozen=True)
class Bundle:
    forecaster: Forecaster
    folder: Path  # where every file was read from
    info: dict[str, str]  # model_info.json (registered model, version, run), empty for a bare bundle


def load(directory: Path, attempts: int = 5) -> Bundle:
    """``directory``'s current bundle, every file from the same folder.

    A folder can be pruned while a slow reader reads it (after KEEP newer publishes): then the reader starts over
    from ``current``."""
    for attempt in range(attempts):
        folder = resolve(directory)
        try:
            info_file = folder / INFO_FILE
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            return Bundle(Forecaster.load(folder), folder, info)
        except FileNotFoundError:
            if attempt == attempts - 1 or folder.exists():
                raise
    raise AssertionError("unreachable")
