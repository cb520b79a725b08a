"""Point-in-time correctness of the training set, checked against independent pandas computations.

Feast's join (through the feature service, entity set as SQL, real PostgreSQL) must equal a backward merge_asof
with tolerance = ttl on the feature table, and every sales value in a feature must come from a week that ended
at or before the entity's timestamp, i.e. never from the target week or later.
"""

from __future__ import annotations

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import pytest

from sales_forecast.contract import FEATURE_TABLE, RAW_TABLE
from sales_forecast.features import store as fs_ops
from sales_forecast.features.derive import MODEL_FEATURES, OPTIONAL_FEATURES, REQUIRED_FEATURES, SALES_LAGS
from sales_forecast.training.dataset import (
    LABEL,
    LABEL_IS_HOLIDAY,
    SEASONAL_NAIVE,
    TIMESTAMP,
    complete_rows,
    entity_sql,
    fetch_training_frame,
    historical_features,
)

WEEK = pd.Timedelta(days=7)
KEY = ["store", "dept"]  # the two Feast entities
COLLIDING = [(1, 12), (11, 2)]  # store 1 / dept 12 vs store 11 / dept 2: "112" if concatenated


def read_sql(settings, query: str) -> pd.DataFrame:
    with adbc.connect(settings.postgres.libpq_url()) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetch_arrow_table().to_pandas()


@pytest.fixture(scope="module")
def tables(small_features):
    settings, _ = small_features
    features = read_sql(settings, f'SELECT * FROM "{FEATURE_TABLE}"')
    features[TIMESTAMP] = pd.to_datetime(features[TIMESTAMP], utc=True).dt.as_unit("ns")
    raw = read_sql(settings, f'SELECT store, dept, date, weekly_sales, is_holiday FROM "{RAW_TABLE}"')
    raw["date"] = pd.to_datetime(raw["date"]).dt.tz_localize("UTC").dt.as_unit("ns")
    store = fs_ops.open_store(settings)
    return settings, store, features, raw


def hand_made_entities(raw: pd.DataFrame, ttl: pd.Timedelta) -> pd.DataFrame:
    """Timestamps on week ends, between weeks, before a series starts, at and past the ttl after its end, for
    the colliding key pair and a seeded sample of other series."""
    first, last = raw["date"].min(), raw["date"].max()
    rows = []
    for store, dept in COLLIDING:
        for stamp in (first - pd.Timedelta(days=1),  # before the series starts
                      first,  # its first week: some lags are NULL
                      first + 5 * WEEK,  # exactly a week end
                      first + 5 * WEEK + pd.Timedelta(days=3, hours=5),  # between two weeks
                      last - WEEK + pd.Timedelta(seconds=1),
                      last + ttl,  # the last row is exactly ttl old: still valid
                      last + ttl + pd.Timedelta(hours=1)):  # ttl has run out
            rows.append((store, dept, stamp))
    rng = np.random.default_rng(3)
    keys = raw[KEY].drop_duplicates().to_numpy()
    offsets = pd.to_timedelta(rng.integers(-3 * 24, (last - first).days * 24 + 10 * 24, 60), unit="h")
    picks = keys[rng.integers(0, len(keys), len(offsets))]
    rows += [(int(store), int(dept), first + offset) for (store, dept), offset in zip(picks, offsets, strict=True)]
    return pd.DataFrame(rows, columns=[*KEY, TIMESTAMP]).drop_duplicates(ignore_index=True)


def as_sql(entities: pd.DataFrame) -> str:
    values = ",\n".join(f"({store}::bigint, {dept}::bigint, TIMESTAMPTZ '{stamp.isoformat()}')"
                        for store, dept, stamp in entities[[*KEY, TIMESTAMP]].itertuples(index=False))
    return f"SELECT * FROM (VALUES\n{values}\n) AS entities(store, dept, {TIMESTAMP})"


def merge_asof_expected(entities: pd.DataFrame, features: pd.DataFrame, ttl: pd.Timedelta) -> pd.DataFrame:
    right = features[[*KEY, TIMESTAMP, *MODEL_FEATURES]].assign(feature_ts=features[TIMESTAMP])
    expected = pd.merge_asof(entities.sort_values(TIMESTAMP), right.sort_values(TIMESTAMP), on=TIMESTAMP,
                             by=KEY, direction="backward", tolerance=ttl, allow_exact_matches=True)
    return expected.sort_values([*KEY, TIMESTAMP], ignore_index=True)


