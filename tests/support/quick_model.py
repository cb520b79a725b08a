"""A small Forecaster fitted in seconds on the offline feature table, for the serving benchmark and tests.

It goes through the real training preprocessing (``Forecaster.build``: the design matrix, the fitted
preprocessing, the id indices; the relative target) so what it serves has the production shape; its accuracy is
beside the point. ``quantiles`` other than the default (0.5,) give a network with one output per level, fitted
with the pinball loss (levels in increasing order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import psycopg
import torch

from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_TABLE
from sales_forecast.features.derive import MODEL_FEATURES, REQUIRED_FEATURES
from sales_forecast.forecaster import Architecture, Forecaster, relative_target


def labelled_rows(settings: Settings) -> pd.DataFrame:
    """The offline feature rows with their label (the next week's sales) and complete required features."""
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{FEATURE_TABLE}" ORDER BY store, dept, event_timestamp')
        rows = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
    rows[MODEL_FEATURES] = rows[MODEL_FEATURES].astype("float64")
    rows["label"] = rows.groupby(["store", "dept"])["sales_lag_1"].shift(-1)
    return rows.dropna(subset=[*REQUIRED_FEATURES, "label"]).reset_index(drop=True)


def fit_quick_forecaster(rows: pd.DataFrame, epochs: int = 20, seed: int = 0,
                         quantiles: tuple[float, ...] = (0.5,)) -> Forecaster:
    torch.manual_seed(seed)
    forecaster = Forecaster.build(rows, Architecture(0, 0, 0, hidden=(32, 16), quantiles=tuple(quantiles)))
    model = forecaster.model
    inputs = forecaster.prepare(rows).tensors()
    y = torch.from_numpy(relative_target(rows, rows["label"].to_numpy()).astype(np.float32))
    levels = torch.tensor(quantiles, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        if quantiles == (0.5,):
            loss = torch.nn.functional.mse_loss(model(*inputs)[:, 0], y)
        else:  # pinball loss, one column per level
            error = y[:, None] - model(*inputs)
            loss = torch.maximum(levels * error, (levels - 1) * error).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    return forecaster
