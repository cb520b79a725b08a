"""The Ray offline store on inputs outside this project's feature view, case by case, against Feast's own
PostgreSQL store (or a hand-computed answer where Feast's is undefined): views without entities, partitions where
no feature row is usable, entity keys outside the source column's type, naive timestamps on a non-UTC server,
duplicate (key, timestamp) rows, offline writes, and the requests Feast's store used to serve (a date range without
an entity set, filter_by_created_timestamp). The definitions are tests/fixtures/ray_repo/features.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import database_settings

from sales_forecast.config import Settings
from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob
from tests.support.feast_repo import RAY_REPO, definitions, feature_store, load_tables, postgres_store

T0 = pd.Timestamp("2026-01-02", tz="UTC")
DAY = pd.Timedelta(days=1)

pytestmark = pytest.mark.usefixtures("own_ray")


@pytest.fixture(scope="module")
def contract_db(stack_settings: Settings) -> Settings:
    settings = database_settings(stack_settings, "ray_contract")
    feature_store(settings).apply(definitions(RAY_REPO / "features.py"))
    return settings


def both(settings: Settings, entities: pd.DataFrame, features: list[str], **options) -> tuple[pd.DataFrame, ...]:
    """(Ray store's answer, Feast's PostgreSQL store's answer), each ordered by row_id."""
    job = feature_store(settings, **options).get_historical_features(entity_df=entities, features=features)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    theirs = postgres_store(settings).get_historical_features(entity_df=entities, features=features).to_df()
    return tuple(frame.sort_values("row_id").reset_index(drop=True) for frame in (job.to_df(), theirs))


def store_rows(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    if "created" not in frame:
        frame.insert(2, "created", frame["event_timestamp"])
    return frame


# --- 1. views without entities ----------------------------------------------------------------------------------

def test_view_without_entities_joins_on_time_alone(contract_db: Settings) -> None:
    """entities=[] (global statistics): every entity row gets the latest global row at or before its time, within
    the ttl, the later created row winning a tie; mixed with a keyed view in one request."""
    load_tables(contract_db, {
        "global_rows": pd.DataFrame({
            "event_timestamp": [T0, T0 + DAY, T0 + DAY, T0 + 9 * DAY],
            "created": [T0, T0 + DAY, T0 + DAY + pd.Timedelta(hours=1), T0 + 9 * DAY],
            "level": [1.0, 2.0, 3.0, 4.0]}),
        "store_rows": store_rows(store=[1, 2], event_timestamp=[T0, T0], temperature=[10.0, 20.0], visitors=[1, 2]),
    })
    times = [T0 - DAY, T0, T0 + DAY, T0 + 5 * DAY, T0 + 8 * DAY, T0 + 8 * DAY + pd.Timedelta(seconds=1),
             T0 + 9 * DAY]
    entities = pd.DataFrame({"row_id": range(2 * len(times)), "store": [1, 2] * len(times),
                             "event_timestamp": [t for t in times for _ in (1, 2)]})
    ours, theirs = both(contract_db, entities, ["store_stats:temperature", "global_stats:level"])
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["level"].tolist() == [np.nan] * 2 + [1.0] * 2 + [3.0] * 6 + [np.nan] * 2 + [4.0] * 2 or \
        np.allclose(ours["level"], [np.nan] * 2 + [1.0] * 2 + [3.0] * 6 + [np.nan] * 2 + [4.0] * 2, equal_nan=True)


# --- 2. no usable feature row in a partition ----------------------------------------------------------------------

def test_partition_without_usable_feature_rows(contract_db: Settings) -> None:
    """The only rows in the entity rows' window have a NULL key (or a NULL time): NULL features, as Feast."""
    load_tables(contract_db, {"dept_rows": pd.DataFrame({
        "dept": pd.array([None, 1, 2], dtype="Int64"),
        "event_timestamp": pd.Series([T0, T0 + 30 * DAY, None], dtype="datetime64[ns, UTC]"),
        "dept_index": [0.5, 0.7, 0.9]})})
    entities = pd.DataFrame({"row_id": [0, 1], "dept": [1, 2], "event_timestamp": [T0 + DAY, T0 + DAY]})
    for options in ({"partitions": 1}, {"partitions": 2}, {"ray_min_entity_rows": 10}):
        ours, theirs = both(contract_db, entities, ["dept_stats:dept_index"], **options)
        pd.testing.assert_frame_equal(ours, theirs)
        assert ours["dept_index"].isna().all()


# --- 3. entity keys outside the source column's type ------------------------------------------------------------

def test_entity_key_outside_the_source_column_type(contract_db: Settings) -> None:
    """A 2^40 entity id against an integer (int4) source column matches nothing: NULL for that row, as Feast,
    instead of failing the whole retrieval."""
    rows = store_rows(store=np.array([1, 2], dtype="int32"), event_timestamp=[T0, T0], temperature=[10.0, 20.0],
                      visitors=np.array([1, 2], dtype="int32"))
    load_tables(contract_db, {"store_rows": rows})
    entities = pd.DataFrame({"row_id": [0, 1, 2], "store": [1, 2**40, -(2**40)],
                             "event_timestamp": [T0 + DAY] * 3})
    ours, theirs = both(contract_db, entities, ["store_stats:temperature"])
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["temperature"].tolist()[0] == 10.0 and ours["temperature"].iloc[1:].isna().all()


# --- 5. duplicate (key, event timestamp) rows -------------------------------------------------------------------

def test_duplicate_rows_without_created_timestamp_pick_deterministically(contract_db: Settings) -> None:
    """Rows equal in key and event timestamp (no created timestamp to break the tie): the row with the greatest
    feature values wins, whatever order PostgreSQL returns them in, however the entity rows are partitioned.
    (Feast's own join returns the entity row once per tied row.)"""
    duplicates = pd.DataFrame({"dept": [1, 1, 1, 2], "event_timestamp": [T0, T0, T0, T0],
                               "dept_index": [0.1, 0.9, np.nan, 0.3]})
    entities = pd.DataFrame({"row_id": range(4), "dept": [1, 2, 1, 2],
                             "event_timestamp": [T0, T0 + DAY, T0 + DAY, T0]})
    answers = []
    for order in (duplicates, duplicates.iloc[::-1]):
        load_tables(contract_db, {"dept_rows": order})
        for options in ({"partitions": 1}, {"partitions": 2}, {"ray_min_entity_rows": 10}):
            answers.append(feature_store(contract_db, **options).get_historical_features(
                entity_df=entities, features=["dept_stats:dept_index"]).to_df()["dept_index"].tolist())
    assert all(answer == [0.9, 0.3, 0.9, 0.3] for answer in answers), answers


def test_duplicate_rows_with_equal_created_timestamps_pick_deterministically(contract_db: Settings) -> None:
    """Equal key, event and created timestamps: the greatest feature values in the view's schema order win
    (temperature, then visitors), NULL lowest."""
    rows = store_rows(store=[1, 1, 1, 1], event_timestamp=[T0] * 4, temperature=[5.0, 5.0, 4.0, None],
                      visitors=[10, 30, 99, 100])
    entities = pd.DataFrame({"row_id": [0], "store": [1], "event_timestamp": [T0 + DAY]})
    for order in (rows, rows.iloc[::-1], rows.iloc[[2, 0, 3, 1]]):
        load_tables(contract_db, {"store_rows": order})
        result = feature_store(contract_db).get_historical_features(
            entity_df=entities, features=["store_stats:visitors", "store_stats:temperature"]).to_df()
        assert result[["temperature", "visitors"]].values.tolist() == [[5.0, 30]]
