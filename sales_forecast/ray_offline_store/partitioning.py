"""Range partitions of the entity rows by join key, balanced by row count.

Each partition is a contiguous range of key tuples (in key order), so its feature rows are one key-range
predicate in PostgreSQL (served by a (keys, timestamp) index) and no shuffle is needed: every feature row
of a key is read by the one task that holds that key's entity rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# Types whose Python order is PostgreSQL's order (text compared with COLLATE "C": code point order).
_RANGE_SAFE = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
               pa.types.is_large_string)


@dataclass(frozen=True)
class KeyRange:
    low: tuple[Any, ...]  # inclusive
    high: tuple[Any, ...]  # inclusive


@dataclass(frozen=True)
class Partitioning:
    assignment: np.ndarray  # partition of each entity row; -1: the row can match nothing (NULL key or time)
    ranges: list[KeyRange | None]  # None: no key predicate (a single partition)

    @property
    def count(self) -> int:
        return len(self.ranges)


def range_safe(keys: pa.Table) -> bool:
    return keys.num_columns > 0 and all(any(check(field.type) for check in _RANGE_SAFE) for field in keys.schema)


def partition_by_key(keys: pa.Table, usable: np.ndarray, count: int) -> Partitioning:
    """Split the usable rows into at most ``count`` key ranges of about equal row counts."""
    usable = usable & _non_null(keys)
    assignment = np.full(keys.num_rows, -1, dtype=np.int64)
    if count <= 1 or not range_safe(keys) or not usable.any():
        assignment[usable] = 0
        return Partitioning(assignment, [None])

    rows = np.flatnonzero(usable)
    frame = keys.take(rows).to_pandas()
    grouped = frame.groupby(list(frame.columns), sort=True)
    group_of_row = grouped.ngroup().to_numpy()
    sizes = grouped.size()
    rows_before = np.cumsum(sizes.to_numpy()) - sizes.to_numpy()
    part_of_group = rows_before * count // len(rows)
    # a huge group can leave a partition empty: renumber the non-empty ones 0..n-1
    used, part_of_group = np.unique(part_of_group, return_inverse=True)
    assignment[rows] = part_of_group[group_of_row]

    first = np.searchsorted(part_of_group, np.arange(len(used)), side="left")
    last = np.searchsorted(part_of_group, np.arange(len(used)), side="right") - 1
    ranges: list[KeyRange | None] = [KeyRange(_as_tuple(sizes.index[lo]), _as_tuple(sizes.index[hi]))
                                     for lo, hi in zip(first, last, strict=True)]
    return Partitioning(assignment, ranges)


def _non_null(keys: pa.Table) -> np.ndarray:
    mask = np.ones(keys.num_rows, dtype=bool)
    for column in keys.columns:
        if column.null_count:
            mask &= column.is_valid().to_numpy(zero_copy_only=False)
    return mask


def _as_tuple(key: Any) -> tuple[Any, ...]:
    values = key if isinstance(key, tuple) else (key,)
    return tuple(value.item() if isinstance(value, np.generic) else value for value in values)
