"""Fit the preprocessing and the network: fixed seeds, CPU, a one-cycle schedule, early stopping on the validation
weeks, a CPU-time budget, DDP when distributed.

Distributed context: under torchrun with WORLD_SIZE > 1 the ranks join a gloo process group; a plain process
(or LocalProcess's single worker) is a no-op single rank.

The loss is the pinball loss of P10, P50 and P90 on the relative target r = y / L - 1 (L the series level), for a
row weighted by L x its WMAE holiday weight: |y - L (1 + f)| = L |r - f|, so the P50 term is exactly the WMAE
numerator. The weighting is done by sampling (rows drawn with probability ~ weight, loss unweighted: the same
expected gradient with less variance), which also bounds an epoch to ``rows_per_epoch`` draws at any data size.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist_api
from torch.nn.parallel import DistributedDataParallel

from sales_forecast.config import torchrun_rank
from sales_forecast.errors import PipelineError
from sales_forecast.features.derive import MODEL_FEATURES, RELATIVE_RANGE
from sales_forecast.forecaster import Architecture, Forecaster, relative_target, series_level
from sales_forecast.training.dataset import LABEL, LABEL_IS_HOLIDAY, TIMESTAMP, Split
from sales_forecast.training.metrics import holiday_weights, wmae
from sales_forecast.training.params import TrainingParams

QUANTILES = (0.1, 0.5, 0.9)  # P10, P50 (the point forecast), P90


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
    validation_score: float  # what early stopping compares: the mean over validation weeks of WMAE / naive WMAE


@dataclass(frozen=True)
class FitResult:
    forecaster: Forecaster
    history: list[EpochLog]
    best_epoch: int  # 0: the untrained network (epochs=0)
    cpu_seconds: float = 0.0
    stopped_by: str = ""  # "patience", "time budget" or "" (all epochs ran)

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


def row_weights(frame: pd.DataFrame) -> np.ndarray:
    """The WMAE weight of a row's error on the relative target: series level x holiday weight."""
    return series_level(frame) * holiday_weights(frame[LABEL_IS_HOLIDAY].to_numpy())


