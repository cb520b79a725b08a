"""The forecasting model and the one preprocessing path shared by training and serving.

The network predicts next week's sales relative to the series level (the mean of the last four weeks), so
one model serves series whose sizes differ by orders of magnitude; ``Forecaster`` turns Feast feature rows
(a DataFrame in training, a mapping of column arrays in serving: the same code) into the scaled design matrix
and the network's outputs, one per quantile, back into sales.

A bundle (``Forecaster.save``) is plain data: the weights (``torch.load(weights_only=True)``) and a JSON file
with the feature list, the architecture, the quantiles and the scaler's numbers. Loading it runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sales_forecast.features.derive import MODEL_FEATURES

LEVEL_FLOOR = 10.0  # sales units; keeps the relative target finite for tiny or negative levels
MODEL_FILE, META_FILE = "model.pt", "forecaster.json"
BUNDLE_FILES = (MODEL_FILE, META_FILE)
POINT_QUANTILE = 0.5
Columns = Mapping[str, Any]  # a DataFrame or {feature name: 1-D array}


class SalesForecastModel(nn.Module):
    """An MLP on the scaled design matrix; outputs next-week sales / level - 1, one column per quantile."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.0, n_outputs: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)
        self.n_inputs = n_inputs
        self.hidden = hidden
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Forecaster's inference path makes the same torch calls directly (_EvalSteps); a test compares them.
        return self.net(x)


