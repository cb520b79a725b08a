"""Differential test: the Ray offline store against Feast's own PostgreSQL store, over randomized repos and requests.

Each seed builds its own database (UTC, New York or Kolkata as its TimeZone) and repo: entities ``a`` (int),
``b`` (int) and ``c`` (text); five or six feature views keyed by one key, by two keys (two integers, or an integer
and a text key, either one first: a partition's read also bounds its first key alone), or by none (global
statistics), each with a random ttl (none, hours, days), a created timestamp column or not, a naive (``timestamp``)
or aware (``timestamptz``) timestamp column, a table or a query source, a field-mapped feature, and features of
several PostgreSQL types with NULLs; and an on-demand view with a request field. The rows have NULL keys and
times, created-timestamp ties (the same key and time written twice) and keys the entity set lacks.

Each request asks for several views with different join keys at once, with full feature names or not, from a
DataFrame (aware, or naive, which FeatureStore makes UTC) or a SQL entity set (naive columns are wall-clock time
in the session's TimeZone) with extra columns, NULL keys and times and missing entities; as to_df, to_arrow, and a
saved dataset (persist). Results must equal Feast's for every view with at most one join key, and an independent
oracle (pandas merge_asof) for every view. Feast's answer is wrong for two join keys (it glues them into one id:
(1, 12) == (11, 2)), so those views are checked against the oracle only.

Times stay in January and February, away from DST transitions, where Feast compares naive values by wall clock
(see test_ray_store_contract.py for the DST cases).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pytest
from conftest import database_settings

from sales_forecast.config import Settings
from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob
from tests.support.feast_repo import feature_store, postgres_store

SEEDS = [101, 102, 103, 104, 105, 106]
ZONES = ["UTC", "America/New_York", "Asia/Kolkata"]
START = pd.Timestamp("2026-01-05")  # wall clock; rows and entity rows stay within 40 days of it (no DST)
SPAN_MINUTES = 40 * 24 * 60
KEY_TYPES = {"a": "bigint", "b": "bigint", "c": "text"}
KEY_VALUES = {"a": [1, 2, 11, 12], "b": [1, 2, 12, 21], "c": ["p", "q", "P", "pq"]}
MISSING = {"a": 99, "b": 98, "c": "zz"}  # keys the sources never have
FEATURE_TYPES = ["double precision", "bigint", "integer", "text", "boolean", "timestamptz"]
NUMERIC = ("double precision", "bigint", "integer")
LABEL_SOURCE = "_label_source"  # the feature the on-demand view reads
VIEW_KEYS = [("a",), ("a", "b"), ("c",), ("b",), (), ("b", "c"), ("c", "a")]

pytestmark = pytest.mark.usefixtures("own_ray")


# --- a random repo ----------------------------------------------------------------------------------------------

@dataclass
class ViewSpec:
    name: str
    keys: tuple[str, ...]
    ttl: dt.timedelta
    created: bool
    naive: bool  # a timestamp-without-time-zone column
    query: bool  # a query source rather than a table
    features: list[tuple[str, str, str]] = field(default_factory=list)  # (source column, feature name, type)

    @property
    def table(self) -> str:
        return f"{self.name}_rows"


def random_views(rng: np.random.Generator, index: int) -> list[ViewSpec]:
    keys = [VIEW_KEYS[i] for i in sorted(rng.choice(len(VIEW_KEYS), size=int(rng.integers(5, 7)), replace=False))]
    views = []
    for number, view_keys in enumerate(keys):
        ttl = [dt.timedelta(0), dt.timedelta(hours=int(rng.integers(2, 48))),
               dt.timedelta(days=int(rng.integers(2, 10)))][int(rng.integers(0, 3))]
        spec = ViewSpec(name=f"s{index}v{number}", keys=view_keys, ttl=ttl, created=bool(rng.random() < 0.6),
                        naive=bool(rng.random() < 0.5), query=bool(rng.random() < 0.3))
        for j, type_ in enumerate(rng.choice(FEATURE_TYPES, size=int(rng.integers(1, 4)), replace=False)):
            feature = f"{spec.name}_f{j}"
            column = f"raw_{feature}" if j == 0 and rng.random() < 0.5 else feature  # a field mapping
            spec.features.append((column, feature, str(type_)))
        views.append(spec)
    source = next(((spec, position) for spec in views if len(spec.keys) <= 1
                   for position, (_, _, type_) in enumerate(spec.features) if type_ in NUMERIC), None)
    if source is not None:  # the on-demand view's input, named so that its UDF finds it among the request's columns
        spec, position = source
        column, feature, type_ = spec.features[position]
        named = f"{spec.name}{LABEL_SOURCE}"
        spec.features[position] = (f"raw_{named}" if column != feature else named, named, type_)
    return views


def feast_objects(views: list[ViewSpec]) -> list:
    from feast import Entity, FeatureView, Field, RequestSource, ValueType
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
    from feast.on_demand_feature_view import on_demand_feature_view
    from feast.types import Bool, Float64, Int32, Int64, String, UnixTimestamp

    dtypes = {"double precision": Float64, "bigint": Int64, "integer": Int32, "text": String, "boolean": Bool,
              "timestamptz": UnixTimestamp}
    entities = {name: Entity(name=name, join_keys=[name],
                             value_type=ValueType.STRING if name == "c" else ValueType.INT64) for name in KEY_TYPES}
    objects: list = list(entities.values())
    feature_views = {}
    for spec in views:
        source_kwargs = ({"query": f"SELECT * FROM {spec.table}"} if spec.query else {"table": spec.table})
        source = PostgreSQLSource(
            name=spec.name, timestamp_field="ts", created_timestamp_column="created" if spec.created else "",
            field_mapping={column: feature for column, feature, _ in spec.features if column != feature},
            **source_kwargs)
        feature_views[spec.name] = FeatureView(
            name=spec.name, entities=[entities[key] for key in spec.keys], ttl=spec.ttl, source=source,
            schema=[Field(name=feature, dtype=dtypes[type_]) for _, feature, type_ in spec.features])
    objects += feature_views.values()

    sources = [(spec, feature) for spec in views for _, feature, _ in spec.features if feature.endswith(LABEL_SOURCE)]
    if sources:  # an on-demand view on a one-key (or no-key) view, with a field of the entity set
        spec, feature = sources[0]
        request = RequestSource(name="label_request", schema=[Field(name="label", dtype=Float64)])

        @on_demand_feature_view(sources=[feature_views[spec.name][[feature]], request], mode="pandas",
                                schema=[Field(name="labelled", dtype=Float64)])
        def labelled(inputs: pd.DataFrame) -> pd.DataFrame:  # Feast compiles the source alone: no closure
            value = inputs[[c for c in inputs.columns if c.endswith("_label_source")][0]]
            return pd.DataFrame({"labelled": value.astype("float64") + inputs["label"]})

        objects += [request, labelled]
    return objects


# --- random rows ------------------------------------------------------------------------------------------------

def wall_clock(rng: np.random.Generator, size: int) -> pd.DatetimeIndex:
    minutes = rng.integers(0, SPAN_MINUTES, size) // 30 * 30  # on the half hour: exact matches and ties happen
    return pd.DatetimeIndex(START + pd.to_timedelta(minutes, "min"))


def feature_value(rng: np.random.Generator, type_: str, zone: str):
    if rng.random() < 0.1:
        return None
    if type_ == "double precision":
        return float(np.round(rng.normal(0, 100), 3))
    if type_ in ("bigint", "integer"):
        return int(rng.integers(-1_000, 1_000))
    if type_ == "text":
        return str(rng.choice(["x", "y", "zz", "Zed", "é"]))
    if type_ == "boolean":
        return bool(rng.random() < 0.5)
    return (START + pd.Timedelta(minutes=int(rng.integers(0, 10_000)))).tz_localize("UTC").to_pydatetime()


def random_rows(rng: np.random.Generator, spec: ViewSpec, zone: str) -> pd.DataFrame:
    """Rows of one view's table: wall-clock ``ts`` (naive) and its instant ``instant`` (UTC, for the oracle)."""
    n = int(rng.integers(40, 160))
    rows = pd.DataFrame({key: rng.choice(KEY_VALUES[key], n) for key in spec.keys})
    rows["ts"] = wall_clock(rng, n)
    rows["created"] = rows["ts"] + pd.to_timedelta(rng.integers(0, 120, n), "min")
    again = rows.sample(frac=0.2, random_state=int(rng.integers(1 << 30)))  # the same key and time, written later
    again = again.assign(created=again["created"] + pd.to_timedelta(rng.integers(1, 60, len(again)), "min"))
    rows = pd.concat([rows, again], ignore_index=True)
    unique = [*spec.keys, "ts", "created"] if spec.created else [*spec.keys, "ts"]
    rows = rows.drop_duplicates(unique).reset_index(drop=True)  # exact duplicates: Feast repeats the entity row
    for column, _, type_ in spec.features:
        rows[column] = pd.Series([feature_value(rng, type_, zone) for _ in range(len(rows))], dtype=object)
    rows = rows.astype({key: object for key in spec.keys})
    for key in spec.keys:  # NULL keys, which match nothing
        rows.loc[rng.random(len(rows)) < 0.03, key] = None
    rows["ts"] = rows["ts"].astype(object)
    rows.loc[rng.random(len(rows)) < 0.03, "ts"] = None  # NULL times, which match nothing
    return rows


