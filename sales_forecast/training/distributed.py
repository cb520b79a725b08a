"""Distributed context under torchrun: gloo on CPU when WORLD_SIZE > 1, a no-op single process otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sales_forecast.errors import PipelineError


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
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise PipelineError(value)
        return value

    def mean(self, value: float) -> float:
        """The average of ``value`` over ranks (identical on every rank, so decisions taken on it agree)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item()) / self.world_size


@contextmanager
def distributed_context() -> Iterator[Distributed]:
    """torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; a plain process (or LocalProcess's single worker) has none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size <= 1:
        yield Distributed(rank=0, world_size=1)
        return
    dist.init_process_group(backend="gloo")
    try:
        yield Distributed(rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()
