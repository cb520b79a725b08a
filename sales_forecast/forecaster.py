"""The forecasting model and the one preprocessing path shared by training and serving.

The network predicts next week's sales relative to the series level L (the mean of the last four weeks, floored),
so one model serves series whose sizes differ by orders of magnitude. ``Forecaster`` turns Feast feature rows (a
DataFrame in training, a mapping of column arrays in serving: the same code) plus the series ids into

* the design matrix: sales features relative to L (year-ago ones also relative to last year's level), the
  calendar, the department medians and the exogenous values, clipped to the range training saw (an event or a
  distance that training never saw cannot extrapolate; a column training never had stays missing), then
  standardized, with NULL -> 0 plus a missing indicator per distinct missingness pattern of training;
* store and department indices for learned embeddings (index 0: an id training never saw);
* the predicted week's calendar events, for a learned (department x event) uplift,

and the network's outputs, one per quantile, back into sales. Quantiles cannot cross: the median is one output
and the others are the median minus / plus sums of softplus terms.

A bundle (``Forecaster.save``) is plain data: the weights (``torch.load(weights_only=True)``) and a JSON file
with the feature list, the architecture, the quantiles and the preprocessing numbers. Loading it runs no code.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from sales_forecast.features.derive import (
    CALENDAR_FEATURES,
    DEPT_FEATURES,
    EXOGENOUS_FEATURES,
    HOLIDAYS,
    LONG_MEANS,
    MODEL_FEATURES,
    RELATIVE_RANGE,
    SALES_LAGS,
    safe_level,
)

MODEL_FILE, META_FILE = "model.pt", "forecaster.json"
BUNDLE_FILES = (MODEL_FILE, META_FILE)
POINT_QUANTILE = 0.5
ID_COLUMNS = ("store", "dept")
Columns = Mapping[str, Any]  # a DataFrame or {column name: 1-D array}: the features and the ids

DESIGN: list[str] = [
    *(f"rel_lag_{k}" for k in range(1, SALES_LAGS + 1)),
    "rel_std_4",
    "log_level",
    *(f"rel_mean_{n}" for n in LONG_MEANS),
    "rel_ya_next",
    "rel_ya_this",
    "rel_ya_next2",
    "ya_level_ratio",  # log(last year's level / this level)
    "ya_step",  # last year's move from its level to the predicted week
    "ya_step_this",
    *DEPT_FEATURES,
    *CALENDAR_FEATURES,
    *EXOGENOUS_FEATURES,
]
EVENTS = [*(f"target_is_{name}" for name in HOLIDAYS), "target_is_pre_christmas"]
_EVENT_COLUMNS = [DESIGN.index(name) for name in EVENTS]
Z_LIMIT = 8.0  # standardized inputs are clipped to +-8
PREPARE_ROWS = 1 << 18  # rows Forecaster.prepare works on at a time


def _column(columns: Columns, name: str) -> np.ndarray:
    return np.asarray(columns[name], dtype="float64")


def series_level(columns: Columns) -> np.ndarray:
    return safe_level(_column(columns, "sales_mean_4"))


def relative_target(columns: Columns, target: np.ndarray) -> np.ndarray:
    return target / series_level(columns) - 1.0


def design_matrix(columns: Columns) -> np.ndarray:
    """Unscaled, unclipped model inputs (DESIGN's columns) from Feast feature rows (named as MODEL_FEATURES), built
    ``PREPARE_ROWS`` rows at a time (as ``Forecaster.prepare``)."""
    count = len(columns[_READ[0]]) if _READ[0] in columns else 0
    if count <= PREPARE_ROWS:
        return _design(columns)[0]
    matrix = np.empty((count, len(DESIGN)))
    for start in range(0, count, PREPARE_ROWS):
        matrix[start:start + PREPARE_ROWS] = _design(_row_range(columns, start, start + PREPARE_ROWS))[0]
    return matrix


# _design's inputs, read into one matrix: sales relative to the level L, then to last year's level, then as they are
_TO_LEVEL = [*(f"sales_lag_{k}" for k in range(1, SALES_LAGS + 1)), *(f"sales_mean_{n}" for n in LONG_MEANS),
             "sales_ya_next", "sales_ya_this", "sales_ya_next2"]
_TO_YA_LEVEL = ["sales_ya_next", "sales_ya_this"]
_AS_THEY_ARE = [*DEPT_FEATURES, *CALENDAR_FEATURES, *EXOGENOUS_FEATURES]
_READ = [*_TO_LEVEL, "sales_mean_4", "sales_std_4", "sales_ya_mean_4", *_AS_THEY_ARE]
_MEAN_4, _STD_4, _YA_MEAN_4 = (_READ.index(name) for name in ("sales_mean_4", "sales_std_4", "sales_ya_mean_4"))
_YA_ROWS = [_READ.index(name) for name in _TO_YA_LEVEL]
_LAGS = SALES_LAGS  # the first rows of _TO_LEVEL; the long means and year-ago weeks follow


def _design(columns: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(design matrix, series level): the level once, for the matrix and for turning outputs back into sales.

    Whole blocks of columns at a time (a request's few rows cost per numpy call, not per value): the same float64
    arithmetic as ``relative`` and ``safe_level`` column by column."""
    missing = [name for name in MODEL_FEATURES if name not in columns]
    if missing:
        raise KeyError(f"feature rows lack {missing}")
    raw = np.array([_column(columns, name) for name in _READ])
    level = safe_level(raw[_MEAN_4])
    ya_level = safe_level(raw[_YA_MEAN_4])
    low, high = RELATIVE_RANGE
    with np.errstate(invalid="ignore", divide="ignore"):
        to_level = np.clip(raw[:len(_TO_LEVEL)] / level - 1.0, low, high)
        to_ya_level = np.clip(raw[_YA_ROWS] / ya_level - 1.0, low, high)
        std = np.clip(raw[_STD_4] / level, 0.0, 5.0)
        log_level = np.log(level)
        ya_ratio = np.clip(np.log(ya_level / level), -3.0, 3.0)
    matrix = np.empty((raw.shape[1], len(DESIGN)))  # written block by block: no stacked copy to transpose
    blocks = [to_level[:_LAGS], std[None], log_level[None], to_level[_LAGS:], ya_ratio[None], to_ya_level,
              raw[len(_READ) - len(_AS_THEY_ARE):]]
    start = 0
    for block in blocks:
        matrix[:, start:start + len(block)] = block.T
        start += len(block)
    return matrix, level


def _row_range(columns: Columns, start: int, stop: int) -> Columns:
    if hasattr(columns, "iloc"):
        return columns.iloc[start:stop]
    return {name: np.asarray(values)[start:stop] for name, values in columns.items()}


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def _none_to_nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype="float64")