def instants(wall: pd.Series, zone: str) -> pd.Series:
    """UTC instants of wall-clock times in ``zone`` (no DST transition in range: unambiguous)."""
    return pd.to_datetime(wall).dt.tz_localize(zone).dt.tz_convert("UTC")


def create_table(conn: psycopg.Connection, spec: ViewSpec, rows: pd.DataFrame, zone: str) -> None:
    columns = [f'"{key}" {KEY_TYPES[key]}' for key in spec.keys]
    columns.append(f"ts {'timestamp' if spec.naive else 'timestamptz'}")
    columns += ["created timestamptz"] if spec.created else []
    columns += [f'"{column}" {type_}' for column, _, type_ in spec.features]
    conn.execute(f"CREATE TABLE {spec.table} ({', '.join(columns)})")
    names = [*spec.keys, "ts", *(["created"] if spec.created else []), *(c for c, _, _ in spec.features)]
    ts = rows["ts"].map(lambda t: None if pd.isna(t) else (
        pd.Timestamp(t).to_pydatetime() if spec.naive else pd.Timestamp(t).tz_localize(zone).to_pydatetime()))
    created = rows["created"].map(lambda t: pd.Timestamp(t).tz_localize(zone).to_pydatetime())
    data = rows.assign(ts=ts, created=created)[names]
    with conn.cursor().copy(f"COPY {spec.table} ({', '.join(f'{n!r}'.replace(chr(39), chr(34)) for n in names)}) "
                            "FROM STDIN") as copy:
        for record in data.itertuples(index=False):
            copy.write_row([None if pd.isna(v) else v for v in record])
    conn.execute(f"CREATE INDEX ON {spec.table} ({', '.join([*(f'{k!r}' for k in spec.keys), 'ts'])})"
                 .replace("'", '"'))


