"""Request validation: v1 and v2 bodies -> the (store, dept) instances to predict, or a 400/413 naming the field.

v1: ``{"instances": [{"store": 1, "dept": 3}, ...]}``, optionally with ``"parameters": {"quantiles": true}`` (the
answer then adds every quantile the model forecasts). v2: two inputs named ``store`` and ``dept`` with integer
datatypes and one value per instance. Ids are JSON integers (``true`` and ``3.0`` are not), from 0 to MAX_ID: the
Feast entities store and dept are two INT64 join keys, looked up as they are (no combined key that could alias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from sales_forecast.serving.http_errors import BadRequest, TooManyInstances

MAX_ID = 2**63 - 1  # the Feast entities' value type is INT64
V2_INTEGER_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


V1_PARAMETERS = {"quantiles": bool}  # v1 "parameters" the server understands, with their JSON type


class Instance(NamedTuple):
    store: int
    dept: int

    def as_dict(self) -> dict[str, int]:
        """The instance as named ids; also its Feast entity row (join keys store and dept)."""
        return {"store": self.store, "dept": self.dept}


class V1Request(NamedTuple):
    instances: list[Instance]
    quantiles: bool  # "parameters": {"quantiles": true}: answer every quantile, not only the point forecast


def parse_v1(payload: Any, max_instances: int) -> list[Instance]:
    """The instances of a v1 body (kserve hands over a dict, or raw bytes for a non-JSON content type)."""
    return parse_v1_request(payload, max_instances).instances


def parse_v1_request(payload: Any, max_instances: int) -> V1Request:
    body = _json(payload)
    if not isinstance(body, Mapping) or not isinstance(body.get("instances"), list):
        raise BadRequest('the body must be a JSON object with an "instances" list, '
                         'e.g. {"instances": [{"store": 1, "dept": 3}]}')
    items = body["instances"]
    _check_count(len(items), max_instances)
    parameters = _parameters(body.get("parameters"))
    return V1Request([_instance(item, index) for index, item in enumerate(items)], parameters.get("quantiles", False))


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f'"parameters" must be an object like {{"quantiles": true}}, got {_describe(value)}')
    for name, item in value.items():
        if name not in V1_PARAMETERS:
            raise BadRequest(f'unknown parameter "{name}"; the model understands: {", ".join(V1_PARAMETERS)}')
        if not isinstance(item, V1_PARAMETERS[name]):
            raise BadRequest(f'parameters.{name} must be true or false, got {_describe(item)}')
    return dict(value)


def parse_v2(columns: Mapping[str, tuple[str, Sequence[Any]]], max_instances: int) -> list[Instance]:
    """The instances of a v2 request, given its inputs as {name: (datatype, flat data)}."""
    for name in ("store", "dept"):
        if name not in columns:
            raise BadRequest(f'the request needs an input named "{name}" (got {sorted(columns)})')
        datatype = columns[name][0]
        if datatype not in V2_INTEGER_TYPES:
            raise BadRequest(f'input "{name}" must have an integer datatype such as INT64, got {datatype}')
    stores, depts = columns["store"][1], columns["dept"][1]
    if len(stores) != len(depts):
        raise BadRequest(f'inputs "store" and "dept" differ in length ({len(stores)} and {len(depts)})')
    _check_count(len(stores), max_instances)
    return [Instance(_id(store, f'input "store" data[{i}]'), _id(dept, f'input "dept" data[{i}]'))
            for i, (store, dept) in enumerate(zip(stores, depts, strict=True))]


def _json(payload: Any) -> Any:
    if isinstance(payload, bytes | bytearray | memoryview | str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
    return payload


def _check_count(count: int, max_instances: int) -> None:
    if count == 0:
        raise BadRequest('"instances" is empty: send at least one {"store": ..., "dept": ...}')
    if count > max_instances:
        raise TooManyInstances(f"{count} instances in one request; the maximum is {max_instances} "
                               "(set SERVING_MAX_INSTANCES to change it)", max_instances=max_instances)


def _instance(item: Any, index: int) -> Instance:
    where = f"instances[{index}]"
    if not isinstance(item, Mapping):
        raise BadRequest(f'{where} must be an object like {{"store": 1, "dept": 3}}, got {_describe(item)}')
    for field in ("store", "dept"):
        if field not in item:
            raise BadRequest(f"{where}.{field} is missing")
    return Instance(_id(item["store"], f"{where}.store"), _id(item["dept"], f"{where}.dept"))


def _id(value: Any, where: str) -> int:
    # bool is a subclass of int; a JSON true is not an id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where} must be an integer, got {_describe(value)}")
    if value < 0:
        raise BadRequest(f"{where} must not be negative, got {value}")
    if value > MAX_ID:
        raise BadRequest(f"{where} must be at most {MAX_ID} (INT64), got {value}")
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
