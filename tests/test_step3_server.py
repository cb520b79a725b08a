"""The model server as a real process on loopback, queried over HTTP: answers, bad input, missing features, limits
(instances and body size), the model's metadata and version, and a PostgreSQL outage (really stopped and
restarted) that it must survive without a restart.

The server serves a small Forecaster fitted on the step-1 test data (``small_features``); expected predictions
come from the same bundle applied to the offline feature table's latest rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd
import psycopg
import pytest
import yaml
from feast.infra.utils.postgres.postgres_config import ConnectionType

from benchmarks.bench_serving import report
from benchmarks.load import measure_throughput, server_cpu_seconds
from sales_forecast.config import Settings
from sales_forecast.contract import MODEL_NAME
from sales_forecast.features.derive import MODEL_FEATURES
from sales_forecast.features.store import online_table, open_store
from sales_forecast.forecaster import Forecaster
from sales_forecast.serving.client import SAMPLE_REQUEST, time_requests
from sales_forecast.serving.online_features import OnlineFeatureLookup
from sales_forecast.stack import model_server, postgres
from sales_forecast.stack.processes import free_port

SERVER = "test-serving"
PREDICT = f"/v1/models/{MODEL_NAME}:predict"
INFER = f"/v2/models/{MODEL_NAME}/infer"


@pytest.fixture(scope="module")
def server(settings: Settings, bundle: Path) -> Iterator[str]:
    url = model_server.start(settings, free_port(), model_dir=bundle, name=SERVER)
    yield url
    model_server.stop(settings.stack_dir, SERVER)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as client:
        yield client


def expected(bundle: Path, latest_rows: pd.DataFrame, instances: list[dict]) -> np.ndarray:
    keys = [(i["store"], i["dept"]) for i in instances]
    return Forecaster.load(bundle).predict(latest_rows.loc[keys])


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]


def test_routes_and_readiness(http: httpx.Client) -> None:
    assert http.get("/").json() == {"status": "alive"}
    assert http.get(f"/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v1/models").json() == {"models": [MODEL_NAME]}


def test_v1_predictions_in_request_order(http: httpx.Client, bundle: Path, latest_rows: pd.DataFrame) -> None:
    response = http.post(PREDICT, json=SAMPLE_REQUEST)
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["predictions"]
    assert response.headers["x-model-version"] == bundle.name  # a bare bundle's version: its folder's name
    predictions = response.json()["predictions"]
    want = expected(bundle, latest_rows, SAMPLE_REQUEST["instances"])
    np.testing.assert_allclose(predictions, want, rtol=1e-6)
    assert all(p > 0 for p in predictions)

    instances = [{"store": 11, "dept": 2}, {"store": 1, "dept": 12}, {"store": 5, "dept": 12}, {"store": 1, "dept": 3},
                 {"store": 11, "dept": 2}]
    reordered = http.post(PREDICT, json={"instances": instances}).json()["predictions"]
    np.testing.assert_allclose(reordered, expected(bundle, latest_rows, instances), rtol=1e-6)
    np.testing.assert_allclose(reordered[2:4], predictions[::-1], rtol=1e-6)
    assert reordered[0] == pytest.approx(reordered[4], rel=1e-6)
    assert reordered[0] != pytest.approx(reordered[1], rel=1e-3)  # (11, 2) and (1, 12) are distinct series


def test_v2_infer_returns_an_infer_response(http: httpx.Client, bundle: Path, latest_rows: pd.DataFrame) -> None:
    body = {"id": "req-1", "inputs": [
        {"name": "store", "shape": [2], "datatype": "INT64", "data": [1, 5]},
        {"name": "dept", "shape": [2], "datatype": "INT64", "data": [3, 12]},
    ]}
    response = http.post(INFER, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == MODEL_NAME and answer["id"] == "req-1"
    assert answer["model_version"] == response.headers["x-model-version"] == bundle.name
    (output,) = answer["outputs"]  # a single-quantile model: the P50, named predictions
    assert output["name"] == "predictions" and output["shape"] == [2] and output["datatype"] == "FP64"
    np.testing.assert_allclose(output["data"], expected(bundle, latest_rows, SAMPLE_REQUEST["instances"]), rtol=1e-6)

    no_id = http.post(INFER, json={"inputs": body["inputs"]})
    assert no_id.status_code == 200 and no_id.json()["id"]
    bad = http.post(INFER, json={"inputs": [{"name": "store", "shape": [1], "datatype": "FP32", "data": [1.0]},
                                            {"name": "dept", "shape": [1], "datatype": "INT64", "data": [3]}]})
    assert bad.status_code == 400 and 'input "store" must have an integer datatype' in error_of(bad)
    malformed = http.post(INFER, json={"inputs": 3})
    assert malformed.status_code == 400 and "invalid request" in error_of(malformed)
    # JSON without a Content-Type header (Triton's HTTP client sends none)
    bare = http.post(INFER, content=orjson.dumps(body), headers={"content-type": ""})
    assert bare.status_code == 200, bare.text
    not_json = http.post(INFER, content=b'{"inputs": [', headers={"content-type": ""})
    assert not_json.status_code == 400 and "invalid request" in error_of(not_json)


def test_v2_metadata_declares_inputs_outputs_and_version(http: httpx.Client, bundle: Path) -> None:
    metadata = http.get(f"/v2/models/{MODEL_NAME}").json()
    assert metadata == {"name": MODEL_NAME, "versions": [bundle.name], "platform": "pytorch",
                        "inputs": [{"name": "store", "datatype": "INT64", "shape": [-1]},
                                   {"name": "dept", "datatype": "INT64", "shape": [-1]}],
                        "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [-1]}]}


def test_v1_quantiles_switch_of_a_single_quantile_model(http: httpx.Client) -> None:
    asked = http.post(PREDICT, json={**SAMPLE_REQUEST, "parameters": {"quantiles": True}})
    assert asked.status_code == 200, asked.text
    assert asked.json()["quantiles"] == {"p50": asked.json()["predictions"]}  # no interval: only the median


@pytest.mark.parametrize(("parameters", "message"), [
    ([1], '"parameters" must be an object like {"quantiles": true}'),
    ({"quantiles": "yes"}, "parameters.quantiles must be true or false, got str"),
    ({"quantiles": 1}, "parameters.quantiles must be true or false, got int"),
    ({"quantile": True}, 'unknown parameter "quantile"'),
])
def test_bad_parameters_are_400(http: httpx.Client, parameters, message: str) -> None:
    response = http.post(PREDICT, json={**SAMPLE_REQUEST, "parameters": parameters})
    assert response.status_code == 400, response.text
    assert message in error_of(response)


@pytest.mark.parametrize(("content", "headers", "message"), [
    (b"{not json", {"content-type": "application/json"}, "Unrecognized request format"),
    (b"store=1&dept=3", {"content-type": "text/plain"}, "not JSON"),
    (b'[{"store": 1, "dept": 3}]', {"content-type": "application/json"}, '"instances" list'),
    (b'{"inputs": [{"store": 1, "dept": 3}]}', {"content-type": "application/json"}, '"instances" list'),
    (b'{"instances": []}', {"content-type": "application/json"}, '"instances" is empty'),
    (b'{"instances": [{"store": 1, "dept": 3}, {"store": 2}]}', {}, "instances[1].dept is missing"),
    (b'{"instances": [{"dept": 3}]}', {}, "instances[0].store is missing"),
    (b'{"instances": [{"store": "1", "dept": 3}]}', {}, "instances[0].store must be an integer, got str"),
    (b'{"instances": [{"store": true, "dept": 3}]}', {}, "instances[0].store must be an integer, got bool"),
    (b'{"instances": [{"store": 1, "dept": 3.5}]}', {}, "instances[0].dept must be an integer, got float"),
    (b'{"instances": [{"store": 1, "dept": 3}, {"store": 1, "dept": -3}]}', {}, "instances[1].dept must not be "
                                                                                "negative"),
    (b'{"instances": [{"store": 1, "dept": 9223372036854775808}]}', {}, "instances[0].dept must be at most "
                                                                        "9223372036854775807"),
], ids=["not-json", "not-json-text", "list-body", "no-instances", "empty", "missing-dept", "missing-store",
        "string-id", "bool-id", "float-id", "negative-id", "dept-too-big"])
def test_bad_input_is_400_naming_the_problem(http: httpx.Client, content: bytes, headers: dict, message: str) -> None:
    response = http.post(PREDICT, content=content, headers=headers or {"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in error_of(response)


def test_unknown_series_is_404_listing_them(http: httpx.Client) -> None:
    instances = [{"store": 1, "dept": 3}, {"store": 99, "dept": 3}, {"store": 1, "dept": 77}]
    response = http.post(PREDICT, json={"instances": instances})
    assert response.status_code == 404, response.text
    body = response.json()
    assert "predictions" not in body
    assert "store 99 dept 3" in body["error"] and "store 1 dept 77" in body["error"] and "2 of 3" in body["error"]
    assert body["missing"] == [{"store": 99, "dept": 3, "index": 1, "reason": "no online features"},
                               {"store": 1, "dept": 77, "index": 2, "reason": "no online features"}]


def test_features_older_than_the_ttl_are_404(http: httpx.Client, settings: Settings,
                                             latest_rows: pd.DataFrame) -> None:
    """A series whose online row is older than the feature view's ttl gets no prediction."""
    stale = latest_rows.loc[[(1, 3)]].reset_index(drop=True)
    stale["store"], stale["dept"] = 12, 1003  # a dept above 999: no cap now that the keys are separate
    stale["event_timestamp"] = pd.Timestamp.now(tz="UTC").floor("D") - pd.Timedelta(days=21)
    store = open_store(settings)
    store.write_to_online_store("sales_features", stale[["store", "dept", "event_timestamp", *MODEL_FEATURES]])
    try:
        response = http.post(PREDICT, json={"instances": [{"store": 12, "dept": 1003}, {"store": 1, "dept": 3}]})
        assert response.status_code == 404, response.text
        assert "store 12 dept 1003" in error_of(response) and "ttl" in error_of(response)
        assert response.json()["missing"] == [{"store": 12, "dept": 1003, "index": 0, "reason": "older than the ttl"}]
    finally:
        with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
            conn.execute(f'DELETE FROM "{online_table()}" WHERE event_ts < %s',
                         (dt.datetime.now(dt.UTC) - dt.timedelta(days=14),))