class _EvalSteps:
    """``SalesForecastModel.forward`` in eval mode as the torch calls its layers make, without the module machinery
    (hooks, autograd bookkeeping), which costs more than the arithmetic for a request's few rows: Linear is
    ``addmm(bias, x, weight.t())`` as ``F.linear`` computes it, ReLU is ``relu``, Dropout is nothing in eval mode. The
    same kernels on the same tensors: bit-identical outputs. The weights are detached views of the parameters, so
    in-place updates (an optimizer step) show; ``valid`` notices replaced parameters or storage."""

    Step = tuple[nn.Linear, torch.Tensor, torch.Tensor, int] | None  # (layer, bias, weight.t(), weight's address)

    def __init__(self, model: SalesForecastModel, steps: list[Step]):
        self.model, self.net, self.size = model, model.net, len(model.net)
        self.steps = steps

    @classmethod
    def of(cls, model: nn.Module) -> _EvalSteps | None:
        """The steps of a SalesForecastModel made of Linear, ReLU and Dropout layers; None for anything else."""
        if type(model) is not SalesForecastModel:
            return None
        steps: list[_EvalSteps.Step] = []
        for layer in model.net:
            if type(layer) is nn.Linear and layer.bias is not None:
                steps.append((layer, layer.bias.detach(), layer.weight.detach().t(), layer.weight.data_ptr()))
            elif type(layer) is nn.ReLU:
                steps.append(None)
            elif type(layer) is not nn.Dropout:
                return None
        return cls(model, steps)

    def valid(self, model: nn.Module) -> bool:
        return model is self.model and model.net is self.net and len(model.net) == self.size and all(
            step is None or step[0].weight.data_ptr() == step[3] and step[0].bias.data_ptr() == step[1].data_ptr()
            for step in self.steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = x.relu_() if step is None else torch.addmm(step[1], x, step[2])
        return x


@dataclass(frozen=True)
class Standardizer:
    """Per-column (x - mean) / scale, fitted like scikit-learn's StandardScaler (population std, 1 for constants)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, matrix: np.ndarray) -> Standardizer:
        std = matrix.std(axis=0)
        return cls(mean=matrix.mean(axis=0), scale=np.where(std > 0, std, 1.0))

    def transform(self, matrix: np.ndarray) -> np.ndarray:
        return (matrix - self.mean) / self.scale

    def as_json(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, values: Mapping[str, Sequence[float]]) -> Standardizer:
        return cls(mean=np.asarray(values["mean"], dtype="float64"), scale=np.asarray(values["scale"], dtype="float64"))


def _column(columns: Columns, name: str) -> np.ndarray:
    return np.asarray(columns[name], dtype="float64")


def series_level(columns: Columns) -> np.ndarray:
    return np.maximum(np.abs(_column(columns, "sales_mean_4")), LEVEL_FLOOR)  # np.clip's result, at a third the cost


RELATIVE_FEATURES = ("sales_lag_1", "sales_lag_2", "sales_lag_3", "sales_lag_4", "sales_std_4")
_OTHER_FEATURES = tuple(name for name in MODEL_FEATURES if not name.startswith("sales_"))


def design_matrix(columns: Columns) -> np.ndarray:
    """Unscaled model inputs from Feast feature rows (columns named as MODEL_FEATURES)."""
    return _design(columns)[0]


def _design(columns: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(design matrix, series level): the level once, for the matrix and for turning outputs back into sales."""
    missing = [name for name in MODEL_FEATURES if name not in columns]
    if missing:
        raise KeyError(f"feature rows lack {missing}")
    level = series_level(columns)
    relative = [_column(columns, name) / level for name in RELATIVE_FEATURES]
    other = [_column(columns, name) for name in _OTHER_FEATURES]
    # np.column_stack's result, at a fifth of its cost for a few rows
    return np.ascontiguousarray(np.array([*relative, np.log(level), *other]).T), level


def relative_target(columns: Columns, target: np.ndarray) -> np.ndarray:
    return target / series_level(columns) - 1.0


@dataclass
class Forecaster:
    """Fitted scaler + network: Feast feature rows in, next-week sales out (one column per quantile)."""

    model: SalesForecastModel
    scaler: Standardizer
    features: list[str]
    quantiles: tuple[float, ...] = (POINT_QUANTILE,)
    _steps: _EvalSteps | None = field(default=None, init=False, repr=False, compare=False)

    def inputs(self, columns: Columns) -> np.ndarray:
        """The exact float32 matrix the network sees for these feature rows."""
        return self._inputs(columns)[0]

    def _inputs(self, columns: Columns) -> tuple[np.ndarray, np.ndarray]:
        matrix, level = _design(columns)
        return self.scaler.transform(matrix).astype(np.float32), level

    def predict_quantiles(self, columns: Columns) -> np.ndarray:
        """(rows, quantiles) sales forecasts, in the order of ``self.quantiles``.

        A request's few rows cost tens of microseconds here, so the per-call overhead counts: the series level is
        computed once, the network is switched to eval mode only when it is not in it already, and its forward
        pass runs as direct torch calls (``_EvalSteps``: the same numbers as ``self.model(x)``)."""
        x, level = self._inputs(columns)
        if self.model.training:
            self.model.eval()
        relative = self._network(torch.from_numpy(x)).numpy().astype("float64")
        return level[:, None] * (1.0 + relative)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        steps = self._steps
        if steps is None or not steps.valid(self.model):
            steps = self._steps = _EvalSteps.of(self.model)
        if steps is None:  # a network the direct path does not know
            with torch.inference_mode():
                return self.model(x)
        return steps(x)

    def predict(self, columns: Columns) -> np.ndarray:
        """The point forecast: the median (P50)."""
        return self.predict_quantiles(columns)[:, self.quantiles.index(POINT_QUANTILE)]

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        meta = {"features": self.features, "n_inputs": self.model.n_inputs, "hidden": list(self.model.hidden),
                "quantiles": list(self.quantiles), "scaler": self.scaler.as_json()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return [directory / name for name in BUNDLE_FILES]

    @classmethod
    def load(cls, directory: Path) -> Forecaster:
        meta = json.loads((directory / META_FILE).read_text())
        quantiles = tuple(float(q) for q in meta["quantiles"])
        model = SalesForecastModel(meta["n_inputs"], tuple(meta["hidden"]), n_outputs=len(quantiles))
        model.load_state_dict(torch.load(directory / MODEL_FILE, weights_only=True))
        model.eval()
        return cls(model=model, scaler=Standardizer.from_json(meta["scaler"]), features=list(meta["features"]),
                   quantiles=quantiles)