@dataclass(frozen=True)
class Preprocessing:
    """Clip to the training range, standardize, NULL -> 0 plus missing indicators; ids -> embedding indices."""

    mean: np.ndarray
    scale: np.ndarray
    low: np.ndarray  # NaN for a column training never had: it stays missing (clipping to NaN gives NaN)
    high: np.ndarray
    indicators: list[int]  # design columns whose missingness is an input (one per distinct training pattern)
    stores: np.ndarray  # sorted ids training saw; index k + 1 in the embedding, 0 for any other id
    depts: np.ndarray

    @classmethod
    def fit(cls, matrix: np.ndarray, store: np.ndarray, dept: np.ndarray) -> Preprocessing:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a feature without history
            low, high = np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0)
            mean, std = np.nanmean(matrix, axis=0), np.nanstd(matrix, axis=0)
        missing = np.isnan(matrix)
        patterns: dict[bytes, int] = {}
        for j in np.flatnonzero(missing.any(axis=0) & ~missing.all(axis=0)):
            patterns.setdefault(np.packbits(missing[:, j]).tobytes(), int(j))
        return cls(mean=np.where(np.isfinite(mean), mean, 0.0),
                   scale=np.where(np.isfinite(std) & (std > 1e-8), std, 1.0),
                   low=low, high=high, indicators=sorted(patterns.values()),
                   stores=np.unique(np.asarray(store, dtype="int64")), depts=np.unique(np.asarray(dept, dtype="int64")))

    @property
    def width(self) -> int:
        return len(self.mean) + len(self.indicators)

    def clip(self, matrix: np.ndarray) -> np.ndarray:
        return np.clip(matrix, self.low, self.high)

    def transform(self, clipped: np.ndarray) -> np.ndarray:
        """The float32 network input of a clipped design matrix."""
        scaled = np.clip((clipped - self.mean) / self.scale, -Z_LIMIT, Z_LIMIT)
        scaled = np.where(np.isnan(scaled), 0.0, scaled)
        flags = np.isnan(clipped[:, self.indicators])
        return np.concatenate([scaled, flags], axis=1).astype(np.float32)

    @staticmethod
    def index(ids: Any, known: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype="int64")
        position = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        return np.where(known[position] == ids, position + 1, 0)

    def as_json(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "low": _nan_to_none(self.low),
                "high": _nan_to_none(self.high), "indicators": self.indicators, "stores": self.stores.tolist(),
                "depts": self.depts.tolist()}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(mean=np.asarray(values["mean"], dtype="float64"), scale=np.asarray(values["scale"], dtype="float64"),
                   low=_none_to_nan(values["low"]), high=_none_to_nan(values["high"]),
                   indicators=[int(j) for j in values["indicators"]],
                   stores=np.asarray(values["stores"], dtype="int64"), depts=np.asarray(values["depts"], dtype="int64"))