def test_request_size_limit_is_413(http: httpx.Client, latest_rows: pd.DataFrame) -> None:
    series = [{"store": int(r.store), "dept": int(r.dept)} for r in latest_rows.itertuples()]
    thousand = [series[i % len(series)] for i in range(1000)]
    ok = http.post(PREDICT, json={"instances": thousand})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["predictions"]) == 1000
    too_many = http.post(PREDICT, json={"instances": [*thousand, series[0]]})
    assert too_many.status_code == 413, too_many.text
    assert "1001 instances" in error_of(too_many) and too_many.json()["max_instances"] == 1000


def test_body_size_limit_is_413_before_parsing(http: httpx.Client, server: str) -> None:
    """Bodies over SERVING_MAX_BODY_BYTES (1 MiB by default) are refused from Content-Length, or while a chunked
    body streams in; neither is parsed (the same bytes under the limit are a 400: not JSON)."""
    limit = 1 << 20
    for path in (PREDICT, INFER):
        too_big = http.post(path, content=b"x" * (limit + 1), headers={"content-type": "application/json"})
        assert too_big.status_code == 413, too_big.text
        assert too_big.json() == {"error": f"the request body is {limit + 1} bytes; the maximum is {limit} bytes "
                                           "(set SERVING_MAX_BODY_BYTES to change it)", "max_body_bytes": limit}
    assert http.post(PREDICT, content=b"x" * limit, headers={"content-type": "application/json"}).status_code == 400
    padded = orjson.dumps(SAMPLE_REQUEST)
    exactly = padded + b" " * (limit - len(padded))
    assert http.post(PREDICT, content=exactly, headers={"content-type": "application/json"}).status_code == 200

    def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
        for start in range(0, total, size):
            yield b"y" * min(size, total - start)

    with httpx.Client(base_url=server, timeout=60.0) as chunked:  # a refused request's connection is closed
        streamed = chunked.post(PREDICT, content=chunks(4 * limit), headers={"content-type": "application/json"})
        assert streamed.status_code == 413, streamed.text
        assert "over 1048576 bytes (chunked)" in error_of(streamed)
        small = chunked.post(PREDICT, content=iter([padded[:10], padded[10:]]),
                             headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text


def test_metrics_endpoint(http: httpx.Client, bundle: Path) -> None:
    http.post(PREDICT, json=SAMPLE_REQUEST)
    text = http.get("/metrics").text
    assert f'request_predict_seconds_count{{model_name="{MODEL_NAME}"}}' in text
    assert "sales_feature_lookup_seconds_bucket" in text
    assert 'sales_error_responses_total{status="400"}' in text
    assert 'sales_error_responses_total{status="404"}' in text
    assert 'sales_error_responses_total{status="413"}' in text
    assert f'sales_served_model_info{{source="{bundle}",version="{bundle.name}"}} 1.0' in text
    assert "sales_model_loaded_timestamp_seconds " in text and "sales_model_reload_failures_total 0.0" in text


def test_latency_and_throughput_helpers(http: httpx.Client, server: str) -> None:
    """What 03_inference.py and the benchmark measure with."""
    cpu = server_cpu_seconds(http)
    sequential = time_requests(http, SAMPLE_REQUEST, 20)
    assert sequential.count == 20 and 0 < sequential.p50 <= sequential.p99 <= sequential.max
    load = measure_throughput(server, SAMPLE_REQUEST, clients=2, requests_per_client=10)
    assert load.requests == 20 and load.per_second > 0
    assert server_cpu_seconds(http) > cpu
    assert report(sequential, sequential, load, 0.001).row_count == 3


def test_postgres_outage_is_503_and_heals_without_restart(http: httpx.Client, settings: Settings, bundle: Path,
                                                          latest_rows: pd.DataFrame) -> None:
    """Stop the real PostgreSQL under the running server, then start it again on the same port."""
    pgdata = settings.stack_dir / "postgres"
    want = expected(bundle, latest_rows, SAMPLE_REQUEST["instances"])
    assert http.post(PREDICT, json=SAMPLE_REQUEST).status_code == 200
    assert postgres.stop(pgdata)
    try:
        for _ in range(12):  # more failed reads than a connection pool holds
            started = time.monotonic()
            response = http.post(PREDICT, json=SAMPLE_REQUEST)
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < 10
        message = error_of(response)
        assert "online feature store" in message and "PostgreSQL" in message and "unavailable" in message
    finally:
        postgres.start(settings.postgres, pgdata)
    healed = http.post(PREDICT, json=SAMPLE_REQUEST)
    assert healed.status_code == 200, healed.text
    np.testing.assert_allclose(healed.json()["predictions"], want, rtol=1e-6)

    # Restarted while the server was idle: its cached connection is dead; the next request reconnects at once.
    assert postgres.stop(pgdata)
    postgres.start(settings.postgres, pgdata)
    after_idle_restart = http.post(PREDICT, json=SAMPLE_REQUEST)
    assert after_idle_restart.status_code == 200, after_idle_restart.text
    np.testing.assert_allclose(after_idle_restart.json()["predictions"], want, rtol=1e-6)
    metrics = http.get("/metrics").text
    assert 'sales_error_responses_total{status="503"} 12.0' in metrics
    assert "sales_feature_store_reconnects_total 2.0" in metrics  # the outage, then the idle restart


def test_server_reads_with_one_connection_even_if_the_repo_says_pool(settings: Settings, tmp_path: Path) -> None:
    """Pool mode would make every read during an outage wait 30 s for a connection; the server never uses it."""
    repo = tmp_path / "feature_repo"
    shutil.copytree(settings.feast_repo_path, repo)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"].update(conn_type="pool", max_conn=2)
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    lookup = OnlineFeatureLookup.open(dataclasses.replace(settings, feast_repo_path=repo), MODEL_FEATURES)
    assert lookup.store.config.online_store.conn_type == ConnectionType.singleton
    assert lookup.store.config.online_store.max_conn == 2  # the rest of the yaml is kept
