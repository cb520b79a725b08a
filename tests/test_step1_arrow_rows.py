"""The online rows the bulk store writes from an Arrow batch (``ArrowRows``, what the project's Ray engine hands it)
against upstream's own path, value by value: Feast's conversion of the batch to protos (``_convert_arrow_to_proto``)
valued as Feast's PostgreSQL online store values them (``online_rows``, itself checked against Feast's store in
test_step1_online_store). Randomized batches: 1-3 integer join keys, Double/Float/Int64/Int32 features with NULL,
NaN, infinities, -0.0, extremes and a column of NULLs only, timestamps in every unit, aware and naive, before 1970,
with and without a created timestamp and value_num. Then each batch the encoding leaves to Feast's conversion."""

from __future__ import annotations

import datetime as dt
import warnings
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from sales_forecast.online_store import ArrowRows, online_rows

FEATURE_TYPES = {"Float64": pa.float64(), "Float32": pa.float32(), "Int64": pa.int64(), "Int32": pa.int32()}
SPECIAL = {
    "Float64": [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e308, 5e-324, -2.5, 0.1, 1 / 3, 1e16, 123456789.125],
    "Float32": [np.nan, np.inf, -0.0, 0.0, 3.4028235e38, 1e-45, 0.1, -7.25, 1 / 3],
    "Int64": [0, 1, -1, 127, 128, 300, 2**31, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63)],
    "Int32": [0, 1, -1, 127, 128, 16384, 2**31 - 1, -(2**31)],
}
CONFIG = SimpleNamespace(entity_key_serialization_version=3)


def _view(keys: dict[str, str], features: dict[str, str], created: bool):
    from feast import Entity, FeatureView, Field, ValueType, types
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

    source = PostgreSQLSource(name="rows", table="rows", timestamp_field="event_timestamp",
                              created_timestamp_column="created" if created else "")
    return FeatureView(
        name="rows_view", entities=[Entity(name=name, join_keys=[name], value_type=ValueType[kind.upper()])
                                     for name, kind in keys.items()], source=source,
        ttl=dt.timedelta(days=1),
        schema=[Field(name=name, dtype=getattr(types, kind)) for name, kind in {**keys, **features}.items()])


def _values(rng: np.random.Generator, kind: str, rows: int, nulls: bool) -> pa.Array:
    special = SPECIAL[kind]
    if kind.startswith("Float"):
        drawn = np.where(rng.random(rows) < 0.3, rng.choice(special, rows), rng.normal(0, 1e4, rows))
    else:
        info = np.iinfo(np.int64 if kind == "Int64" else np.int32)
        drawn = np.where(rng.random(rows) < 0.3, rng.choice(np.array(special, dtype=object), rows),
                         rng.integers(info.min, info.max, rows, endpoint=True))
    values = [v.item() if hasattr(v, "item") else v for v in drawn]
    if nulls:
        values = [None if rng.random() < 0.2 else v for v in values]
    return pa.array(values, FEATURE_TYPES[kind])


