"""The Forecaster's inference path (what the server runs per request): its direct torch calls give exactly what the
network module gives, for every architecture the project builds, and follow the weights as training changes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sales_forecast.features.derive import EXOGENOUS_FEATURES, MODEL_FEATURES, OPTIONAL_FEATURES
from sales_forecast.forecaster import DESIGN, EVENTS, Architecture, Forecaster, SalesForecastModel, design_matrix


def feature_rows(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feature rows: sales-like lags and levels, 0/1 events, some optional features NULL, ids 1-5 / 1-9."""
    rng = np.random.default_rng(seed)
    rows = {name: rng.normal(size=count) for name in MODEL_FEATURES}
    for name in ("sales_lag_1", "sales_lag_2", "sales_lag_3", "sales_lag_4", "sales_mean_4", "sales_mean_8",
                 "sales_mean_13", "sales_mean_26", "sales_ya_next", "sales_ya_this", "sales_ya_next2",
                 "sales_ya_mean_4"):
        rows[name] = rng.lognormal(8, 1.5, size=count)
    rows["sales_std_4"] = rng.lognormal(6, 1, size=count)
    for name in EVENTS:
        rows[name] = (rng.random(count) < 0.2).astype("float64")
    for name in EXOGENOUS_FEATURES:
        rows[name] = rng.normal(50, 10, size=count)
    for name in OPTIONAL_FEATURES:
        rows[name][rng.random(count) < 0.3] = np.nan
    rows["store"], rows["dept"] = rng.integers(1, 6, size=count), rng.integers(1, 10, size=count)
    return rows


def forecaster(hidden: tuple[int, ...], dropout: float, quantiles: tuple[float, ...], seed: int = 0,
               widths: tuple[int, int] = (3, 4)) -> Forecaster:
    torch.manual_seed(seed)
    arch = Architecture(0, 0, 0, hidden, dropout, quantiles, store_dim=widths[0], dept_dim=widths[1])
    f = Forecaster.build(feature_rows(500, seed=seed + 1), arch)
    with torch.no_grad():  # the uplift table starts at zero: give it values, so the test covers it
        f.model.uplift.weight.normal_(0, 0.3)
    return f


def module_outputs(f: Forecaster, rows) -> np.ndarray:
    """The reference: the network module's own forward in eval mode, turned into sales as predict_quantiles does."""
    prepared = f.prepare(rows)
    f.model.eval()
    with torch.no_grad():
        relative = f.model(*prepared.tensors()).numpy().astype("float64")
    return prepared.level[:, None] * (1.0 + relative)


@pytest.mark.parametrize(("hidden", "dropout", "quantiles"), [
    ((32, 16), 0.0, (0.5,)), ((64, 32), 0.1, (0.1, 0.5, 0.9)), ((128, 64, 32), 0.2, (0.05, 0.5, 0.95)),
    ((8,), 0.0, (0.5,)),
])
@pytest.mark.parametrize("count", [1, 2, 7, 1000])
@pytest.mark.parametrize("widths", [(3, 4), (0, 0), (0, 2)])  # (0, 0), the default: no embedding lookups at all
def test_direct_calls_equal_the_module_bit_for_bit(hidden, dropout, quantiles, count: int, widths) -> None:
    f = forecaster(hidden, dropout, quantiles, widths=widths)
    rows = feature_rows(count, seed=count)
    f.model.train()  # predict switches to eval (dropout off) as before
    got = f.predict_quantiles(rows)
    assert f._steps is not None and not f.model.training and f._steps.bare == (widths == (0, 0))
    np.testing.assert_array_equal(got, module_outputs(f, rows))
    assert got.shape == (count, len(quantiles))
    np.testing.assert_array_equal(f.predict(rows), got[:, quantiles.index(0.5)])


def test_the_direct_path_follows_training_and_loading() -> None:
    f = forecaster((32, 16), 0.0, (0.1, 0.5, 0.9))
    rows = feature_rows(5)
    before = f.predict_quantiles(rows)
    optimizer = torch.optim.SGD(f.model.parameters(), lr=0.1)  # in-place updates of the same parameters
    f.model.train()
    loss = f.model(*f.prepare(rows).tensors()).pow(2).mean()
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
        def forward(self, *inputs):
            return super().forward(*inputs) * 2

    f = forecaster((16,), 0.0, (0.5,))
    scaled = Scaled(f.model.arch)
    scaled.load_state_dict(f.model.state_dict())
    plain = f.predict_quantiles(feature_rows(3))
    f.model = scaled
    rows = feature_rows(3)
    np.testing.assert_array_equal(f.predict_quantiles(rows), module_outputs(f, rows))
    assert f._steps is None and not np.array_equal(f.predict_quantiles(rows), plain)