def assert_same(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        a, b = got[column].to_numpy(dtype="float64"), want[column].to_numpy(dtype="float64")
        same = np.isclose(a, b, rtol=1e-12, atol=0.0) | (np.isnan(a) & np.isnan(b))
        assert same.all(), f"{column} differs at rows {np.flatnonzero(~same)[:5].tolist()}"


def test_feature_rows_equal_an_independent_merge_asof(tables) -> None:
    settings, store, features, raw = tables
    ttl = pd.Timedelta(fs_ops.feature_ttl(store))
    entities = hand_made_entities(raw, ttl)
    got = historical_features(store, as_sql(entities)).sort_values([*KEY, TIMESTAMP], ignore_index=True)
    want = merge_asof_expected(entities, features, ttl)

    assert len(got) == len(entities), "the join must return one row per entity row (no key collisions)"
    assert (got[[*KEY, TIMESTAMP]] == want[[*KEY, TIMESTAMP]]).all().all()
    assert_same(got, want, MODEL_FEATURES)
    # The cases the hand-made set is for really occurred.
    assert want["feature_ts"].isna().sum() >= 4  # before the start and after the ttl, for both keys
    assert (want["feature_ts"] < want[TIMESTAMP]).any() and (want["feature_ts"] == want[TIMESTAMP]).any()
    pair = got[pd.MultiIndex.from_frame(got[KEY]).isin(COLLIDING)]
    lag_1 = pair.pivot(index=TIMESTAMP, columns=KEY, values="sales_lag_1").dropna()
    assert len(lag_1) >= 4 and (lag_1.iloc[:, 0] != lag_1.iloc[:, 1]).all()  # two series, not one mixed up


def test_no_feature_holds_the_target_week_or_later(tables) -> None:
    """Every lag equals the raw sales of a week that ended at or before the entity timestamp, so the sales of the
    target week (the first week ending after it) or any later week cannot be in a feature."""
    settings, store, features, raw = tables
    ttl = pd.Timedelta(fs_ops.feature_ttl(store))
    entities = hand_made_entities(raw, ttl)
    got = historical_features(store, as_sql(entities))
    sales = raw.set_index([*KEY, "date"])["weekly_sales"]
    checked = 0
    for row in got.itertuples(index=False):
        series = raw[(raw["store"] == row.store) & (raw["dept"] == row.dept) & (raw["date"] <= row.event_timestamp)]
        latest = series["date"].max()
        if pd.isna(latest) or row.event_timestamp - latest > ttl:
            assert np.isnan(row.sales_lag_1), "no feature row should be found outside the ttl"
            continue
        for k in range(1, SALES_LAGS + 1):
            week = latest - (k - 1) * WEEK  # ended at or before the entity timestamp: before any target week
            want = sales.get((row.store, row.dept, week), np.nan)
            got_value = getattr(row, f"sales_lag_{k}")
            assert (np.isnan(want) and np.isnan(got_value)) or got_value == pytest.approx(want), (row, k)
        for name, weeks_back in (("sales_ya_next", 51), ("sales_ya_this", 52), ("sales_ya_next2", 50)):
            want = sales.get((row.store, row.dept, latest - weeks_back * WEEK), np.nan)  # NULL without that history
            got_value = getattr(row, name)
            assert (np.isnan(want) and np.isnan(got_value)) or got_value == pytest.approx(want), (row, name)
        checked += 1
    assert checked >= 40


def test_training_set_labels_are_next_week(small_features, tables) -> None:
    """The training entity set: label and its holiday flag from week t+1, seasonal naive from week t+1 - 52,
    features from the row stamped t; incomplete rows dropped."""
    settings, store, features, raw = tables
    frame, returned = fetch_training_frame(store, settings.postgres)
    raw_by_key = raw.set_index([*KEY, "date"])
    series = raw.groupby(KEY).size()
    assert returned == int((series - 1).sum())  # every week but each series' last one has a label
    assert len(frame) == int((series - SALES_LAGS).sum())  # minus the first weeks with incomplete lags
    assert not frame[REQUIRED_FEATURES].isna().any().any()
    assert frame["sales_ya_next"].isna().any() and frame["sales_ya_next"].notna().any()  # 60 weeks: some rows

    sample = frame.sample(n=300, random_state=0)
    target = raw_by_key.loc[list(zip(sample["store"], sample["dept"], sample[TIMESTAMP] + WEEK, strict=True))]
    assert np.allclose(sample[LABEL], target["weekly_sales"])
    assert (sample[LABEL_IS_HOLIDAY].to_numpy() == target["is_holiday"].to_numpy()).all()
    current = raw_by_key.loc[list(zip(sample["store"], sample["dept"], sample[TIMESTAMP], strict=True))]
    assert np.allclose(sample["sales_lag_1"], current["weekly_sales"])  # the feature row stamped t
    last_year = [raw_by_key["weekly_sales"].get((store, dept, stamp + WEEK - pd.Timedelta(days=364)), np.nan)
                 for store, dept, stamp in zip(sample["store"], sample["dept"], sample[TIMESTAMP], strict=True)]
    assert np.allclose(sample[SEASONAL_NAIVE], last_year, equal_nan=True)
    assert sample[SEASONAL_NAIVE].notna().any() and sample[SEASONAL_NAIVE].isna().any()


def test_complete_rows_drops_incomplete_features() -> None:
    frame = pd.DataFrame({name: [1.0, np.nan, 2.0] for name in MODEL_FEATURES})
    frame["store"], frame["dept"], frame[LABEL] = 1, 2, 5.0
    frame[TIMESTAMP] = pd.date_range("2026-01-02", periods=3, freq="7D", tz="UTC")
    assert complete_rows(frame)[TIMESTAMP].tolist() == [frame[TIMESTAMP][0], frame[TIMESTAMP][2]]
    frame.loc[1, REQUIRED_FEATURES] = 1.0  # only optional features (year-ago sales, long means) missing: kept
    assert complete_rows(frame)[OPTIONAL_FEATURES].isna().sum(axis=1).tolist() == [0, len(OPTIONAL_FEATURES), 0]


def test_training_retrieval_runs_the_ray_join_by_default(small_features) -> None:
    """feature_repo selects the Ray offline store, so get_historical_features is the Ray point-in-time join."""
    from sales_forecast.contract import FEATURE_SERVICE
    from sales_forecast.ray_offline_store.store import STORE_TYPE, RayPostgreSQLRetrievalJob

    settings, _ = small_features
    store = fs_ops.open_store(settings)
    assert store.config.offline_store.type == STORE_TYPE
    job = store.get_historical_features(entity_df=entity_sql(), features=store.get_feature_service(FEATURE_SERVICE))
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    assert len(job.to_df()) > 0
