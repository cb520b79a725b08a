"""Request validation of the model server, without a server: each bad input names the field and index."""

from __future__ import annotations

import datetime as dt

import pytest

from sales_forecast.serving.http_errors import BadRequest, TooManyInstances
from sales_forecast.serving.instances import Instance, parse_v1, parse_v2


def test_v1_instances_keep_the_request_order() -> None:
    body = {"instances": [{"store": 5, "dept": 12}, {"store": 1, "dept": 3}, {"store": 5, "dept": 12}]}
    assert parse_v1(body, 10) == [Instance(5, 12), Instance(1, 3), Instance(5, 12)]
    assert [i.as_dict() for i in parse_v1(body, 10)][:2] == [{"store": 5, "dept": 12}, {"store": 1, "dept": 3}]


def test_ids_are_int64_with_no_dept_cap() -> None:
    """store and dept are separate INT64 join keys: no combined key, so no dept cap (1003 was refused before)."""
    big = 2**63 - 1
    body = {"instances": [{"store": 1, "dept": 1003}, {"store": big, "dept": big}]}
    assert parse_v1(body, 10) == [Instance(1, 1003), Instance(big, big)]
    assert parse_v1({"instances": [{"store": 1, "dept": 12}, {"store": 11, "dept": 2}]}, 10) == [
        Instance(1, 12), Instance(11, 2)]


def test_v1_accepts_raw_json_bytes() -> None:
    # kserve hands the raw body over when the content type is not JSON
    assert parse_v1(b'{"instances": [{"store": 1, "dept": 3}]}', 10) == [Instance(1, 3)]


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    ("{", "not JSON"),
    ([{"store": 1, "dept": 3}], '"instances" list'),
    ({"inputs": []}, '"instances" list'),
    ({"instances": {"store": 1, "dept": 3}}, '"instances" list'),
    ({"instances": []}, "empty"),
    ({"instances": [7]}, "instances[0] must be an object"),
    ({"instances": [{"store": 1, "dept": 3}, {"dept": 3}]}, "instances[1].store is missing"),
    ({"instances": [{"store": 1}]}, "instances[0].dept is missing"),
    ({"instances": [{"store": "1", "dept": 3}]}, "instances[0].store must be an integer, got str"),
    ({"instances": [{"store": True, "dept": 3}]}, "instances[0].store must be an integer, got bool"),
    ({"instances": [{"store": 1, "dept": 3.0}]}, "instances[0].dept must be an integer, got float"),
    ({"instances": [{"store": 1, "dept": 2.5}]}, "instances[0].dept must be an integer"),
    ({"instances": [{"store": 1, "dept": None}]}, "instances[0].dept must be an integer, got NoneType"),
    ({"instances": [{"store": 1, "dept": 3}, {"store": -2, "dept": 3}]}, "instances[1].store must not be negative"),
    ({"instances": [{"store": 1, "dept": 2**63}]}, "instances[0].dept must be at most 9223372036854775807"),
    ({"instances": [{"store": 2**63, "dept": 1}]}, "instances[0].store must be at most"),
])
def test_v1_rejects_bad_input_naming_field_and_index(body, message: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_v1(body, 10)
    assert message in raised.value.message
    assert raised.value.status == 400


def test_v1_limit_is_413() -> None:
    body = {"instances": [{"store": 1, "dept": 3}] * 11}
    assert len(parse_v1(body, 11)) == 11
    with pytest.raises(TooManyInstances) as raised:
        parse_v1(body, 10)
    assert raised.value.status == 413
    assert "11 instances" in raised.value.message and "maximum is 10" in raised.value.message


def test_v2_columns() -> None:
    columns = {"store": ("INT64", [1, 5]), "dept": ("INT32", [3, 12])}
    assert parse_v2(columns, 10) == [Instance(1, 3), Instance(5, 12)]


@pytest.mark.parametrize(("columns", "message"), [
    ({"store": ("INT64", [1])}, 'input named "dept"'),
    ({"store": ("FP32", [1.0]), "dept": ("INT64", [3])}, 'input "store" must have an integer datatype'),
    ({"store": ("INT64", [1, 2]), "dept": ("INT64", [3])}, "differ in length"),
    ({"store": ("INT64", [1, -5]), "dept": ("INT64", [3, 3])}, 'input "store" data[1] must not be negative'),
    ({"store": ("INT64", [1]), "dept": ("INT64", [2.5])}, 'input "dept" data[0] must be an integer'),
    ({"store": ("INT64", []), "dept": ("INT64", [])}, "empty"),
])
def test_v2_rejects_bad_input(columns, message: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_v2(columns, 10)
    assert message in raised.value.message


def test_only_missing_required_features_make_a_series_unknown() -> None:
    """A series without a year of history has NULL year-ago features: it is served. A series without its lags (no
    online row) is a 404 (UnknownEntities)."""
    import numpy as np

    from sales_forecast.features.derive import MODEL_FEATURES, OPTIONAL_FEATURES
    from sales_forecast.serving.http_errors import UnknownEntities
    from sales_forecast.serving.online_features import OnlineFeatureLookup

    instances = [Instance(1, 2), Instance(3, 4)]
    fresh = np.zeros(2, dtype=bool)
    columns = {name: np.array([1.0, 2.0]) for name in MODEL_FEATURES}
    for name in OPTIONAL_FEATURES:
        columns[name][0] = np.nan
    OnlineFeatureLookup._check_complete(instances, columns, fresh)
    columns["sales_lag_4"][1] = np.inf
    with pytest.raises(UnknownEntities) as raised:
        OnlineFeatureLookup._check_complete(instances, columns, fresh)
    assert [m["index"] for m in raised.value.details["missing"]] == [1]
    with pytest.raises(UnknownEntities) as raised:  # a stale complete row, and an incomplete one
        OnlineFeatureLookup._check_complete(instances, columns, np.array([True, True]), [dt.timedelta(days=7)])
    assert [(m["index"], m["reason"]) for m in raised.value.details["missing"]] == [
        (0, "older than the ttl"), (1, "no online features")]
    assert "older than the feature ttl (7 days)" in raised.value.message