def test_quantiles_never_cross() -> None:
    f = forecaster((16,), 0.0, (0.1, 0.5, 0.9))
    with torch.no_grad():
        f.model.net[-1].bias.copy_(torch.tensor([5.0, 0.0, -5.0]))  # raw outputs that would cross
    q = f.predict_quantiles(feature_rows(200, seed=3))
    assert (q[:, 0] <= q[:, 1]).all() and (q[:, 1] <= q[:, 2]).all()


def test_unknown_ids_get_the_reserved_index_and_a_forecast() -> None:
    f = forecaster((16,), 0.0, (0.1, 0.5, 0.9))
    rows = feature_rows(4, seed=5)
    rows["store"] = np.array([1, 5, 99, -3])  # training saw stores 1-5
    rows["dept"] = np.array([9, 0, 2, 1000])  # and departments 1-9
    prepared = f.prepare(rows)
    np.testing.assert_array_equal(prepared.store, [1, 5, 0, 0])
    np.testing.assert_array_equal(prepared.dept, [9, 0, 2, 0])
    assert np.isfinite(f.predict_quantiles(rows)).all()


def test_missing_optional_features_are_flagged_and_unseen_ones_stay_missing() -> None:
    train = feature_rows(300, seed=1)
    train["sales_ya_mean_4"][:] = np.nan  # training never had last year's level
    f = Forecaster.build(train, Architecture(0, 0, 0))
    rows = feature_rows(50, seed=2)
    rows["sales_ya_next"][:25] = np.nan
    clipped = f.preprocessing.clip(design_matrix(rows))
    assert np.isnan(clipped[:, DESIGN.index("ya_level_ratio")]).all()  # never seen: missing, whatever it is now
    x = f.inputs(rows)
    assert np.isfinite(x).all() and x.shape[1] == f.preprocessing.width > len(DESIGN)
    flags = x[:, len(DESIGN):]
    assert flags.max() == 1.0 and set(np.unique(flags)) <= {0.0, 1.0}


@pytest.mark.parametrize("quantiles", [(0.5,), (0.1, 0.5), (0.5, 0.9), (0.1, 0.5, 0.9), (0.05, 0.25, 0.5, 0.75, 0.95)])
def test_outputs_sum_the_spreads_outwards(quantiles: tuple[float, ...]) -> None:
    """The reference formula, cumulative sums of a single column included, bit for bit."""
    from torch.nn import functional

    model = SalesForecastModel(Architecture(5, 3, 4, (8,), 0.0, quantiles))
    raw, dept, events = torch.randn(9, len(quantiles)), torch.randint(0, 5, (9,)), torch.rand(9, len(EVENTS))
    p = quantiles.index(0.5)
    mid = raw[:, p:p + 1]
    want = torch.cat([mid - functional.softplus(raw[:, :p]).flip(1).cumsum(1).flip(1), mid,
                      mid + functional.softplus(raw[:, p + 1:]).cumsum(1)], dim=1)
    with torch.no_grad():
        model.uplift.weight.normal_(0, 0.3)
        scale = 1.0 + (model.uplift(dept) * events).sum(dim=1, keepdim=True)
        assert torch.equal(model.outputs(raw, dept, events), (1.0 + want) * scale - 1.0)


def test_many_rows_are_prepared_in_parts_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training sets are prepared PREPARE_ROWS rows at a time (bounded temporaries): the same arrays as in one go,
    from a DataFrame and from column arrays, for the design matrix too."""
    import pandas as pd

    from sales_forecast import forecaster as module

    f = forecaster((16,), 0.0, (0.1, 0.5, 0.9))
    rows = feature_rows(1001, seed=5)
    rows["store"][::97] = 77  # unseen ids
    whole, whole_design = f.prepare(rows), design_matrix(rows)
    monkeypatch.setattr(module, "PREPARE_ROWS", 64)
    for columns in (rows, pd.DataFrame(rows)):
        parts = f.prepare(columns)
        for got, expected in zip(parts.arrays(), whole.arrays(), strict=True):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(design_matrix(columns), whole_design)
