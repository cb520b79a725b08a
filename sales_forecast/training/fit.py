"""Fit the scaler and the network: fixed seeds, CPU, early stopping on the validation weeks, DDP when distributed.

Distributed context: under torchrun with WORLD_SIZE > 1 the ranks join a gloo process group; a plain process
(or LocalProcess's single worker) is a no-op single rank.

The loss is a squared error on the relative target (next week's sales / level - 1) weighted by the series level
and the WMAE holiday weight, so large series and holiday weeks count as much as the metric says they do.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist_api
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from sales_forecast.config import torchrun_rank
from sales_forecast.errors import PipelineError
from sales_forecast.features.derive import MODEL_FEATURES
from sales_forecast.forecaster import (
    Forecaster,
    SalesForecastModel,
    Standardizer,
    design_matrix,
    relative_target,
    series_level,
)
from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY, Split
from sales_forecast.training.metrics import holiday_weights, wmae
from sales_forecast.training.params import TrainingParams


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, produce) -> Any:
        """Run ``produce()`` on rank 0 and hand its result (or its PipelineError) to every rank, so all ranks
        train on identical data or fail with the same message instead of hanging."""
        if not self.enabled:
            return produce()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", produce())
            except PipelineError as exc:
                box[0] = ("error", str(exc))
                dist_api.broadcast_object_list(box, src=0)
                raise
        dist_api.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise PipelineError(value)
        return value

    def mean(self, value: float) -> float:
        """The average of ``value`` over ranks (identical on every rank, so decisions taken on it agree)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist_api.all_reduce(tensor, op=dist_api.ReduceOp.SUM)
        return float(tensor.item()) / self.world_size


@contextlib.contextmanager
def distributed_context() -> Iterator[Distributed]:
    """torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; a plain process (or LocalProcess's single worker) has none."""
    rank, world_size = torchrun_rank()
    if world_size <= 1:
        yield Distributed(rank=0, world_size=1)
        return
    dist_api.init_process_group(backend="gloo")
    try:
        yield Distributed(rank=rank, world_size=world_size)
    finally:
        dist_api.destroy_process_group()


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    validation_wmae: float


@dataclass(frozen=True)
class FitResult:
    forecaster: Forecaster
    history: list[EpochLog]
    best_epoch: int  # 0: the untrained network (epochs=0)

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def training_tensors(forecaster: Forecaster, frame: pd.DataFrame) -> tuple[torch.Tensor, ...]:
    inputs = torch.from_numpy(forecaster.inputs(frame))
    target = relative_target(frame, frame[LABEL].to_numpy(dtype="float64"))
    weights = series_level(frame) * holiday_weights(frame[LABEL_IS_HOLIDAY].to_numpy())
    return (inputs, torch.from_numpy(target.astype(np.float32)),
            torch.from_numpy((weights / weights.mean()).astype(np.float32)))


def validation_wmae(forecaster: Forecaster, frame: pd.DataFrame) -> float:
    return wmae(frame[LABEL].to_numpy(dtype="float64"), forecaster.predict(frame), frame[LABEL_IS_HOLIDAY].to_numpy())


def _check_finite(value: float, what: str, epoch: int, params: TrainingParams) -> None:
    if not math.isfinite(value):
        raise PipelineError(f"the {what} became {value} in epoch {epoch} (learning rate {params.learning_rate:g}): "
                            "training diverged; lower --lr. Nothing was logged or registered.")


def fit_forecaster(split: Split, params: TrainingParams, dist: Distributed) -> FitResult:
    seed_everything(params.seed)
    scaler = Standardizer.fit(design_matrix(split.train))
    model = SalesForecastModel(len(scaler.mean), params.hidden)
    forecaster = Forecaster(model=model, scaler=scaler, features=list(MODEL_FEATURES))
    inputs, target, weights = training_tensors(forecaster, split.train)

    # Every rank holds the same rows; the sampler shards them by rank (padding so all ranks run equal batches).
    network = DistributedDataParallel(model) if dist.enabled else model
    optimizer = torch.optim.Adam(network.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    sampler = DistributedSampler(range(len(inputs)), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=params.seed)
    batch_size = max(1, params.batch_size // dist.world_size)

    history: list[EpochLog] = []
    best_wmae, best_epoch, best_state, stale = math.inf, 0, None, 0
    for epoch in range(1, params.epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        network.train()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = (weights[batch] * (network(inputs[batch])[:, 0] - target[batch]) ** 2).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        train_loss = dist.mean(total / max(len(order), 1))
        _check_finite(train_loss, "training loss", epoch, params)
        val_wmae = dist.mean(validation_wmae(forecaster, split.validation))
        _check_finite(val_wmae, "validation WMAE", epoch, params)
        history.append(EpochLog(epoch, train_loss, val_wmae))
        if val_wmae < best_wmae:
            best_wmae, best_epoch, stale = val_wmae, epoch, 0
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            stale += 1
            if stale >= params.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(forecaster=forecaster, history=history, best_epoch=best_epoch)
