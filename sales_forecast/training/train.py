"""The training function every backend runs: in this process, in a LocalProcess venv, or in a TrainJob pod.

Kubeflow ships this function's source, not this module: the source is written into a bash heredoc that is not
quoted, so the function imports inside and contains no dollar sign, backtick or backslash (tests check this).
"""

from __future__ import annotations


def train_sales_model(params: dict | None = None, **kwargs):
    """Train, evaluate, log and register the weekly sales model; returns the result on rank 0 (None elsewhere).

    LocalProcess passes func_args as one positional dict, the Kubernetes backend as keyword arguments: both work.
    Everything else (PostgreSQL, MLflow, model directory) comes from the environment, as in load_settings().
    """
    from sales_forecast.training.pipeline import run_training_job

    return run_training_job({**(params or {}), **kwargs})
