"""The Open Inference Protocol (v2) answers of a quantile model, checked with an independent client: Triton's
``tritonclient.http`` (not kserve's own), against the real server over HTTP: model metadata (inputs, outputs
derived from the model's quantiles, version), inference with and without an ``outputs`` selection, in JSON and in
the binary tensor extension, and errors. Also the v1 quantile switch of the same model.

The server serves a 3-quantile quick model (P10, P50, P90) fitted on the step-1 test data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from sales_forecast.config import Settings
from sales_forecast.contract import MODEL_NAME
from sales_forecast.forecaster import Forecaster
from sales_forecast.stack import model_server
from sales_forecast.stack.processes import free_port
from tests.support.quick_model import fit_quick_forecaster, labelled_rows

SERVER = "test-serving-v2"
LEVELS = (0.1, 0.5, 0.9)
STORES, DEPTS = [1, 5, 11], [3, 12, 2]


@pytest.fixture(scope="module")
def quantile_bundle(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("quantile-bundle")
    fit_quick_forecaster(labelled_rows(settings), epochs=40, seed=3, quantiles=LEVELS).save(directory)
    return directory


@pytest.fixture(scope="module")
def server(settings: Settings, quantile_bundle: Path) -> Iterator[str]:
    url = model_server.start(settings, free_port(), model_dir=quantile_bundle, name=SERVER,
                             extra_env={"SERVING_RELOAD_SECONDS": "0"})
    yield url
    model_server.stop(settings.stack_dir, SERVER)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.removeprefix("http://"), connection_timeout=30,
                                          network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(quantile_bundle: Path, latest_rows: pd.DataFrame) -> np.ndarray:
    """(3 instances, 3 levels) as the bundle forecasts them from the offline table's latest rows."""
    return Forecaster.load(quantile_bundle).predict_quantiles(latest_rows.loc[list(zip(STORES, DEPTS, strict=True))])


def inputs(stores=STORES, depts=DEPTS, binary: bool = False, datatype: str = "INT64") -> list[triton.InferInput]:
    made = []
    for name, values in (("store", stores), ("dept", depts)):
        item = triton.InferInput(name, [len(values)], datatype)
        item.set_data_from_numpy(np.asarray(values, dtype=triton_dtype(datatype)), binary_data=binary)
        made.append(item)
    return made


def triton_dtype(datatype: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)


def test_server_and_model_are_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)


def test_metadata_declares_inputs_and_every_output(client: triton.InferenceServerClient,
                                                   quantile_bundle: Path) -> None:
    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata["name"] == MODEL_NAME
    assert metadata["versions"] == [quantile_bundle.name]  # a bare bundle's version is its folder's name
    assert metadata["inputs"] == [{"name": "store", "datatype": "INT64", "shape": [-1]},
                                  {"name": "dept", "datatype": "INT64", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "predictions", "datatype": "FP64", "shape": [-1]},
                                   {"name": "p10", "datatype": "FP64", "shape": [-1]},
                                   {"name": "p90", "datatype": "FP64", "shape": [-1]}]


def test_infer_returns_every_output_by_default(client: triton.InferenceServerClient, expected: np.ndarray,
                                               quantile_bundle: Path) -> None:
    result = client.infer(MODEL_NAME, inputs(), request_id="q-1")
    response = result.get_response()
    assert response["id"] == "q-1" and response["model_name"] == MODEL_NAME
    assert response["model_version"] == quantile_bundle.name
    assert [output["name"] for output in response["outputs"]] == ["predictions", "p10", "p90"]
    np.testing.assert_allclose(result.as_numpy("predictions"), expected[:, 1], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("p10"), expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("p90"), expected[:, 2], rtol=1e-6)
    assert result.as_numpy("p10").dtype == np.float64 and result.as_numpy("p10").shape == (3,)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary-tensors"])
def test_infer_honours_the_outputs_selection(client: triton.InferenceServerClient, expected: np.ndarray,
                                             binary: bool) -> None:
    outputs = [triton.InferRequestedOutput("p90", binary_data=binary),
               triton.InferRequestedOutput("p10", binary_data=binary)]
    result = client.infer(MODEL_NAME, inputs(binary=binary), outputs=outputs)
    assert [output["name"] for output in result.get_response()["outputs"]] == ["p90", "p10"]
    assert result.as_numpy("predictions") is None
    np.testing.assert_allclose(result.as_numpy("p90"), expected[:, 2], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("p10"), expected[:, 0], rtol=1e-6)
    assert (result.as_numpy("p10") <= result.as_numpy("p90")).all()


def test_other_integer_input_types_are_accepted(client: triton.InferenceServerClient, expected: np.ndarray) -> None:
    result = client.infer(MODEL_NAME, inputs(datatype="INT32"), outputs=[triton.InferRequestedOutput("predictions")])
    np.testing.assert_allclose(result.as_numpy("predictions"), expected[:, 1], rtol=1e-6)


@pytest.mark.parametrize(("request_inputs", "outputs", "status", "message"), [
    (lambda: inputs(), ["p95"], "400", "unknown output 'p95'; this model's outputs are predictions, p10, p90"),
    (lambda: inputs()[:1], None, "400", 'the request needs an input named "dept"'),
    (lambda: inputs(stores=[1, 5], depts=[3]), None, "400", 'inputs "store" and "dept" differ in length'),
    (lambda: inputs(stores=[1, -5, 2]), None, "400", 'input "store" data[1] must not be negative'),
    (lambda: inputs(stores=[99, 1, 5], depts=[3, 3, 12]), None, "404", "no current online features for 1 of 3"),
    (lambda: inputs(stores=[1] * 1001, depts=[3] * 1001), None, "413", "1001 instances in one request"),
], ids=["unknown-output", "missing-input", "length-mismatch", "negative-id", "unknown-series", "too-many"])
def test_errors_reach_the_client_with_status_and_message(client: triton.InferenceServerClient, request_inputs,
                                                          outputs, status: str, message: str) -> None:
    requested = [triton.InferRequestedOutput(name) for name in outputs] if outputs else None
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL_NAME, request_inputs(), outputs=requested)
    assert raised.value.status() == status
    assert message in raised.value.message()


def test_unknown_model_is_404(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "404"


def test_v1_quantiles_switch(server: str, expected: np.ndarray) -> None:
    instances = [{"store": s, "dept": d} for s, d in zip(STORES, DEPTS, strict=True)]
    with httpx.Client(base_url=server, timeout=30) as http:
        plain = http.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": instances})
        asked = http.post(f"/v1/models/{MODEL_NAME}:predict",
                          json={"instances": instances, "parameters": {"quantiles": True}})
        off = http.post(f"/v1/models/{MODEL_NAME}:predict",
                        json={"instances": instances, "parameters": {"quantiles": False}})
    assert plain.status_code == asked.status_code == off.status_code == 200
    assert set(plain.json()) == set(off.json()) == {"predictions"}
    body = asked.json()
    assert set(body) == {"predictions", "quantiles"} and list(body["quantiles"]) == ["p10", "p50", "p90"]
    np.testing.assert_allclose(body["predictions"], expected[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(body["quantiles"]["p50"], body["predictions"])
    np.testing.assert_allclose(body["quantiles"]["p10"], expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(body["quantiles"]["p90"], expected[:, 2], rtol=1e-6)