@dataclass(frozen=True)
class Architecture:
    n_inputs: int
    n_stores: int
    n_depts: int
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    quantiles: tuple[float, ...] = (POINT_QUANTILE,)
    store_dim: int = 0
    dept_dim: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"n_inputs": self.n_inputs, "n_stores": self.n_stores, "n_depts": self.n_depts,
                "hidden": list(self.hidden), "dropout": self.dropout, "quantiles": list(self.quantiles),
                "store_dim": self.store_dim, "dept_dim": self.dept_dim}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Architecture:
        return cls(int(values["n_inputs"]), int(values["n_stores"]), int(values["n_depts"]),
                   tuple(int(size) for size in values["hidden"]), float(values["dropout"]),
                   tuple(float(q) for q in values["quantiles"]), int(values["store_dim"]), int(values["dept_dim"]))


class SalesForecastModel(nn.Module):
    """Inputs + store and department embeddings -> MLP -> one output per quantile (non-crossing), times a learned
    (department x event) uplift for weeks that hold an event; outputs next-week sales / level - 1."""

    def __init__(self, arch: Architecture):
        super().__init__()
        if POINT_QUANTILE not in arch.quantiles or list(arch.quantiles) != sorted(set(arch.quantiles)):
            raise ValueError(f"quantiles must be increasing and hold {POINT_QUANTILE}: {arch.quantiles}")
        self.arch = arch
        self.point = arch.quantiles.index(POINT_QUANTILE)
        self.store_embedding = nn.Embedding(arch.n_stores + 1, arch.store_dim)
        self.dept_embedding = nn.Embedding(arch.n_depts + 1, arch.dept_dim)
        self.uplift = nn.Embedding(arch.n_depts + 1, len(EVENTS))
        layers: list[nn.Module] = []
        width = arch.n_inputs + arch.store_dim + arch.dept_dim
        for size in arch.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if arch.dropout:
                layers.append(nn.Dropout(arch.dropout))
            width = size
        head = nn.Linear(width, len(arch.quantiles))
        layers.append(head)
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for emb in (self.store_embedding, self.dept_embedding):
                nn.init.normal_(emb.weight, 0.0, 0.05)
            nn.init.zeros_(self.uplift.weight)
            # the spreads start at softplus(-2.25) = 0.1 (+-10 %), not softplus(0) = 0.69
            head.bias.copy_(torch.tensor([0.0 if k == self.point else -2.25 for k in range(len(arch.quantiles))]))

    @property
    def n_inputs(self) -> int:
        return self.arch.n_inputs

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.arch.hidden

    def joined(self, x: torch.Tensor, store: torch.Tensor, dept: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, functional.embedding(store, self.store_embedding.weight),
                          functional.embedding(dept, self.dept_embedding.weight)], dim=1)

    def outputs(self, raw: torch.Tensor, dept: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        p = self.point
        mid = raw[:, p:p + 1]
        parts = []
        if p:  # the spreads below the median, summed outwards (a single one is its own sum)
            below = functional.softplus(raw[:, :p])
            parts.append(mid - (below.flip(1).cumsum(1).flip(1) if p > 1 else below))
        parts.append(mid)
        if p + 1 < raw.shape[1]:
            above = functional.softplus(raw[:, p + 1:])
            parts.append(mid + (above.cumsum(1) if raw.shape[1] - p > 2 else above))
        quantiles = torch.cat(parts, dim=1) if len(parts) > 1 else mid
        scale = 1.0 + (functional.embedding(dept, self.uplift.weight) * events).sum(dim=1, keepdim=True)
        return (1.0 + quantiles) * scale - 1.0

    def forward(self, x: torch.Tensor, store: torch.Tensor, dept: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        # Forecaster's inference path makes the same torch calls with ``net`` run as _EvalSteps; a test compares them.
        return self.outputs(self.net(self.joined(x, store, dept)), dept, events)


class _EvalSteps:
    """``model.net`` in eval mode as the torch calls its layers make, without the module machinery (hooks, autograd
    bookkeeping), which costs more than the arithmetic for a request's few rows: Linear is ``addmm(bias, x,
    weight.t())`` as ``F.linear`` computes it, ReLU is ``relu``, Dropout is nothing in eval mode. The same kernels
    on the same tensors: bit-identical outputs. The weights are detached views of the parameters, so in-place
    updates (an optimizer step) show; ``valid`` notices replaced parameters or storage."""

    Step = tuple[nn.Linear, torch.Tensor, torch.Tensor, int] | None  # (layer, bias, weight.t(), weight's address)

    def __init__(self, model: SalesForecastModel, steps: list[Step]):
        self.model, self.net, self.size = model, model.net, len(model.net)
        self.steps = steps
        # Embeddings of width 0 (the default) add no columns: x goes to the first Linear as it is (it is only read)
        self.widths = self._widths(model)
        self.bare = self.widths == (0, 0) and bool(steps) and steps[0] is not None

    @classmethod
    def of(cls, model: nn.Module) -> _EvalSteps | None:
        """The steps of a SalesForecastModel's net of Linear, ReLU and Dropout layers; None for anything else."""
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

    @staticmethod
    def _widths(model: SalesForecastModel) -> tuple[int, int]:
        return model.store_embedding.weight.shape[1], model.dept_embedding.weight.shape[1]

    def valid(self, model: nn.Module) -> bool:
        return model is self.model and model.net is self.net and len(model.net) == self.size and (
            self._widths(model) == self.widths) and all(
            step is None or step[0].weight.data_ptr() == step[3] and step[0].bias.data_ptr() == step[1].data_ptr()
            for step in self.steps)

    def joined(self, x: torch.Tensor, store: torch.Tensor, dept: torch.Tensor) -> torch.Tensor:
        return x if self.bare else self.model.joined(x, store, dept)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = x.relu_() if step is None else torch.addmm(step[1], x, step[2])
        return x


class BundleFormatError(ValueError):
    """A bundle written by another version of the model: its inputs are not this version's."""


@dataclass(frozen=True)
class Inputs:
    """What the network gets for some rows, and the level that turns its outputs into sales."""

    x: np.ndarray  # float32 (rows, preprocessing.width)
    store: np.ndarray  # int64 embedding indices
    dept: np.ndarray
    events: np.ndarray  # float32 (rows, len(EVENTS)), clipped to the training range
    level: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.x, self.store, self.dept, self.events, self.level

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.x), torch.from_numpy(self.store), torch.from_numpy(self.dept),
                torch.from_numpy(self.events))