def random_entities(rng: np.random.Generator, tables: dict[str, pd.DataFrame], n: int = 240) -> pd.DataFrame:
    """Entity rows (wall clock): keys from the sources and missing ones, times at, just after and between rows."""
    frame = pd.DataFrame({key: rng.choice([*KEY_VALUES[key], MISSING[key]], n) for key in KEY_TYPES})
    picked = pd.concat([table["ts"].dropna() for table in tables.values()], ignore_index=True)
    at_rows = pd.to_datetime(picked.sample(n, replace=True, random_state=int(rng.integers(1 << 30))).to_numpy())
    shifted = at_rows + pd.to_timedelta(rng.choice([0, 0, 1, 29, 90, 24 * 60], n), "min")
    frame["event_timestamp"] = np.where(rng.random(n) < 0.7, shifted, wall_clock(rng, n))
    frame["label"] = np.round(rng.normal(size=n), 3)
    frame["note"] = rng.choice(["n1", "n2"], n)
    frame.insert(0, "row_id", np.arange(n))
    return frame


# --- the oracle -------------------------------------------------------------------------------------------------

def oracle(spec: ViewSpec, rows: pd.DataFrame, entities: pd.DataFrame, entity_instants: pd.Series,
           zone: str) -> pd.DataFrame:
    """merge_asof by the view's keys on UTC instants: the latest row at or before the entity row, within the ttl
    (inclusive, whole seconds), the latest created winning a tie; NULL keys and times match nothing."""
    right = rows.dropna(subset=[*spec.keys, "ts"]).copy()
    right["when"] = instants(right["ts"], zone)  # the table holds the wall clock, naive or read in the zone
    right["tie"] = instants(right["created"], zone) if spec.created else 0
    right = right.sort_values(["when", "tie"], kind="stable")
    left = entities[["row_id", *spec.keys]].assign(when=entity_instants.to_numpy())
    usable = left["when"].notna()
    for key in spec.keys:
        usable &= left[key].notna()
    left = left[usable].sort_values("when", kind="stable")
    for key in spec.keys:
        kind = "object" if key == "c" else "int64"
        left[key], right[key] = left[key].astype(kind), right[key].astype(kind)
    ttl = pd.Timedelta(seconds=int(spec.ttl.total_seconds())) if spec.ttl.total_seconds() >= 1 else None
    columns = [column for column, _, _ in spec.features]
    joined = pd.merge_asof(left, right[[*spec.keys, "when", *columns]], on="when", by=list(spec.keys) or None,
                           direction="backward", tolerance=ttl, allow_exact_matches=True)
    out = joined.set_index("row_id")[columns].set_axis([feature for _, feature, _ in spec.features], axis=1)
    return out.reindex(entities["row_id"])