def pinball(prediction: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """(rows,) the pinball losses of every quantile column, summed."""
    error = target[:, None] - prediction
    return torch.maximum(quantiles * error, (quantiles - 1.0) * error).sum(dim=1)


def balanced_wmae(frame: pd.DataFrame, forecast: np.ndarray) -> float:
    """The mean over prediction weeks of WMAE(week) / WMAE(last week's sales, week): every week counts the same,
    so one holiday week (weight 5, and harder) cannot decide early stopping alone."""
    actual = frame[LABEL].to_numpy(dtype="float64")
    naive = np.abs(actual - frame["sales_lag_1"].to_numpy(dtype="float64"))
    error = np.abs(actual - forecast)
    weeks = frame[TIMESTAMP].to_numpy()
    ratios = [error[weeks == week].mean() / max(naive[weeks == week].mean(), 1e-9) for week in np.unique(weeks)]
    return float(np.mean(ratios))


def rows_per_epoch(params: TrainingParams, train_rows: int) -> int:
    """Draws per epoch: the parameter, or the training rows clipped to [200K, 600K] (small data still gets enough
    optimizer steps, 10x data a bounded epoch)."""
    return params.rows_per_epoch or int(np.clip(train_rows, 200_000, 600_000))


def _check_finite(value: float, what: str, epoch: int, params: TrainingParams) -> None:
    if not math.isfinite(value):
        raise PipelineError(f"the {what} became {value} in epoch {epoch} (learning rate {params.learning_rate:g}): "
                            "training diverged; lower --lr. Nothing was logged or registered.")


def architecture(params: TrainingParams) -> Architecture:
    """The network ``params`` ask for (the input and id counts come from the training rows)."""
    return Architecture(0, 0, 0, hidden=params.hidden, dropout=params.dropout, quantiles=QUANTILES,
                        store_dim=params.store_dim, dept_dim=params.dept_dim)


def can_start_from(forecaster: Forecaster, params: TrainingParams) -> bool:
    """Whether training may continue from ``forecaster`` (a champion): the same features and network layout."""
    arch, wanted = forecaster.model.arch, architecture(params)
    return forecaster.features == list(MODEL_FEATURES) and (arch.hidden, arch.dropout, arch.quantiles,
                                                          arch.store_dim, arch.dept_dim) == (
        wanted.hidden, wanted.dropout, wanted.quantiles, wanted.store_dim, wanted.dept_dim)


def fit_forecaster(split: Split, params: TrainingParams, dist: Distributed,
                   start: Forecaster | None = None) -> FitResult:
    """Train a new Forecaster on ``split``, or continue training ``start`` (its preprocessing kept as it is)."""
    started = time.process_time()
    seed_everything(params.seed)
    forecaster = start if start is not None else Forecaster.build(split.train, architecture(params))
    epochs = params.warm_epochs if start is not None else params.epochs
    model = forecaster.model
    inputs, store, dept, events = forecaster.prepare(split.train).tensors()
    target = torch.from_numpy(np.clip(relative_target(split.train, split.train[LABEL].to_numpy(dtype="float64")),
                                      *RELATIVE_RANGE).astype(np.float32))
    weights = row_weights(split.train)
    cumulative = np.cumsum(weights) / weights.sum()
    levels = torch.tensor(QUANTILES, dtype=torch.float32)

    # Each rank draws its own rows (its own seed); every rank runs the same number of equal batches.
    network = DistributedDataParallel(model) if dist.enabled else model
    optimizer = torch.optim.AdamW(network.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    batch_size = max(1, params.batch_size // dist.world_size)
    steps = max(1, math.ceil(rows_per_epoch(params, len(target)) / params.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.learning_rate, total_steps=max(1, epochs * steps), pct_start=0.15,
        anneal_strategy="cos", div_factor=10, final_div_factor=100)
    rng = np.random.default_rng(params.seed + 1000 * dist.rank)
    generator = torch.Generator().manual_seed(params.seed + 1000 * dist.rank)

    history: list[EpochLog] = []
    best_score, best_epoch, best_state, stale, stopped_by = math.inf, 0, None, 0, ""
    for epoch in range(1, epochs + 1):
        draws = torch.from_numpy(np.searchsorted(cumulative, rng.random(steps * batch_size)).clip(0, len(target) - 1))
        network.train()
        total = 0.0
        for batch in draws.split(batch_size):
            stores, depts = store[batch], dept[batch]
            if params.id_dropout:  # some rows train the 'unknown id' embeddings that unseen stores/depts get
                stores = torch.where(torch.rand(len(batch), generator=generator) < params.id_dropout, 0, stores)
                depts = torch.where(torch.rand(len(batch), generator=generator) < params.id_dropout, 0, depts)
            optimizer.zero_grad(set_to_none=True)
            loss = pinball(network(inputs[batch], stores, depts, events[batch]), target[batch], levels).mean()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        train_loss = dist.mean(total / steps)
        _check_finite(train_loss, "training loss", epoch, params)
        forecast = forecaster.predict(split.validation)
        val_wmae = dist.mean(wmae(split.validation[LABEL].to_numpy(dtype="float64"), forecast,
                                  split.validation[LABEL_IS_HOLIDAY].to_numpy()))
        _check_finite(val_wmae, "validation WMAE", epoch, params)
        score = dist.mean(balanced_wmae(split.validation, forecast))
        history.append(EpochLog(epoch, train_loss, val_wmae, score))
        if score < best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            stale += 1
            if stale >= params.patience:
                stopped_by = "patience"
                break
        # CPU time, not wall time: a busy machine does not cut training short (one thread: about the same)
        if epoch < epochs and dist.mean(time.process_time() - started) > params.time_budget:
            stopped_by = "time budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(forecaster=forecaster, history=history, best_epoch=best_epoch,
                     cpu_seconds=time.process_time() - started, stopped_by=stopped_by)
