"""Train/serve consistency: the matrix the server feeds the network for a series equals what the training path
builds for that series' latest week (Feast point-in-time join through the same feature service, then
``Forecaster.inputs``): same values, same column order, same scaling.

The serving side is the server's own code path in-process: ``SalesModel.load`` then ``preprocess``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from sales_forecast.config import Settings
from sales_forecast.contract import FEATURE_SERVICE, FEATURE_TABLE, MODEL_NAME
from sales_forecast.features.derive import MODEL_FEATURES, REQUIRED_FEATURES
from sales_forecast.features.store import open_store
from sales_forecast.forecaster import Forecaster, design_matrix
from sales_forecast.serving.kserve_import import hidden_argv
from sales_forecast.serving.model_source import ModelSource


@pytest.fixture(scope="module")
def all_series(settings: Settings) -> pd.DataFrame:
    """Every series with the timestamp of its latest week, in a shuffled order (the request order)."""
    query = f'SELECT store, dept, max(event_timestamp) AS event_timestamp FROM "{FEATURE_TABLE}" GROUP BY store, dept'
    with psycopg.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(query)
        series = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])
    return series.sample(frac=1.0, random_state=3).reset_index(drop=True)


@pytest.fixture(scope="module")
def training_rows(settings: Settings, all_series: pd.DataFrame) -> pd.DataFrame:
    """The training path: get_historical_features through the feature service, as of each series' latest week."""
    store = open_store(settings)
    entity_df = all_series[["store", "dept", "event_timestamp"]].copy()
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    joined = store.get_historical_features(entity_df=entity_df,
                                           features=store.get_feature_service(FEATURE_SERVICE)).to_df()
    joined = joined.set_index(["store", "dept"]).loc[pd.MultiIndex.from_frame(all_series[["store", "dept"]])]
    joined = joined.reset_index()
    assert joined[REQUIRED_FEATURES].notna().all().all()
    return joined


@pytest.fixture(scope="module")
def sales_model(settings: Settings, bundle: Path):
    with hidden_argv():
        serving_model = importlib.import_module("sales_forecast.serving.model")
    model = serving_model.SalesModel(MODEL_NAME, settings, ModelSource(model_dir=bundle))
    assert model.load() and model.ready
    return model


def served_rows(sales_model, all_series: pd.DataFrame) -> dict[str, np.ndarray]:
    """The feature columns the server hands the Forecaster ({feature: float64 array}, in request order)."""
    instances = [{"store": int(s), "dept": int(d)} for s, d in zip(all_series["store"], all_series["dept"],
                                                                    strict=True)]
    payload = asyncio.run(sales_model.preprocess({"instances": instances}))
    return payload.rows


def test_server_feeds_the_network_the_training_matrix(sales_model, all_series: pd.DataFrame,
                                                      training_rows: pd.DataFrame, bundle: Path) -> None:
    served = served_rows(sales_model, all_series)
    assert all(served[name].dtype == np.float64 for name in MODEL_FEATURES)
    served_values = np.column_stack([served[name] for name in MODEL_FEATURES])
    assert len(served_values) == len(all_series) == 12 * 13
    # the raw feature values, row by row in request order
    np.testing.assert_array_equal(served_values, training_rows[MODEL_FEATURES].to_numpy())
    # the unscaled design matrix and the scaled float32 matrix the network sees: bit for bit
    np.testing.assert_array_equal(design_matrix(served), design_matrix(training_rows))
    forecaster = Forecaster.load(bundle)
    served_matrix = sales_model.forecaster.inputs(served)
    training_matrix = forecaster.inputs(training_rows)
    assert served_matrix.dtype == np.float32 and served_matrix.shape == (len(all_series), forecaster.model.n_inputs)
    np.testing.assert_array_equal(served_matrix, training_matrix)
    pre = forecaster.preprocessing
    scaled = np.clip((pre.clip(design_matrix(training_rows)) - pre.mean) / pre.scale, -8, 8)
    np.testing.assert_allclose(served_matrix[:, :len(pre.mean)], np.nan_to_num(scaled).astype(np.float32),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sales_model.forecaster.prepare(served).store, forecaster.prepare(training_rows).store)


def test_server_predictions_equal_the_training_path(sales_model, all_series: pd.DataFrame,
                                                    training_rows: pd.DataFrame, bundle: Path) -> None:
    instances = {"instances": [{"store": int(s), "dept": int(d)}
                               for s, d in zip(all_series["store"], all_series["dept"], strict=True)]}
    payload = asyncio.run(sales_model.preprocess(instances))
    served = sales_model.predict(payload)["predictions"]
    np.testing.assert_array_equal(served, Forecaster.load(bundle).predict(training_rows))


@contextlib.contextmanager
def null_online_value(settings: Settings, lookup, key: tuple[int, int], feature: str) -> Iterator[None]:
    """One online value replaced by an empty ValueProto (a NULL feature), restored afterwards."""
    from feast.protos.feast.types.Value_pb2 import Value

    read = lookup.reads(MODEL_FEATURES)[0]
    entity_key = read.serialized_keys({"store": [key[0]], "dept": [key[1]]},
                                      lookup.store.config.entity_key_serialization_version)[0]
    where = 'WHERE entity_key = %s AND feature_name = %s'
    table = f'"{lookup.store.config.project}_{read.view.name}"'
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        original = conn.execute(f"SELECT value FROM {table} {where}", (entity_key, feature)).fetchone()[0]
        conn.execute(f"UPDATE {table} SET value = %s {where}", (Value().SerializeToString(), entity_key, feature))
        try:
            yield
        finally:
            conn.execute(f"UPDATE {table} SET value = %s {where}", (original, entity_key, feature))


def test_lookup_equals_feasts_get_online_features(settings: Settings, sales_model, all_series: pd.DataFrame) -> None:
    """The server reads Feast's online table itself (one prepared statement, Feast's keys and values); Feast's own
    ``get_online_features`` through the feature service is the reference: same values (NULL -> NaN), request
    order, duplicates; an entity without a row is refused, never filled in."""
    from sales_forecast.serving.http_errors import UnknownEntities
    from sales_forecast.serving.instances import Instance

    lookup = sales_model.lookup
    store = lookup.store
    keys = [(int(s), int(d)) for s, d in zip(all_series["store"], all_series["dept"], strict=True)]
    keys += keys[:3]  # duplicates keep their places
    rows = {"store": [s for s, _ in keys], "dept": [d for _, d in keys]}
    with null_online_value(settings, lookup, keys[1], "sales_ya_next"):  # what Feast writes for a NULL feature
        reference = store.get_online_features(features=store.get_feature_service(FEATURE_SERVICE),
                                              entity_rows=rows).to_dict()
        got = lookup.rows([Instance(s, d) for s, d in keys])
    for name in MODEL_FEATURES:
        want = np.array([np.nan if v is None else v for v in reference[name]], dtype="float64")
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    np.testing.assert_array_equal(got["store"], rows["store"])
    assert np.isnan(got["sales_ya_next"][1]) and reference["sales_ya_next"][1] is None
    with pytest.raises(UnknownEntities) as raised:
        lookup.rows([Instance(*keys[0]), Instance(99, 3)])
    assert [m["index"] for m in raised.value.details["missing"]] == [1]