def normalized(values: pd.Series) -> list:
    """A column as comparable Python values: None for missing, numbers as float, timestamps as UTC nanoseconds."""
    out = []
    for value in values.tolist():
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
            out.append(None)
        elif isinstance(value, (dt.datetime, pd.Timestamp)):
            stamp = pd.Timestamp(value)
            out.append((stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp).value)
        elif isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
            out.append(float(value))
        else:
            out.append(value)
    return out


# --- one seed ---------------------------------------------------------------------------------------------------

@dataclass
class Repo:
    settings: Settings
    zone: str
    views: list[ViewSpec]
    tables: dict[str, pd.DataFrame]
    project: str


def build_repo(stack_settings: Settings, seed: int) -> Repo:
    rng = np.random.default_rng(seed)
    zone = ZONES[seed % len(ZONES)]
    name = f"ray_diff_{seed}"
    settings = database_settings(stack_settings, name)
    views = random_views(rng, seed)
    tables = {spec.name: random_rows(rng, spec, zone) for spec in views}
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET TimeZone = '{zone}'")
    with psycopg.connect(settings.postgres.libpq_url(), autocommit=True) as conn:
        for spec in views:
            create_table(conn, spec, tables[spec.name], zone)
    project = f"diff{seed}"
    feature_store(settings, project=project).apply(feast_objects(views))
    return Repo(settings, zone, views, tables, project)


