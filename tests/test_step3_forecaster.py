"""The Forecaster's inference path (what the server runs per request): its direct torch calls give exactly what the
network module gives, for every architecture the project builds, and follow the weights as training changes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sales_forecast.features.derive import MODEL_FEATURES
from sales_forecast.forecaster import Forecaster, SalesForecastModel, Standardizer, design_matrix


def feature_rows(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = {name: rng.normal(size=count) for name in MODEL_FEATURES}
    for name in ("sales_lag_1", "sales_lag_2", "sales_lag_3", "sales_lag_4", "sales_mean_4"):
        rows[name] = rng.lognormal(8, 1.5, size=count)
    rows["sales_std_4"] = rng.lognormal(6, 1, size=count)
    return rows


def forecaster(hidden: tuple[int, ...], dropout: float, quantiles: tuple[float, ...], seed: int = 0) -> Forecaster:
    torch.manual_seed(seed)
    scaler = Standardizer.fit(design_matrix(feature_rows(500, seed=seed + 1)))
    model = SalesForecastModel(len(scaler.mean), hidden, dropout=dropout, n_outputs=len(quantiles))
    return Forecaster(model=model, scaler=scaler, features=list(MODEL_FEATURES), quantiles=quantiles)


def module_outputs(f: Forecaster, rows) -> np.ndarray:
    """The reference: the network module's own forward in eval mode, turned into sales as predict_quantiles does."""
    x, level = f._inputs(rows)
    f.model.eval()
    with torch.no_grad():
        relative = f.model(torch.from_numpy(x)).numpy().astype("float64")
    return level[:, None] * (1.0 + relative)


@pytest.mark.parametrize(("hidden", "dropout", "quantiles"), [
    ((32, 16), 0.0, (0.5,)), ((64, 32), 0.1, (0.1, 0.5, 0.9)), ((128, 64, 32), 0.2, (0.05, 0.5, 0.95)),
    ((8,), 0.0, (0.5,)),
])
@pytest.mark.parametrize("count", [1, 2, 7, 1000])
def test_direct_calls_equal_the_module_bit_for_bit(hidden, dropout, quantiles, count: int) -> None:
    f = forecaster(hidden, dropout, quantiles)
    rows = feature_rows(count, seed=count)
    f.model.train()  # predict switches to eval (dropout off) as before
    got = f.predict_quantiles(rows)
    assert f._steps is not None and not f.model.training
    np.testing.assert_array_equal(got, module_outputs(f, rows))
    assert got.shape == (count, len(quantiles))
    np.testing.assert_array_equal(f.predict(rows), got[:, quantiles.index(0.5)])


def test_the_direct_path_follows_training_and_loading() -> None:
    f = forecaster((32, 16), 0.0, (0.1, 0.5, 0.9))
    rows = feature_rows(5)
    before = f.predict_quantiles(rows)
    optimizer = torch.optim.SGD(f.model.parameters(), lr=0.1)  # in-place updates of the same parameters
    f.model.train()
    loss = f.model(torch.from_numpy(f.inputs(rows))).pow(2).mean()
    loss.backward()
    optimizer.step()
    after = f.predict_quantiles(rows)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, module_outputs(f, rows))
    f.model.load_state_dict(forecaster((32, 16), 0.0, (0.1, 0.5, 0.9), seed=9).model.state_dict())  # same storage
    loaded = f.predict_quantiles(rows)
    assert not np.array_equal(loaded, after)
    np.testing.assert_array_equal(loaded, module_outputs(f, rows))
    f.model.double().float()  # new storage for every parameter
    np.testing.assert_array_equal(f.predict_quantiles(rows), loaded)


def test_an_unknown_network_uses_its_own_forward() -> None:
    class Scaled(SalesForecastModel):
        def forward(self, x):
            return super().forward(x) * 2

    f = forecaster((16,), 0.0, (0.5,))
    scaled = Scaled(f.model.n_inputs, f.model.hidden)
    scaled.load_state_dict(f.model.state_dict())
    plain = f.predict_quantiles(feature_rows(3))
    f.model = scaled
    rows = feature_rows(3)
    np.testing.assert_array_equal(f.predict_quantiles(rows), module_outputs(f, rows))
    assert f._steps is None and not np.array_equal(f.predict_quantiles(rows), plain)
