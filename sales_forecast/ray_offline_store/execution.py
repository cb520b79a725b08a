"""The driver side of a retrieval: partition the entity rows, run one Ray task per (view, key range),
and put the features back in the entity set's row order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa

from sales_forecast.ray_offline_store.asof import NULL_TIME
from sales_forecast.ray_offline_store.columns import POSITION
from sales_forecast.ray_offline_store.entities import EntitySet
from sales_forecast.ray_offline_store.partitioning import Partitioning, partition_by_key
from sales_forecast.ray_offline_store.plan import ViewPlan
from sales_forecast.ray_offline_store.sql import TimeWindow, feature_query
from sales_forecast.ray_offline_store.task import PartitionTask, entity_partition, join_partition


@dataclass(frozen=True)
class Parallelism:
    partitions: int | None  # key ranges per view; None: from the row count and the cluster's CPUs
    rows_per_partition: int  # with partitions None: at most this many entity rows per task
    min_rows_per_partition: int  # with partitions None: fewer rows than this are not split further

    def partitions_for(self, rows: int, cpus: int) -> int:
        if self.partitions is not None:
            return self.partitions
        by_size = math.ceil(rows / self.rows_per_partition)
        return max(1, min(max(cpus, by_size), math.ceil(rows / self.min_rows_per_partition)))


def _window(plan: ViewPlan, timestamps_ns: np.ndarray) -> TimeWindow | None:
    """The feature rows the partition's entity rows can reach (Feast's pushdown, per partition)."""
    valid = timestamps_ns[timestamps_ns != NULL_TIME]
    if valid.size == 0:
        return None
    low, high = int(valid.min()), int(valid.max())
    return TimeWindow(low_ns=None if plan.ttl_ns is None else low - plan.ttl_ns, high_ns=high)


def view_tasks(plan: ViewPlan, entities: EntitySet, connection: str, partitions: int,
               ) -> list[tuple[PartitionTask, pa.Table]]:
    keys = entities.keys.select(list(plan.join_keys))
    partitioning: Partitioning = partition_by_key(keys, entities.timestamps_ns != NULL_TIME, partitions)
    text_keys = tuple(pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in keys.schema)
    tasks = []
    for index, key_range in enumerate(partitioning.ranges):
        positions = np.flatnonzero(partitioning.assignment == index)
        window = _window(plan, entities.timestamps_ns[positions])
        task = PartitionTask(connection=connection, query=feature_query(plan, window, key_range, text_keys),
                             key_count=len(plan.join_keys), has_created=plan.created_timestamp_column is not None,
                             output_names=plan.output_names, ttl_ns=plan.ttl_ns)
        tasks.append((task, entity_partition(positions, entities.timestamps_ns, keys.columns)))
    return tasks


def in_entity_order(parts: list[pa.Table], rows: int) -> pa.Table:
    """Scatter the partitions' rows back to their entity positions; rows no partition holds get NULLs."""
    joined = pa.concat_tables(parts)
    positions = joined.column(POSITION).to_numpy()
    features = joined.drop_columns([POSITION])
    if joined.num_rows == rows and (rows == 0 or (positions[0] == 0 and (np.diff(positions) == 1).all())):
        return features  # an entity set in key order: the partitions are already in place
    slot = np.full(rows, -1, dtype=np.int64)
    slot[positions] = np.arange(joined.num_rows)
    return features.take(pa.array(slot, mask=slot < 0))


@cache
def _remote_join() -> Any:
    import ray

    return ray.remote(join_partition)


def _with_features(entities: EntitySet, per_view: list[list[pa.Table]]) -> pa.Table:
    result = entities.table
    for parts in per_view:
        features = in_entity_order(parts, entities.num_rows)
        for name, column in zip(features.column_names, features.columns, strict=True):
            result = result.append_column(name, column)
    return result


def run_on_ray(plans: list[ViewPlan], entities: EntitySet, connection: str, partitions: int) -> pa.Table:
    """The entity set's columns followed by each view's features, one row per entity row, in its order."""
    import ray

    remote_join = _remote_join()
    submitted = [[remote_join.remote(task, part) for task, part in view_tasks(plan, entities, connection, partitions)]
                 for plan in plans]
    return _with_features(entities, [ray.get(refs) for refs in submitted])


def run_in_process(plans: list[ViewPlan], entities: EntitySet, connection: str) -> pa.Table:
    """The same join in this process, one partition per view: for entity sets too small to pay Ray's start-up."""
    per_view = [[join_partition(task, part) for task, part in view_tasks(plan, entities, connection, 1)]
                for plan in plans]
    return _with_features(entities, per_view)