def _timestamps(rng: np.random.Generator, rows: int, unit: str, zone: str | None) -> pa.Array:
    scale = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    seconds = rng.integers(-(10**9), 2 * 10**9, rows)  # 1938 to 2033
    return pa.array(seconds * scale + rng.integers(0, scale, rows), pa.timestamp(unit, zone))


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 400))
    keys = {name: str(rng.choice(["Int64", "Int32"])) for name in rng.permutation(["store", "dept", "zone"])[
        :rng.integers(1, 4)]}
    features = {f"f{i}": str(rng.choice(list(FEATURE_TYPES))) for i in range(int(rng.integers(1, 7)))}
    created = bool(rng.random() < 0.5)
    columns = {}
    span = max(2, int(np.ceil(rows ** (1 / len(keys)))) + 1)
    combos = rng.choice(span ** len(keys), rows, replace=False)  # distinct key tuples
    for position, (name, kind) in enumerate(keys.items()):
        digits = (combos // span**position) % span
        offset = -(2**31) if kind == "Int32" else -(2**62)
        columns[name] = pa.array(digits * int(rng.choice([1, 7919, 2**20])) + (offset if rng.random() < 0.3 else 0),
                                 FEATURE_TYPES[kind])
    for name, kind in features.items():
        columns[name] = _values(rng, kind, rows, nulls=kind.startswith("Float") and rng.random() < 0.7)
    if rng.random() < 0.3:
        columns[next(iter(features))] = pa.nulls(rows)  # Ray's type for a column with no value in the batch
    zone = rng.choice([None, "UTC", "Asia/Kolkata"])
    columns["event_timestamp"] = _timestamps(rng, rows, str(rng.choice(["s", "ms", "us", "ns"])), zone)
    if created:
        columns["created"] = _timestamps(rng, rows, str(rng.choice(["s", "ms", "us", "ns"])), zone)
    return _view(keys, features, created), pa.table(columns)


def _feasts_rows(view, batch: pa.Table, has_value_num: bool) -> list[tuple]:
    from feast.utils import _convert_arrow_to_proto

    join_keys = {column.name: column.dtype.to_value_type() for column in view.entity_columns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas: nanoseconds discarded, as Feast does
        return online_rows(CONFIG, _convert_arrow_to_proto(batch, view, join_keys), has_value_num)


def _arrow_rows(view, batch: pa.Table, has_value_num: bool, part: int) -> list[tuple]:
    rows = ArrowRows.of(CONFIG, view, batch)
    assert rows is not None
    table = pa.Table.from_batches(list(rows.batches(has_value_num, part)))
    return [tuple(row.values()) for row in table.to_pylist()]


def _by_key(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=lambda row: (row[0], row[1]))


@pytest.mark.parametrize("seed", range(40))
def test_arrow_rows_are_the_rows_of_feasts_protos(seed: int) -> None:
    view, batch = _batch(seed)
    for has_value_num in (False, True):
        theirs = _feasts_rows(view, batch, has_value_num)
        ours = _arrow_rows(view, batch, has_value_num, part=int(np.random.default_rng(seed).integers(1, 64)))
        assert len(ours) == batch.num_rows * len(view.features)
        assert _by_key(ours) == _by_key(theirs)
        keys = [row[0] for row in ours]
        assert keys == sorted(keys)  # the primary key's order, which the upsert's probes follow


def test_the_special_values_byte_for_byte() -> None:
    """Every special value of each type once, beside the proto bytes and text Feast makes of it."""
    from feast.protos.feast.types.Value_pb2 import Value

    fields = {"Float64": "double_val", "Float32": "float_val", "Int64": "int64_val", "Int32": "int32_val"}
    for kind, values in SPECIAL.items():
        view = _view({"store": "Int64"}, {"x": kind}, created=False)
        batch = pa.table({"store": pa.array(range(len(values)), pa.int64()), "x": pa.array(values,
                                                                                      FEATURE_TYPES[kind]),
                          "event_timestamp": pa.array([0] * len(values), pa.timestamp("us", "UTC"))})
        ours = _by_key(_arrow_rows(view, batch, True, part=5))
        assert _by_key(_feasts_rows(view, batch, True)) == ours
        for value, row in zip(values, sorted(ours, key=lambda row: row[0][-8:]), strict=True):
            is_nan = isinstance(value, float) and np.isnan(value)
            as_stored = float(np.float32(value)) if kind == "Float32" else value
            expected = b"" if is_nan else Value(**{fields[kind]: as_stored}).SerializeToString()
            assert row[2] == expected and row[3] == (None if is_nan else str(as_stored)), (kind, value)


def test_batches_it_leaves_to_feasts_conversion() -> None:
    """None (Feast's conversion writes them): a string feature, an integer feature with a NULL, a key twice, a
    NULL key, a string key, a NULL timestamp, a Float64 field read as integers, a view without entities or features,
    a timestamp outside Python's datetimes (years 10000 and 0, and seconds whose microseconds overflow int64),
    another key serialization version."""
    ts = pa.array([0, 1], pa.timestamp("us", "UTC"))
    two = {"store": pa.array([1, 2], pa.int64()), "event_timestamp": ts}
    cases = [
        (_view({"store": "Int64"}, {"x": "String"}, False), pa.table({**two, "x": pa.array(["a", "b"])})),
        (_view({"store": "Int64"}, {"x": "Int64"}, False), pa.table({**two, "x": pa.array([1, None], pa.int64())})),
        (_view({"store": "Int64"}, {"x": "Float64"}, False),
         pa.table({**two, "store": pa.array([1, 1], pa.int64()), "x": pa.array([1.0, 2.0])})),
        (_view({"store": "Int64"}, {"x": "Float64"}, False),
         pa.table({**two, "store": pa.array([1, None], pa.int64()), "x": pa.array([1.0, 2.0])})),
        (_view({"store": "String"}, {"x": "Float64"}, False),
         pa.table({**two, "store": pa.array(["a", "b"]), "x": pa.array([1.0, 2.0])})),
        (_view({"store": "Int64"}, {"x": "Float64"}, False),
         pa.table({**two, "x": pa.array([1.0, 2.0]), "event_timestamp": pa.array([0, None], ts.type)})),
        (_view({"store": "Int64"}, {"x": "Float64"}, False),
         pa.table({**two, "x": pa.array([1, 2], pa.int64())})),  # a Float64 field read as integers
        (_view({}, {"x": "Float64"}, False), pa.table({"event_timestamp": ts, "x": pa.array([1.0, 2.0])})),
        (_view({"store": "Int64"}, {}, False), pa.table(two)),  # no features: Feast writes nothing
        *((_view({"store": "Int64"}, {"x": "Float64"}, False),
           pa.table({**two, "x": pa.array([1.0, 2.0]), "event_timestamp": pa.array([0, moment], pa.timestamp(unit))}))
          for unit, moment in [("s", 253402300800), ("s", -62135596801), ("ms", 2**62), ("us", 2**62)]),
    ]
    for view, batch in cases:
        assert ArrowRows.of(CONFIG, view, batch) is None, batch.schema
    view, batch = _view({"store": "Int64"}, {"x": "Float64"}, False), pa.table({**two, "x": pa.array([1.0, 2.0])})
    assert ArrowRows.of(CONFIG, view, batch) is not None
    assert ArrowRows.of(SimpleNamespace(entity_key_serialization_version=2), view, batch) is None
