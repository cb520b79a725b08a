"""The forecasting model and the one preprocessing path shared by training and serving.

The network predicts next week's sales relative to the series level (the mean of the last four weeks), so
one model serves series whose sizes differ by orders of magnitude; ``Forecaster`` turns Feast feature rows
into the scaled design matrix and the network's output back into sales.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler
from torch import nn

from sales_forecast.features.derive import MODEL_FEATURES

LEVEL_FLOOR = 10.0  # sales units; keeps the relative target finite for tiny or negative levels
MODEL_FILE, SCALER_FILE, META_FILE = "model.pt", "scaler.pkl", "model_meta.json"


class SalesForecastModel(nn.Module):
    """An MLP on the scaled design matrix; outputs next-week sales / level - 1."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.n_inputs = n_inputs
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def series_level(frame: pd.DataFrame) -> np.ndarray:
    return np.clip(np.abs(frame["sales_mean_4"].to_numpy(dtype="float64")), LEVEL_FLOOR, None)


def design_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Unscaled model inputs from Feast feature rows (columns named as MODEL_FEATURES)."""
    missing = [name for name in MODEL_FEATURES if name not in frame.columns]
    if missing:
        raise KeyError(f"feature rows lack {missing}")
    level = series_level(frame)
    relative = [frame[name].to_numpy(dtype="float64") / level
                for name in ("sales_lag_1", "sales_lag_2", "sales_lag_3", "sales_lag_4", "sales_std_4")]
    other = [frame[name].to_numpy(dtype="float64") for name in MODEL_FEATURES if not name.startswith("sales_")]
    return np.column_stack([*relative, np.log(level), *other])


def relative_target(frame: pd.DataFrame, target: np.ndarray) -> np.ndarray:
    return target / series_level(frame) - 1.0


@dataclass
class Forecaster:
    """Fitted scaler + network: Feast feature rows in, next-week sales out."""

    model: SalesForecastModel
    scaler: StandardScaler
    features: list[str]

    def inputs(self, frame: pd.DataFrame) -> np.ndarray:
        """The exact float32 matrix the network sees for these feature rows."""
        return self.scaler.transform(design_matrix(frame[self.features])).astype(np.float32)

    @torch.no_grad()
    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        self.model.eval()
        relative = self.model(torch.from_numpy(self.inputs(frame))).numpy().astype("float64")
        return series_level(frame) * (1.0 + relative)

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        (directory / SCALER_FILE).write_bytes(pickle.dumps(self.scaler))
        meta = {"features": self.features, "n_inputs": self.model.n_inputs, "hidden": list(self.model.hidden)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return [directory / MODEL_FILE, directory / SCALER_FILE, directory / META_FILE]

    @classmethod
    def load(cls, directory: Path) -> Forecaster:
        meta = json.loads((directory / META_FILE).read_text())
        model = SalesForecastModel(meta["n_inputs"], tuple(meta["hidden"]))
        model.load_state_dict(torch.load(directory / MODEL_FILE, weights_only=True))
        model.eval()
        scaler = pickle.loads((directory / SCALER_FILE).read_bytes())
        return cls(model=model, scaler=scaler, features=list(meta["features"]))
