"""A full load's offline data, made in a child process: generated, derived and staged in PostgreSQL, uncommitted,
while the step's own process imports Feast (5-6 s of CPU, nearly all of it holding the GIL) and warms Ray.

In one process the two halves shared one GIL and took as long as both together; in two they run on two cores.
The step then commits the staged tables, or refuses them (a rollback: nothing is loaded). The child answers with
what the rest of the step needs: the row counts and the last week's feature rows (one row per series).

A shape of more than RANGE_ROWS rows is made a store range at a time, so the child's memory is bounded by a range
and not by the data set (100x: 60M rows): a first pass generates each range, stages its raw rows and keeps only the
four quantities whose department medians are features (their medians need every store); a second pass generates
each range again and derives and stages its features with those medians. The tables are the ones a whole load
writes, value for value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd

from sales_forecast.config import PostgresSettings
from sales_forecast.contract import FEATURE_INDEX, FEATURE_TABLE, RAW_INDEX, RAW_TABLE
from sales_forecast.errors import PipelineError, first_line
from sales_forecast.features import child
from sales_forecast.features.derive import DeptMedians, build_features, pooled_values
from sales_forecast.features.generator import Shape, generate, generate_stores
from sales_forecast.features.load import TableLoad

T = TypeVar("T")
# Rows per store range (whole stores) of a load made range by range; a shape up to this size (10x: 6.0M rows) is made
# whole. At 100x (8 ranges) the child's resident memory stayed near 3 GiB.
RANGE_ROWS = 8_000_000


@dataclass(frozen=True)
class StagedData:
    rows: int  # rows generated, and staged in each table
    latest: pd.DataFrame  # the feature rows of the last week
    kept: list[str]  # tables that already held exactly this data (load.py), so nothing was staged for them
    seconds: dict[str, float]  # the child's own phases


_staged_load: TableLoad | None = None  # in the child: the staged tables, between _stage and _finish


def _in_child(work: Callable[[], T]) -> T:
    """Run ``work`` in the child; its errors come back as PipelineError (the pool pickles them back to the step, and
    a driver's errors may not survive unpickling: the pool would report a crashed process instead)."""
    try:
        return work()
    except Exception as exc:
        raise PipelineError(f"making the offline data failed: {type(exc).__name__}: {first_line(exc)}") from None


def store_ranges(shape: Shape, range_rows: int) -> list[tuple[int, int]]:
    """The shape's stores, first and last (inclusive), in ranges of whole stores of at most ``range_rows`` rows (at
    least one store)."""
    stores = max(1, range_rows // max(1, shape.depts * shape.weeks))
    return [(first, min(shape.stores, first + stores - 1)) for first in range(1, shape.stores + 1, stores)]


def _stage(shape: Shape, postgres: PostgresSettings, range_rows: int) -> StagedData:
    ranges = store_ranges(shape, range_rows)
    if len(ranges) > 1:
        return _in_child(lambda: _staged_by_ranges(shape, postgres, ranges))
    return _in_child(lambda: _staged(shape, postgres))


def _staged(shape: Shape, postgres: PostgresSettings) -> StagedData:
    global _staged_load
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    raw = generate(shape)
    seconds["generate"] = time.perf_counter() - started
    load = TableLoad(postgres)
    try:
        # The raw table is staged while its features are derived: PostgreSQL parsing the COPY, the fingerprint's
        # hashing and Arrow's conversions run on the second core (pgpq's encoding holds the GIL; one connection,
        # used by one thread at a time).
        with ThreadPoolExecutor(1) as pool:
            raw_staged = pool.submit(_timed, load.stage, RAW_TABLE, raw, RAW_INDEX)
            started = time.perf_counter()
            features = build_features(raw)
            seconds["derive"] = time.perf_counter() - started
            _, seconds[f"load {RAW_TABLE} (alongside derive)"] = raw_staged.result()
        rows, seconds[f"load {FEATURE_TABLE}"] = _timed(load.stage, FEATURE_TABLE, features, FEATURE_INDEX)
    except BaseException:
        load.__exit__()
        raise
    _staged_load = load
    return StagedData(rows=rows, latest=_latest(features).reset_index(drop=True), kept=list(load.kept),
                      seconds=seconds)


def _latest(features: pd.DataFrame) -> pd.DataFrame:
    """The feature rows of the last week (one per series)."""
    return features[features["event_timestamp"] == features["event_timestamp"].max()]


def _staged_by_ranges(shape: Shape, postgres: PostgresSettings, ranges: list[tuple[int, int]]) -> StagedData:
    """``_staged`` a store range at a time (module docstring)."""
    global _staged_load
    parts = {"generate (both passes)": 0.0, "pool (pass 1)": 0.0, "derive (pass 2)": 0.0}
    pooled: list[dict[str, np.ndarray]] = []
    latest: list[pd.DataFrame] = []

    def generated(first: int, last: int) -> pd.DataFrame:
        started = time.perf_counter()
        raw = generate_stores(shape, first, last)
        parts["generate (both passes)"] += time.perf_counter() - started
        return raw

    def raw_ranges() -> Iterator[pd.DataFrame]:
        for first, last in ranges:
            raw = generated(first, last)
            started = time.perf_counter()
            pooled.append(pooled_values(raw))
            parts["pool (pass 1)"] += time.perf_counter() - started
            yield raw

    def feature_ranges(medians: DeptMedians) -> Iterator[pd.DataFrame]:
        for first, last in ranges:
            raw = generated(first, last)
            started = time.perf_counter()
            features = build_features(raw, medians)
            del raw
            latest.append(_latest(features))
            parts["derive (pass 2)"] += time.perf_counter() - started
            yield features

    load = TableLoad(postgres)
    try:
        seconds: dict[str, float] = {}
        rows, seconds[f"pass 1 over {len(ranges)} store ranges: generate, pool, load {RAW_TABLE}"] = _timed(
            load.stage_parts, RAW_TABLE, raw_ranges(), RAW_INDEX)
        started = time.perf_counter()
        medians = DeptMedians.of_ranges(pooled, shape.dept_ids(), shape.dates())
        pooled.clear()
        seconds["department medians"] = time.perf_counter() - started
        _, seconds[f"pass 2: generate, derive, load {FEATURE_TABLE}"] = _timed(
            load.stage_parts, FEATURE_TABLE, feature_ranges(medians), FEATURE_INDEX)
    except BaseException:
        load.__exit__()
        raise
    _staged_load = load
    seconds.update(parts)
    return StagedData(rows=rows, latest=pd.concat(latest, ignore_index=True), kept=list(load.kept), seconds=seconds)


def _timed(work: Callable[..., T], *args: object) -> tuple[T, float]:
    started = time.perf_counter()
    return work(*args), time.perf_counter() - started


def _finish(commit: bool) -> None:
    _in_child(lambda: _finished(commit))


def _finished(commit: bool) -> None:
    global _staged_load
    load, _staged_load = _staged_load, None
    with load:
        if commit:
            load.commit()


class OfflineLoad:
    """The child process (``child.start``), given or started on construction, making the data at once; ``staged()``
    waits for it, ``commit()`` swaps the tables in. Leaving the ``with`` block without ``commit`` rolls the load back
    and ends the child."""

    def __init__(self, shape: Shape, postgres: PostgresSettings, range_rows: int = RANGE_ROWS,
                 process: ProcessPoolExecutor | None = None):
        """``process``: the child if the step started it already (``child.start``), which this load then owns."""
        self._pool = process or child.start()
        self._staged = self._pool.submit(_stage, shape, postgres, range_rows)
        self._committed = False

    def staged(self) -> StagedData:
        try:
            return self._staged.result()
        except BrokenProcessPool as exc:  # killed, e.g. by the kernel's OOM killer at a large shape
            raise PipelineError(f"the child process making the offline data (generate, derive, stage) died: {exc}; "
                                "out of memory? a smaller shape needs less") from exc

    def commit(self) -> None:
        self._pool.submit(_finish, True).result()
        self._committed = True

    def __enter__(self) -> OfflineLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if not self._committed and self._staged.done() and self._staged.exception() is None:
                self._pool.submit(_finish, False).result()
        finally:
            # a child still staging finishes, then exits uncommitted: PostgreSQL rolls its transaction back
            self._pool.shutdown(wait=True, cancel_futures=True)
