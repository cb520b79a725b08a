"""The unit of work a Ray worker runs: read one key range of a feature view and join its entity rows.

Workers import this module: it imports no Feast (seconds of start-up per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sales_forecast.ray_offline_store.asof import asof_match, key_codes
from sales_forecast.ray_offline_store.columns import CREATED, POSITION, TS, feature_column, key_column
from sales_forecast.ray_offline_store.reading import feast_types, read_arrow, utc_nanoseconds


@dataclass(frozen=True)
class PartitionTask:
    connection: str  # libpq connection string
    query: str  # from sql.feature_query
    key_count: int
    has_created: bool
    output_names: tuple[str, ...]
    ttl_ns: int | None


def entity_partition(positions: np.ndarray, timestamps_ns: np.ndarray, keys: list[pa.ChunkedArray]) -> pa.Table:
    """The entity rows a task needs: position, UTC nanoseconds and the view's keys (as __k0, __k1...)."""
    columns = {POSITION: pa.array(positions, pa.int64()), TS: pa.array(timestamps_ns[positions], pa.int64())}
    columns.update({key_column(i): key.take(positions) for i, key in enumerate(keys)})
    return pa.table(columns)


def join_partition(task: PartitionTask, entities: pa.Table) -> pa.Table:
    """The features of each entity row of the partition (NULL where no row qualifies), with its position."""
    features = read_arrow(task.connection, task.query)
    entity_codes, feature_codes = key_codes([entities.column(key_column(i)) for i in range(task.key_count)],
                                            [features.column(key_column(i)) for i in range(task.key_count)])
    created = utc_nanoseconds(features.column(CREATED)) if task.has_created else None
    picked = asof_match(entity_codes, entities.column(TS).to_numpy(), feature_codes,
                        utc_nanoseconds(features.column(TS)), created, task.ttl_ns)
    values = features.select([feature_column(i) for i in range(len(task.output_names))])
    joined = feast_types(values.take(pa.array(picked, mask=picked < 0)))
    return joined.rename_columns(list(task.output_names)).append_column(POSITION, entities.column(POSITION))
