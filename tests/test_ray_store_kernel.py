"""The Ray offline store's pieces without PostgreSQL or Ray: the as-of kernel against a brute-force loop,
key encoding, key-range partitioning, the pushed-down SQL, Ray connection choice and partition counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sales_forecast.config import load_settings
from sales_forecast.errors import ConfigError
from sales_forecast.ray_offline_store.driver import (
    InEntityOrder,
    KeyRange,
    Parallelism,
    RayConnectionError,
    StreamCutter,
    TimeWindow,
    ViewPlan,
    feature_query,
    partition_by_key,
    ray_target,
)
from sales_forecast.ray_offline_store.worker import NO_MATCH, NULL_TIME, POSITION, asof_match, key_codes

SECOND = 1_000_000_000


def brute_force(e_code, e_ts, f_code, f_ts, f_created, ttl_ns, f_value=None, created_limit=False) -> np.ndarray:
    """Feast's rule row by row: among rows with the same key, ts <= entity ts (and >= entity ts - ttl; with
    created_limit, created <= entity ts), the greatest (ts, created), then the greatest value (the tie-break of
    exact duplicates)."""
    out = np.full(len(e_code), NO_MATCH)
    for i in range(len(e_code)):
        best = None
        for j in range(len(f_code)):
            if e_code[i] < 0 or f_code[j] != e_code[i] or e_ts[i] == NULL_TIME or f_ts[j] == NULL_TIME:
                continue
            if f_ts[j] > e_ts[i] or (ttl_ns and f_ts[j] < e_ts[i] - ttl_ns):
                continue
            if created_limit and f_created is not None and f_created[j] > e_ts[i]:
                continue
            rank = (f_ts[j], f_created[j] if f_created is not None else 0, f_value[j] if f_value is not None else 0)
            if best is None or rank >= best[0]:
                best = (rank, j)
        if best is not None:
            out[i] = best[1]
    return out


def _described(picked: np.ndarray, *columns: np.ndarray | None) -> list[tuple]:
    """What a pick means (the row's key, times and value), since equal rows are interchangeable."""
    return [None if p < 0 else tuple(int(c[p]) for c in columns if c is not None) for p in picked]


@pytest.mark.parametrize("seed", range(20))
def test_asof_match_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_features, n_entities = int(rng.integers(0, 60)), int(rng.integers(0, 60))
    f_code = rng.integers(-1, 5, n_features)  # -1: a NULL key
    f_ts = rng.integers(0, 20, n_features) * SECOND
    f_ts[rng.random(n_features) < 0.05] = NULL_TIME
    f_created = rng.integers(0, 3, n_features).astype(np.int64) * SECOND  # ties on (key, ts, created) happen
    f_value = rng.integers(0, 4, n_features)
    e_code = rng.integers(-1, 6, n_entities)
    e_ts = rng.integers(0, 25, n_entities) * SECOND
    e_ts[rng.random(n_entities) < 0.05] = NULL_TIME

    def by_value(rows: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(f_value[rows], kind="stable"), kind="stable")

    late_created = f_ts + rng.integers(0, 4, n_features) * SECOND  # for filter_by_created_timestamp
    late_created[f_ts == NULL_TIME] = 0
    for created, limit in ((f_created, False), (None, False), (late_created, True)):
        for ttl in (None, 3 * SECOND, 0):
            got = asof_match(e_code, e_ts, f_code, f_ts, created, ttl, tie_break=by_value,
                             created_at_most_entity=limit)
            want = brute_force(e_code, e_ts, f_code, f_ts, created, ttl, f_value, created_limit=limit)
            assert _described(got, f_code, f_ts, created, f_value) == _described(want, f_code, f_ts, created, f_value)


def test_asof_match_when_no_feature_row_is_usable() -> None:
    """Every feature row has a NULL key or a NULL time: no entity row matches (issue 10, case 2)."""
    got = asof_match(np.array([0, 1]), np.array([5, 5]) * SECOND, np.array([-1, 0]),
                     np.array([1 * SECOND, NULL_TIME]), None, None)
    assert got.tolist() == [NO_MATCH, NO_MATCH]


def test_asof_match_tie_break_only_on_exact_ties() -> None:
    """The tie-break sees only rows equal in (key, ts, created); the result never depends on the input order."""
    seen: list[list[int]] = []

    def tie_break(rows: np.ndarray) -> np.ndarray:
        seen.append(sorted(rows.tolist()))
        return np.asarray([{0: 1, 1: 2, 2: 0}[int(r)] for r in rows])  # row 1 is the greatest

    codes, ts = np.array([0, 0, 0, 0]), np.array([1, 1, 1, 2]) * SECOND
    got = asof_match(np.array([0, 0]), np.array([1, 3]) * SECOND, codes, ts, None, None, tie_break)
    assert got.tolist() == [1, 3] and seen == [[0, 1, 2]]
    seen.clear()
    assert asof_match(np.array([0]), np.array([5]) * SECOND, np.array([0, 0]), np.array([1, 2]) * SECOND,
                      None, None, tie_break).tolist() == [1] and seen == []


def test_key_codes_keep_pairs_apart_and_nulls_unmatched() -> None:
    stores = pa.chunked_array([pa.array([1, 11, 1, None], pa.int32())])  # entity side: another int type
    depts = pa.chunked_array([pa.array([12, 2, 12, 2])])
    e_codes, f_codes = key_codes([stores, depts], [pa.chunked_array([pa.array([11, 1])]),
                                                   pa.chunked_array([pa.array([2, 12])])], 4, 2)
    assert e_codes[0] == e_codes[2] != e_codes[1]
    assert e_codes[3] == -1
    assert f_codes.tolist() == [e_codes[1], e_codes[0]]
    no_keys = key_codes([], [], 3, 2)  # a view without entities: one key for every row
    assert no_keys[0].tolist() == [0, 0, 0] and no_keys[1].tolist() == [0, 0]


def test_key_codes_compare_like_postgresql() -> None:
    """An entity id outside the source column's type matches nothing (2^40 against int4), unsigned ids above
    int64 are NULL, integers against floats compare as numbers (issue 10, case 3)."""
    source = pa.chunked_array([pa.array([1, 2], pa.int32())])
    e_codes, f_codes = key_codes([pa.chunked_array([pa.array([1, 2**40, -(2**40), 2])])], [source], 4, 2)
    assert e_codes[0] == f_codes[0] and e_codes[3] == f_codes[1] and not {e_codes[1], e_codes[2]} & {*f_codes}
    e_codes, _ = key_codes([pa.chunked_array([pa.array([2**64 - 1, 1], pa.uint64())])], [source], 2, 2)
    assert e_codes[0] == -1
    e_codes, f_codes = key_codes([pa.chunked_array([pa.array([1.0, 1.5])])], [source], 2, 2)
    assert e_codes[0] == f_codes[0] and e_codes[1] not in f_codes
    with pytest.raises(TypeError, match="cannot be compared"):
        key_codes([pa.chunked_array([pa.array(["a"])])], [source], 1, 2)


def test_key_codes_on_text() -> None:
    e_codes, f_codes = key_codes([pa.chunked_array([pa.array(["a", "b", None])])],
                                 [pa.chunked_array([pa.array(["b", "c"])])], 3, 2)
    assert e_codes[1] == f_codes[0] and e_codes[2] == -1 and len({*e_codes[:2], f_codes[1]}) == 3


def test_partitions_are_balanced_disjoint_key_ranges() -> None:
    rng = np.random.default_rng(0)
    keys = pa.table({"store": rng.integers(1, 40, 10_000), "dept": rng.integers(1, 30, 10_000)})
    usable = rng.random(10_000) > 0.1
    parts = partition_by_key(keys, usable, 4)
    assert parts.count == 4
    assert (parts.assignment[~usable] == -1).all() and (parts.assignment[usable] >= 0).all()
    sizes = np.bincount(parts.assignment[usable])
    assert sizes.max() < 1.2 * sizes.min()
    pairs = list(zip(keys["store"].to_pylist(), keys["dept"].to_pylist(), strict=True))
    for index, key_range in enumerate(parts.ranges):
        inside = {pair for pair, part in zip(pairs, parts.assignment, strict=True) if part == index}
        assert min(inside) == key_range.low and max(inside) == key_range.high
    assert all(a.high < b.low for a, b in zip(parts.ranges, parts.ranges[1:], strict=False))


def test_partitioning_falls_back_to_one_unbounded_partition() -> None:
    keys = pa.table({"store": pa.array([1, None, 3])})
    single = partition_by_key(keys, np.array([True, True, True]), 1)
    assert single.ranges == [KeyRange((1,), (3,))] and single.assignment.tolist() == [0, -1, 0]
    timestamps = pa.table({"when": pa.array([1, 2], pa.timestamp("us"))})  # no known PostgreSQL order
    assert partition_by_key(timestamps, np.array([True, True]), 4).ranges == [None]
    huge_key = pa.table({"store": [1] * 90 + [2] * 10})
    assert partition_by_key(huge_key, np.ones(100, bool), 4).count == 2  # never an empty partition


def _plan(keys: tuple[str, ...]) -> ViewPlan:
    return ViewPlan(name="v", source_sql="(SELECT * FROM t)", join_keys=keys, source_keys=keys,
                    timestamp_field="ts", created_timestamp_column="created", features=("x", "ts"),
                    output_names=("x", "ts"), ttl_seconds=60)


def test_feature_query_pushes_down_columns_time_and_key_range() -> None:
    window = TimeWindow(low_ns=1_500, high_ns=2 * SECOND + 999)
    query = feature_query(_plan(("store", "dept")), window, KeyRange((1, 12), (11, 2)), (False, False))
    assert query.startswith('SELECT "store" AS "__k0", "dept" AS "__k1", "ts"::timestamptz AS "__ts", '
                            '"created"::timestamptz AS "__created", '
                            '"x" AS "__f0", "ts" AS "__f1" FROM (SELECT * FROM t) AS source WHERE ')
    assert "\"ts\" <= '1970-01-01 00:00:02+00:00'::timestamptz" in query  # rounded down to microseconds
    assert "\"ts\" >= '1970-01-01 00:00:00.000002+00:00'::timestamptz" in query  # rounded up
    assert 'ROW("store", "dept") >= ROW(1, 12) AND ROW("store", "dept") <= ROW(11, 2)' in query
    assert query.endswith('AND "store" >= 1 AND "store" <= 11')  # the first key alone, for the planner's estimate

    text = feature_query(_plan(("region",)), TimeWindow(None, 0), KeyRange(("B",), ("it's",)), (True,))
    assert '("region" COLLATE "C") >= \'B\' AND ("region" COLLATE "C") <= \'it\'\'s\'' in text
    assert '"ts" >=' not in text
    assert feature_query(_plan(("region",)), None, None, (True,)).endswith("WHERE FALSE")


def test_ray_target() -> None:
    """The Ray variables come through sales_forecast.config (load_ray_variables), never os.environ directly, and
    alone: another variable of this project that would not load (in someone else's Feast repo) is not read."""
    def target(ray_address: str | None = None, **environ: str) -> str:
        return ray_target(ray_address, {"SERVING_MAX_INSTANCES": "many", "POSTGRES_PASSWORD": 'a"b', **environ})

    with pytest.raises(ConfigError, match="SERVING_MAX_INSTANCES"):
        load_settings({"SERVING_MAX_INSTANCES": "many"})
    assert target() == "local"
    assert target("10.0.0.1:6379") == "10.0.0.1:6379"
    assert target(RAY_ADDRESS="feast-ray-head:6379") == "feast-ray-head:6379"  # what a Ray job's driver sees
    assert target(RAY_ADDRESS="feast-ray-head:6379", FEAST_RAY_EXECUTION_MODE="local") == "local"
    with pytest.raises(RayConnectionError, match="needs ray_address"):
        target(FEAST_RAY_EXECUTION_MODE="remote")
    with pytest.raises(RayConnectionError, match="Ray Client"):
        target("ray://feast-ray-head:10001", FEAST_RAY_EXECUTION_MODE="remote")
    with pytest.raises(ConfigError, match="Ray Client"):
        target(RAY_ADDRESS="ray://feast-ray-head:10001")
    with pytest.raises(ConfigError, match="FEAST_RAY_EXECUTION_MODE"):
        target(FEAST_RAY_EXECUTION_MODE="kuberay")


def test_partition_counts() -> None:
    auto = Parallelism(partitions=None, rows_per_partition=1_000_000, min_rows_per_partition=50_000)
    assert auto.partitions_for(10_000, cpus=2) == 1  # too small to be worth splitting
    assert auto.partitions_for(602_316, cpus=2) == 2
    assert auto.partitions_for(602_316, cpus=8) == 8
    assert auto.partitions_for(6_023_160, cpus=2) == 7  # bounded task memory
    assert Parallelism(3, 500_000, 50_000).partitions_for(10, cpus=2) == 3


@pytest.mark.parametrize("block_rows", [2, 1 << 20])
def test_in_entity_order(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions arrive in any order, their rows in any order; each row lands at its entity position; rows no
    partition holds, and NULLs within a partition, stay NULL; fixed-width and other columns alike; buffers made of
    several blocks or one."""
    from sales_forecast.ray_offline_store import driver

    monkeypatch.setattr(driver, "BLOCK_ROWS", block_rows)
    def part(positions: list[int], nulls: tuple[int, ...] = ()) -> pa.Table:
        values = [None if p in nulls else float(p) for p in positions]
        return pa.table({"x": values, "n": pa.array([None if p in nulls else p for p in positions], pa.int32()),
                         "when": pa.array([None if p in nulls else p for p in positions], pa.timestamp("us")),
                         "flag": [None if p in nulls else p % 2 == 0 for p in positions],
                         "s": [None if p in nulls else str(p) for p in positions],
                         POSITION: pa.array(positions, pa.int64())})

    order = InEntityOrder()
    order.add(part([4, 1], nulls=(1,)))
    order.add(part([3, 0]))  # row 2 is in no partition (a NULL key)
    got = order.finish(5)
    assert got.column_names == ["x", "n", "when", "flag", "s"]
    assert got["x"].to_pylist() == [0.0, None, None, 3.0, 4.0]
    assert got["n"].type == pa.int32() and got["n"].to_pylist() == [0, None, None, 3, 4]
    assert got["when"].type == pa.timestamp("us") and got["when"].cast(pa.int64()).to_pylist() == [0, None, None, 3, 4]
    assert got["flag"].to_pylist() == [True, None, None, False, True]
    assert got["s"].to_pylist() == ["0", None, None, "3", "4"]
    empty = InEntityOrder()
    empty.add(part([]))
    assert empty.finish(0).num_rows == 0


def test_arriving_rows_are_taken_by_position_across_batches() -> None:
    from sales_forecast.ray_offline_store.store import ArrivingRows

    schema = pa.schema([("x", pa.int64()), ("s", pa.string())])
    arriving = ArrivingRows(schema)
    for start, size in ((0, 3), (3, 0), (3, 4), (7, 2)):
        values = list(range(start, start + size))
        arriving.append(pa.RecordBatch.from_pydict({"x": values, "s": [str(v) for v in values]}, schema=schema))
    for positions in ([], [0], [2, 3], [1, 4, 6, 7, 8], list(range(9))):
        got = arriving.take(np.array(positions, dtype=np.int64))
        assert got.schema == schema and got["x"].to_pylist() == positions
        assert got["s"].to_pylist() == [str(p) for p in positions]
    assert arriving.table()["x"].to_pylist() == list(range(9))


def _stream(keys: pa.Table, stamps: np.ndarray, batch: int, cutter) -> list:
    parts = []
    for start in range(0, keys.num_rows, batch):
        positions = np.arange(start, min(start + batch, keys.num_rows))
        parts += cutter.add(positions, keys.slice(start, batch), stamps[positions])
    return parts + cutter.finish()


def test_stream_cutter_cuts_ordered_streams_at_key_boundaries() -> None:
    """An entity stream in key order is cut into disjoint key ranges while it arrives (never inside a key); every
    usable row is in exactly one partition; rows with a NULL key or time in none."""
    rng = np.random.default_rng(3)
    stores = np.sort(rng.integers(1, 40, 5_000))
    depts = np.concatenate([np.sort(rng.integers(1, 9, n)) for n in np.bincount(stores)[1:] if n] or [[]])
    keys = pa.table({"dept": pa.array(depts, pa.int64()), "store": pa.array(stores, pa.int64())})
    stamps = rng.integers(0, 100, 5_000) * SECOND
    stamps[rng.random(5_000) < 0.02] = NULL_TIME
    plan = _plan(("store", "dept"))
    parts = _stream(keys, stamps, 700, StreamCutter(plan, cpus=2, min_rows=300, max_rows=2_000))
    assert len(parts) > 4
    seen = np.concatenate([part.positions for part in parts])
    assert sorted(seen.tolist()) == np.flatnonzero(stamps != NULL_TIME).tolist()
    ranges = [part.key_range for part in parts]
    assert all(a.high < b.low for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint, in order
    for part in parts:
        pairs = list(zip(part.keys[0].to_pylist(), part.keys[1].to_pylist(), strict=True))
        assert min(pairs) == part.key_range.low and max(pairs) == part.key_range.high


def test_stream_cutter_follows_a_scan_that_wraps_around() -> None:
    """A sequential scan PostgreSQL started mid-table (synchronized scans): keys in order from the middle, then again
    from the start. Both runs are cut while they arrive, into key ranges that share at most the key the scan
    started in."""
    stores = np.repeat(np.arange(1, 101), 40)
    keys = pa.table({"store": pa.array(np.roll(stores, -1_700), pa.int64())})  # starts at store 43
    parts = _stream(keys, np.zeros(4_000, np.int64), 250, StreamCutter(_plan(("store",)), cpus=2, min_rows=300,
                                                                        max_rows=600))
    assert len(parts) >= 6 and sorted(np.concatenate([p.positions for p in parts]).tolist()) == list(range(4_000))
    ranges = sorted(part.key_range.low + part.key_range.high for part in parts)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_stream_cutter_falls_back_when_out_of_order() -> None:
    """Out of key order, the rest is partitioned at the end; every usable row is still in one partition and
    inside its partition's key range. Views without keys get one partition, an empty stream one empty one."""
    rng = np.random.default_rng(4)
    keys = pa.table({"store": pa.array(rng.integers(1, 50, 3_000), pa.int64()),
                     "dept": pa.array(rng.integers(1, 5, 3_000), pa.int64())})
    stamps = np.arange(3_000) * SECOND
    parts = _stream(keys, stamps, 500, StreamCutter(_plan(("store",)), cpus=2, min_rows=200, max_rows=1_000))
    assert sorted(np.concatenate([p.positions for p in parts]).tolist()) == list(range(3_000))
    for part in parts:
        values = part.keys[0].to_pylist()
        assert part.key_range is None or (min(values),) >= part.key_range.low and (max(values),) <= part.key_range.high
    timeless = _stream(keys, stamps, 500, StreamCutter(_plan(()), cpus=2, min_rows=200, max_rows=1_000))
    assert len(timeless) == 1 and timeless[0].key_range is None and len(timeless[0].positions) == 3_000
    empty = StreamCutter(_plan(("store",)), cpus=2, min_rows=200, max_rows=1_000).finish()
    assert len(empty) == 1 and len(empty[0].positions) == 0
