#!/usr/bin/env python
"""Feast's import, upstream against this project's (sales_forecast/feast_import.py): `python -m
benchmarks.bench_imports [--runs N]` (make bench-imports).

Each run is a fresh interpreter, so a figure includes Python's start-up; the files are in the page cache after
the first run (warm), and the two kinds alternate. "upstream" runs `import feast`; "this project" runs
`import sales_forecast, feast` (typeguard's instrumentation deferred to each method's first lookup, torch to
Feast's first `get_torch()`); "... and a FeatureView" adds building and converting one view, which pays the first
calls' instrumentation. It prints wall and CPU (user + system) seconds of each, min / median.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

_VIEW = (
    "from datetime import timedelta\n"
    "from feast import Entity, FeatureView, Field, FileSource\n"
    "from feast.types import Float64\n"
    "view = FeatureView(name='v', entities=[Entity(name='store', join_keys=['store'])], ttl=timedelta(days=7),\n"
    "                   schema=[Field(name='sales', dtype=Float64)],\n"
    "                   source=FileSource(path='sales.parquet', timestamp_field='event_timestamp'))\n"
    "FeatureView.from_proto(view.to_proto())\n"
)
KINDS = {
    "upstream: import feast": "import feast\n",
    "this project: import sales_forecast, feast": "import sales_forecast, feast\n",
    "upstream, and a FeatureView": "import feast\n" + _VIEW,
    "this project, and a FeatureView": "import sales_forecast, feast\n" + _VIEW,
}


def _timed(code: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    _timed("import feast")  # the page cache, for both kinds
    figures: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    for run in range(args.runs):
        for kind, code in KINDS.items():
            figures[kind].append(_timed(code))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    table = Table(title=f"Feast's import in a fresh interpreter, {args.runs} alternating runs (min / median)")
    for column in ("what", "wall s", "CPU s"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for kind, runs in figures.items():
        walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
        table.add_row(kind, f"{min(walls):.2f} / {statistics.median(walls):.2f}",
                      f"{min(cpus):.2f} / {statistics.median(cpus):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
