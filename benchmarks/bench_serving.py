#!/usr/bin/env python
"""Model server latency and throughput on loopback; the same as ``python -m sales_forecast.serving.benchmark``.

Sets up its own database (``serving_bench``) and a quick model, so use any stack, e.g. one of its own:
    SALES_STACK_DIR=/tmp/serve-stack POSTGRES_PORT=54403 .venv/bin/python benchmarks/bench_serving.py
"""

from __future__ import annotations

from sales_forecast.cli import run_cli
from sales_forecast.serving.benchmark import main

if __name__ == "__main__":
    run_cli(main)