def entity_set(repo: Repo, entities: pd.DataFrame, kind: str) -> tuple[pd.DataFrame | str, pd.Series]:
    """(the entity_df to pass, each row's instant under the timestamps rule) for a kind of entity set."""
    wall = pd.to_datetime(entities["event_timestamp"])
    if kind == "frame aware":
        frame = entities.assign(event_timestamp=instants(wall, repo.zone))
        return frame, frame["event_timestamp"]
    if kind == "frame naive":  # FeatureStore makes naive DataFrame timestamps UTC (coerce_tz_aware)
        return entities, wall.dt.tz_localize("UTC")
    naive = kind == "sql naive"
    table = f"entities_{kind.split()[1]}"
    with psycopg.connect(repo.settings.postgres.libpq_url(), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (row_id bigint, a bigint, b bigint, c text, event_timestamp "
                     f"{'timestamp' if naive else 'timestamptz'}, label float8, note text)")
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            rng = np.random.default_rng(len(entities))
            for record in entities.itertuples(index=False):
                values = list(record)
                values[4] = pd.Timestamp(values[4]).to_pydatetime() if naive else \
                    pd.Timestamp(values[4]).tz_localize(repo.zone).to_pydatetime()
                if rng.random() < 0.03:  # a NULL key or time: matches nothing
                    values[int(rng.integers(1, 5))] = None
                copy.write_row([v.item() if isinstance(v, np.generic) else v for v in values])
        stored = pd.DataFrame(conn.execute(f"SELECT row_id, a, b, c, event_timestamp::text FROM {table} "
                                           "ORDER BY row_id").fetchall(), columns=["row_id", "a", "b", "c", "ts"])
    entities[["a", "b", "c"]] = stored[["a", "b", "c"]].to_numpy()
    when = instants(stored["ts"].where(stored["ts"].notna()).map(
        lambda t: None if t is None else pd.Timestamp(t).tz_localize(None) if naive else
        pd.Timestamp(t).tz_convert(repo.zone).tz_localize(None)), repo.zone)
    return f"SELECT * FROM {table}", when


def request(repo: Repo, rng: np.random.Generator, entities: pd.DataFrame, kind: str, full_names: bool,
            output: str, options: dict) -> None:
    entity_df, entity_instants = entity_set(repo, entities, kind)
    chosen = [repo.views[i] for i in sorted(rng.choice(len(repo.views), size=max(3, len(repo.views) - 1),
                                                       replace=False))]
    refs = [f"{spec.name}:{feature}" for spec in chosen for _, feature, _ in spec.features]
    odfv = [spec for spec in chosen if len(spec.keys) <= 1]
    store = feature_store(repo.settings, project=repo.project, **options)
    if any(o.name == "labelled" for o in store.list_on_demand_feature_views()):
        source = store.get_on_demand_feature_view("labelled").source_feature_view_projections
        if set(source) <= {spec.name for spec in odfv}:
            refs.append("labelled:labelled")
    job = store.get_historical_features(entity_df=entity_df, features=refs, full_feature_names=full_names)
    assert isinstance(job, RayPostgreSQLRetrievalJob)
    ours = fetch(job, output, repo, f"ours_{kind.replace(' ', '_')}")

    # Feast's store on the views it gets right (at most one join key), the same request otherwise
    feast_refs = [ref for ref in refs if ref.split(":")[0] not in {s.name for s in chosen if len(s.keys) > 1}]
    theirs_job = postgres_store(repo.settings, project=repo.project).get_historical_features(
        entity_df=entity_df, features=feast_refs, full_feature_names=full_names)
    theirs = fetch(theirs_job, output, repo, f"theirs_{kind.replace(' ', '_')}")
    assert len(ours) == len(entities) and len(theirs) == len(entities)
    ours = ours.sort_values("row_id").reset_index(drop=True)
    theirs = theirs.sort_values("row_id").reset_index(drop=True)
    assert set(theirs.columns) <= set(ours.columns)
    compare = ours[list(theirs.columns)]
    if output == "persist":  # read back from PostgreSQL: the two tables' types may differ, their values may not
        for column in theirs.columns:
            assert normalized(compare[column]) == normalized(theirs[column]), column
    else:
        pd.testing.assert_frame_equal(compare, theirs)

    for spec in chosen:  # every view, two join keys included, against the oracle
        want = oracle(spec, repo.tables[spec.name], entities, entity_instants, repo.zone)
        for feature in want.columns:
            column = f"{spec.name}__{feature}" if full_names else feature
            assert normalized(ours[column]) == normalized(want[feature].reset_index(drop=True)), (spec, column)
    features = [c for c in ours.columns if "_f" in c or c.endswith(LABEL_SOURCE)]
    assert ours[features].notna().to_numpy().mean() > 0.2  # the data joins


def fetch(job, output: str, repo: Repo, name: str) -> pd.DataFrame:
    if output == "to_df":
        return job.to_df()
    if output == "to_arrow":
        table = job.to_arrow()
        assert isinstance(table, pa.Table)
        return table.to_pandas()
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
        SavedDatasetPostgreSQLStorage,
    )

    job.persist(SavedDatasetPostgreSQLStorage(table_ref=name), allow_overwrite=True)
    with psycopg.connect(repo.settings.postgres.libpq_url()) as conn:
        cursor = conn.execute(f'SELECT * FROM "{name}"')
        frame = pd.DataFrame(cursor.fetchall(), columns=[c.name for c in cursor.description])
        conn.execute(f'DROP TABLE "{name}"')
        conn.commit()
    return frame


@pytest.mark.parametrize("seed", SEEDS)
def test_ray_store_equals_feast_and_the_oracle(stack_settings: Settings, seed: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sales_forecast.ray_offline_store import store as store_module

    monkeypatch.setattr(store_module, "STREAM_BATCH_BYTES", 2048)  # SQL entity sets arrive in several batches
    repo = build_repo(stack_settings, seed)
    rng = np.random.default_rng(seed + 7)
    kinds = ["frame aware", "frame naive", "sql naive", "sql aware"]
    outputs = ["to_df", "to_arrow", "persist"]
    runtimes = [{"partitions": None, "min_rows_per_partition": 20}, {"partitions": 3}, {"ray_min_entity_rows": 10_000}]
    for number in range(3):
        kind = kinds[(seed + number) % len(kinds)]
        entities = random_entities(rng, repo.tables)
        request(repo, rng, entities, kind, full_names=bool((seed + number) % 2), output=outputs[number],
                options=runtimes[(seed + number) % len(runtimes)])