@dataclass
class Forecaster:
    """Fitted preprocessing + network: Feast feature rows and ids in, next-week sales out (a column per quantile)."""

    model: SalesForecastModel
    preprocessing: Preprocessing
    features: list[str]
    _steps: _EvalSteps | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def quantiles(self) -> tuple[float, ...]:
        return self.model.arch.quantiles

    def prepare(self, columns: Columns) -> Inputs:
        """The network's inputs for feature rows. Every step works row by row, so many rows (a training set) are
        prepared ``PREPARE_ROWS`` at a time into the result: the design matrix's temporaries, several times the
        result's size, stay bounded (at 10x the default rows: gigabytes otherwise). Same values either way."""
        missing = [name for name in ID_COLUMNS if name not in columns]
        if missing:
            raise KeyError(f"feature rows lack {missing}")
        count = len(columns[ID_COLUMNS[0]])
        if count <= PREPARE_ROWS:
            return self._prepare(columns)
        parts = (self._prepare(_row_range(columns, start, start + PREPARE_ROWS))
                 for start in range(0, count, PREPARE_ROWS))
        first = next(parts)
        out = Inputs(*(np.empty((count, *array.shape[1:]), dtype=array.dtype) for array in first.arrays()))
        start = 0
        for part in itertools.chain([first], parts):
            stop = start + len(part.x)
            for target, values in zip(out.arrays(), part.arrays(), strict=True):
                target[start:stop] = values
            start = stop
        return out

    def _prepare(self, columns: Columns) -> Inputs:
        matrix, level = _design(columns)
        clipped = self.preprocessing.clip(matrix)
        events = clipped[:, _EVENT_COLUMNS]
        events = np.where(np.isnan(events), 0.0, events).astype(np.float32)  # clipped: finite or NaN
        return Inputs(self.preprocessing.transform(clipped),
                      self.preprocessing.index(columns["store"], self.preprocessing.stores),
                      self.preprocessing.index(columns["dept"], self.preprocessing.depts), events, level)

    def inputs(self, columns: Columns) -> np.ndarray:
        """The exact float32 matrix the network sees for these feature rows (without the ids)."""
        return self.prepare(columns).x

    def predict_quantiles(self, columns: Columns) -> np.ndarray:
        """(rows, quantiles) sales forecasts, in the order of ``self.quantiles``.

        A request's few rows cost tens of microseconds here, so the per-call overhead counts: the network is
        switched to eval mode only when it is not in it already, and its MLP runs as direct torch calls
        (``_EvalSteps``: the same numbers as ``self.model(...)``)."""
        prepared = self.prepare(columns)
        if self.model.training:
            self.model.eval()
        relative_forecast = self._network(*prepared.tensors()).numpy().astype("float64")
        return prepared.level[:, None] * (1.0 + relative_forecast)

    def _network(self, x: torch.Tensor, store: torch.Tensor, dept: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        steps = self._steps
        if steps is None or not steps.valid(self.model):
            steps = self._steps = _EvalSteps.of(self.model)
        with torch.no_grad():
            if steps is None:  # a network the direct path does not know
                return self.model(x, store, dept, events)
            model = self.model
            return model.outputs(steps(steps.joined(x, store, dept)), dept, events)

    def predict(self, columns: Columns) -> np.ndarray:
        """The point forecast: the median (P50)."""
        return self.predict_quantiles(columns)[:, self.model.point]

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        meta = {"features": self.features, "design": DESIGN, "quantiles": list(self.quantiles),
                "architecture": self.model.arch.as_json(), "preprocessing": self.preprocessing.as_json()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return [directory / name for name in BUNDLE_FILES]

    @classmethod
    def load(cls, directory: Path) -> Forecaster:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("design") != DESIGN:
            raise BundleFormatError(f"the bundle in {directory} was built for another design matrix (an older "
                                    "version of the model)")
        model = SalesForecastModel(Architecture.from_json(meta["architecture"]))
        model.load_state_dict(torch.load(directory / MODEL_FILE, weights_only=True))
        model.eval()
        return cls(model=model, preprocessing=Preprocessing.from_json(meta["preprocessing"]),
                   features=list(meta["features"]))

    @classmethod
    def build(cls, train: Columns, arch: Architecture) -> Forecaster:
        """An untrained Forecaster whose preprocessing is fitted on the training rows ``train``."""
        pre = Preprocessing.fit(design_matrix(train), np.asarray(train["store"]), np.asarray(train["dept"]))
        arch = Architecture(pre.width, len(pre.stores), len(pre.depts), arch.hidden, arch.dropout, arch.quantiles,
                            arch.store_dim, arch.dept_dim)
        return cls(model=SalesForecastModel(arch), preprocessing=pre, features=list(MODEL_FEATURES))
