"""The process a full load's data is made in (``staging.OfflineLoad``), started before step 1 imports pandas, Feast
and Ray: the child's own imports (pandas, scipy, psycopg, ADBC: 1.3 s of CPU) then run on the other core while the
step's do, instead of after them. This module imports nothing heavy, so the step can start the child first thing.
"""

from __future__ import annotations

import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

# gc thresholds of a process that makes millions of objects (Python's: 700, 10, 10)
RARE_COLLECTIONS = (100_000, 50, 1000)


def start() -> ProcessPoolExecutor:
    """The child, spawned now (a fresh interpreter, safe whatever threads the step runs later: Ray's, Feast's), which
    collects garbage rarely (``store.collecting_rarely``) from its first import on and imports the staging code."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare)
    pool.submit(gc.isenabled)  # the pool starts its process at the first task
    return pool


def _prepare() -> None:
    gc.set_threshold(*RARE_COLLECTIONS)
    import sales_forecast.features.staging  # noqa: F401
